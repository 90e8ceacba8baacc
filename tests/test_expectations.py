"""Expectations and their actions, quality metrics, and the `fail` action's replay."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from config.contracts import ContractError, load_contract_file, load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from tests.helpers import land_records

BASE = """
name = "sensors"
keys = ["id"]
event_time = "ts"

[[fields]]
name = "id"
type = "int"

[[fields]]
name = "ts"
type = "timestamp"
required = true

[[fields]]
name = "temp"
type = "float"

[[fields]]
name = "site"
type = "string"

[[fields]]
name = "serial"
type = "string"
"""

EXPECTATIONS = """
[[expectations]]
name = "temp_plausible"
kind = "range"
column = "temp"
min = -50
max = 60
action = "quarantine"

[[expectations]]
name = "known_site"
kind = "allowed"
column = "site"
values = ["north", "south"]
action = "drop"

[[expectations]]
name = "serial_format"
kind = "regex"
column = "serial"
pattern = "^SN-[0-9]{4}$"
action = "warn"

[[expectations]]
name = "has_temp"
kind = "not_null"
column = "temp"
action = "warn"

[[expectations]]
name = "serial_unique"
kind = "unique"
column = "serial"
action = "quarantine"

[[expectations]]
name = "cold_north"
kind = "predicate"
predicate = "site <> 'north' OR temp < 30"
action = "quarantine"
"""


def _processor(tmp_path: Path, settings: Settings, extra: str) -> Processor:
    directory = tmp_path / "contracts"
    directory.mkdir(exist_ok=True)
    (directory / "sensors.toml").write_text(BASE + extra)
    return Processor(settings, load_contracts(directory))


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "sensors", rows)


def _read(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def _r(i: int, temp: object, site: str, serial: str) -> dict[str, object]:
    return {"id": i, "ts": "2026-11-20T10:00:00Z", "temp": temp, "site": site, "serial": serial}


def test_each_action_keeps_drops_quarantines_and_counts(settings: Settings, tmp_path: Path) -> None:
    processor = _processor(tmp_path, settings, EXPECTATIONS)
    _send(
        settings,
        [
            _r(1, 20, "north", "SN-0001"),  # passes everything
            _r(2, 99, "south", "SN-0002"),  # temp_plausible -> quarantine
            _r(3, 10, "west", "SN-0003"),  # known_site -> drop
            _r(4, 10, "south", "bad"),  # serial_format -> warn, kept
            _r(5, None, "south", "SN-0005"),  # has_temp -> warn, kept
            _r(6, 10, "south", "SN-0006"),  # serial duplicate -> both quarantined
            _r(7, 11, "south", "SN-0006"),
            _r(8, 35, "north", "SN-0008"),  # cold_north -> quarantine
            {"id": "x", "ts": "2026-11-20T10:00:00Z"},  # contract: id not an int
        ],
    )
    report = processor.run_once()
    assert report.failures == []
    assert sorted(_read(settings, "silver/sensors")["id"].to_list()) == [1, 4, 5]

    quarantine = _read(settings, "quarantine/sensors").sort("id")
    reasons = dict(zip(quarantine["id"].to_list(), quarantine["_reason"].to_list(), strict=True))
    assert reasons == {
        "2": "expectation temp_plausible failed: temp in [-50, 60]",
        "6": "expectation serial_unique failed: serial unique within the batch",
        "7": "expectation serial_unique failed: serial unique within the batch",
        "8": "expectation cold_north failed: site <> 'north' OR temp < 30",
        "x": "id: cannot parse 'x' as int",
    }
    # The raw record is kept as received (strings), next to the reason.
    assert quarantine.filter(pl.col("id") == "2")["temp"].to_list() == ["99"]

    quality = _read(settings, "_meta/quality").row(0, named=True)
    assert {
        k: quality[k]
        for k in ("rows_in", "rows_passed", "rows_warned", "rows_dropped", "rows_quarantined")
    } == {
        "rows_in": 9,
        "rows_passed": 3,
        "rows_warned": 2,
        "rows_dropped": 1,
        "rows_quarantined": 5,
    }
    failed = {e["name"]: (e["action"], e["failed"]) for e in quality["expectations"]}
    assert failed == {
        "_contract": ("quarantine", 1),
        "_evolution": ("rescue", 0),
        "temp_plausible": ("quarantine", 1),
        "known_site": ("drop", 1),
        "serial_format": ("warn", 1),
        "has_temp": ("warn", 1),
        "serial_unique": ("quarantine", 2),
        "cold_north": ("quarantine", 1),
    }


def test_fail_rejects_the_whole_batch_until_the_contract_is_fixed(
    settings: Settings, tmp_path: Path
) -> None:
    strict = '[[expectations]]\nname = "no_hot"\nkind = "range"\ncolumn = "temp"\nmax = 50\n'
    strict += 'action = "fail"\n'
    processor = _processor(tmp_path, settings, strict)
    _send(settings, [_r(1, 20, "north", "a"), _r(2, 70, "north", "b")])
    report = processor.run_once()
    assert len(report.failures) == 1
    assert "expectation 'no_hot' (temp in [-inf, 50]) failed for 1 row(s)" in report.failures[0]
    # Nothing partial: no silver rows, no quarantine, no metrics; bronze keeps the batch.
    assert _read(settings, "silver/sensors").height == 0
    assert not (settings.data_dir / "quarantine" / "sensors").exists()
    assert _read(settings, "bronze/sensors").height == 2
    assert processor.run_once().failures  # still rejected on retry

    fixed = _processor(tmp_path, settings, strict.replace("max = 50", "max = 80"))
    assert fixed.run_once().failures == []
    assert sorted(_read(settings, "silver/sensors")["id"].to_list()) == [1, 2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[expectations]]\nname = "r"\nkind = "range"\ncolumn = "temp"\n', "needs min and/or max"),
        ('[[expectations]]\nname = "r"\nkind = "regex"\ncolumn = "site"\npattern = "("\n',
         "invalid regex"),
        ('[[expectations]]\nname = "r"\nkind = "allowed"\ncolumn = "nope"\nvalues = [1]\n',
         "undeclared field 'nope'"),
        ('[[expectations]]\nname = "r"\nkind = "predicate"\n', "needs 'predicate'"),
        ('[[expectations]]\nname = "r"\nkind = "not_null"\ncolumn = "temp"\naction = "explode"\n',
         "action"),
    ],
)  # fmt: skip
def test_expectation_declarations_are_checked(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "sensors.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ContractError, match=message):
        load_contract_file(path)


def test_a_predicate_that_cannot_run_is_a_contract_error(settings: Settings) -> None:
    from delta_processing.coercions import contract_dtypes
    from delta_processing.expectations import check_expectations

    path = settings.data_dir / "sensors.toml"
    path.write_text(
        BASE + '[[expectations]]\nname = "p"\nkind = "predicate"\npredicate = "nope > 1"\n'
    )
    contract = load_contract_file(path)
    with pytest.raises(ContractError, match="expectation 'p' cannot run"):
        check_expectations(contract, pl.Schema(contract_dtypes(contract)))
