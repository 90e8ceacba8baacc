"""Schema evolution modes, new contract fields, and safe type widening in silver."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from tests.helpers import land_records

CONTRACT = """
name = "things"
keys = ["id"]
event_time = "ts"
evolution = "{mode}"

[[fields]]
name = "id"
type = "int"

[[fields]]
name = "ts"
type = "timestamp"
required = true
{extra_fields}
"""


def _processor(tmp_path: Path, settings: Settings, mode: str, extra_fields: str = "") -> Processor:
    directory = tmp_path / f"contracts-{mode}-{abs(hash(extra_fields))}"
    directory.mkdir(exist_ok=True)
    (directory / "things.toml").write_text(CONTRACT.format(mode=mode, extra_fields=extra_fields))
    return Processor(settings, load_contracts(directory))


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "things", rows)


def _row(i: int, **extra: object) -> dict[str, object]:
    return {"id": i, "ts": "2026-11-20T10:00:00Z", **extra}


def _read(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def _evolution_metric(settings: Settings) -> list[tuple[str, int]]:
    quality = _read(settings, "_meta/quality").sort("bronze_version")
    return [
        next((e["action"], e["failed"]) for e in row if e["name"] == "_evolution")
        for row in quality["expectations"].to_list()
    ]


def test_add_mode_makes_new_fields_columns(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings, "add")
    _send(settings, [_row(1, color="red"), _row(2)])
    processor.run_once()
    _send(settings, [_row(3, size=3)])
    processor.run_once()
    silver = _read(settings, "silver/things").sort("id")
    assert silver.select("id", "color", "size").rows() == [
        (1, "red", None),
        (2, None, None),
        (3, None, "3"),
    ]
    assert _evolution_metric(settings) == [("add", 1), ("add", 1)]


def test_rescue_mode_keeps_new_fields_as_json(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings, "rescue")
    _send(settings, [_row(1, color="red", tags=["a"]), _row(2)])
    processor.run_once()
    silver = _read(settings, "silver/things").sort("id")
    rescued = silver["_rescued_data"].to_list()
    assert json.loads(rescued[0]) == {"color": "red", "tags": '["a"]'}
    assert rescued[1] is None
    assert "color" not in silver.columns


def test_fail_mode_quarantines_the_senders_whole_file(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings, "fail")
    _send(settings, [_row(1), _row(2, color="red")])  # one file: both rows set aside
    _send(settings, [_row(3)])
    processor.run_once()
    assert _read(settings, "silver/things")["id"].to_list() == [3]
    quarantine = _read(settings, "quarantine/things").sort("id")
    assert quarantine["id"].to_list() == ["1", "2"]
    assert set(quarantine["_reason"].to_list()) == {
        "undeclared field(s) color in this landing file (schema evolution mode 'fail')"
    }
    assert quarantine["color"].to_list() == [None, "red"]


def test_freeze_mode_drops_and_counts(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings, "freeze")
    _send(settings, [_row(1, color="red"), _row(2, color="blue"), _row(3)])
    processor.run_once()
    silver = _read(settings, "silver/things")
    assert sorted(silver["id"].to_list()) == [1, 2, 3]
    assert "color" not in silver.columns and "_rescued_data" not in silver.columns
    assert _evolution_metric(settings) == [("freeze", 2)]


def test_declaring_a_field_later_adds_the_column(settings: Settings, tmp_path: Path) -> None:
    _processor(tmp_path, settings, "freeze").run_once()
    _send(settings, [_row(1, color="red")])
    _processor(tmp_path, settings, "freeze").run_once()
    declared = '[[fields]]\nname = "color"\ntype = "string"\n'
    later = _processor(tmp_path, settings, "freeze", declared)
    _send(settings, [_row(2, color="blue")])
    later.run_once()
    silver = _read(settings, "silver/things").sort("id")
    assert silver.select("id", "color").rows() == [(1, None), (2, "blue")]


def test_int_to_float_widens_in_place_and_unsafe_changes_stop_the_source(
    settings: Settings, tmp_path: Path
) -> None:
    as_int = '[[fields]]\nname = "n"\ntype = "int"\n'
    _send(settings, [_row(1, n=5)])
    _processor(tmp_path, settings, "freeze", as_int).run_once()
    assert _read(settings, "silver/things").schema["n"] == pl.Int64

    widened = _processor(tmp_path, settings, "freeze", as_int.replace("int", "float"))
    _send(settings, [_row(2, n=2.5)])
    assert widened.run_once().failures == []
    silver = _read(settings, "silver/things").sort("id")
    assert silver.schema["n"] == pl.Float64
    assert silver.select("id", "n").rows() == [(1, 5.0), (2, 2.5)]

    narrowed = _processor(tmp_path, settings, "freeze", as_int.replace("int", "bool"))
    _send(settings, [_row(3, n="true")])
    failures = narrowed.run_once().failures
    assert len(failures) == 1
    assert (
        "n: Float64 -> Boolean" in failures[0] and "lakehouse refresh silver/things" in failures[0]
    )


@pytest.mark.parametrize("mode", ["add", "rescue", "fail", "freeze"])
def test_every_mode_accepts_batches_without_new_fields(
    settings: Settings, tmp_path: Path, mode: str
) -> None:
    processor = _processor(tmp_path, settings, mode)
    _send(settings, [_row(1), _row(2)])
    assert processor.run_once().failures == []
    assert sorted(_read(settings, "silver/things")["id"].to_list()) == [1, 2]
