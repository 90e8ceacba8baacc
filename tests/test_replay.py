"""Replaying quarantined rows after a contract fix: every row once, also after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from delta_processing.replay import replay_quarantine
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, land_records

CONTRACT = """
name = "counts"
keys = ["id"]
event_time = "ts"

[[fields]]
name = "id"
type = "string"

[[fields]]
name = "ts"
type = "timestamp"
required = true

[[fields]]
name = "n"
type = "int"
required = true

[[expectations]]
name = "small"
kind = "range"
column = "n"
max = {n_max}
"""


def _contracts(tmp_path: Path, n_max: int) -> Path:
    directory = tmp_path / f"contracts-{n_max}"
    directory.mkdir(exist_ok=True)
    (directory / "counts.toml").write_text(CONTRACT.format(n_max=n_max))
    return directory


def _send(settings: Settings, rows: list[dict[str, object]]) -> None:
    land_records(settings.data_dir, "counts", rows)


def _rows() -> list[dict[str, object]]:
    return [{"id": f"r{i}", "ts": "2026-11-20T10:00:00Z", "n": n}
            for i, n in enumerate([1, 5, 3, 7])]  # fmt: skip


def _table(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def test_replay_after_fixing_the_contract_lands_each_row_once(
    settings: Settings, tmp_path: Path
) -> None:
    strict = Processor(settings, load_contracts(_contracts(tmp_path, 4)))
    _send(settings, _rows())
    strict.run_once()
    assert sorted(_table(settings, "silver/counts")["id"].to_list()) == ["r0", "r2"]
    assert _table(settings, "quarantine/counts").height == 2

    assert replay_quarantine(settings.data_dir, "counts", dry_run=True).rows == 2
    fixed = Processor(settings, load_contracts(_contracts(tmp_path, 10)))
    result = replay_quarantine(settings.data_dir, "counts")
    assert result.rows == 2 and result.batch_id and result.batch_id.startswith("replay-")
    assert _table(settings, "quarantine/counts").height == 0
    fixed.run_once()
    silver = _table(settings, "silver/counts").sort("id")
    assert silver.select("id", "n").rows() == [("r0", 1), ("r1", 5), ("r2", 3), ("r3", 7)]
    assert replay_quarantine(settings.data_dir, "counts").rows == 0  # nothing left
    bronze = _table(settings, "bronze/counts")
    assert bronze.filter(pl.col("_batch_id").str.starts_with("replay-")).height == 2


def test_interrupted_replay_resumes_without_landing_twice(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    strict = Processor(settings, load_contracts(_contracts(tmp_path, 4)))
    _send(settings, _rows())
    strict.run_once()

    from deltalake import DeltaTable

    class Crash(Exception):
        pass

    def crash(self, predicate):
        raise Crash

    # Crash after the landing file is written, before the quarantine rows are deleted.
    monkeypatch.setattr(DeltaTable, "delete", crash)
    with pytest.raises(Crash):
        replay_quarantine(settings.data_dir, "counts")
    monkeypatch.undo()
    landed = list((settings.data_dir / "landing" / "counts").glob("replay-*.parquet"))
    assert len(landed) == 1 and (settings.data_dir / "_meta" / "replay" / "counts.json").exists()

    result = replay_quarantine(settings.data_dir, "counts")
    assert result.rows == 2
    assert list((settings.data_dir / "landing" / "counts").glob("replay-*.parquet")) == landed
    assert not (settings.data_dir / "_meta" / "replay" / "counts.json").exists()
    Processor(settings, load_contracts(_contracts(tmp_path, 10))).run_once()
    assert _table(settings, "silver/counts").height == 4
    assert (
        _table(settings, "bronze/counts")
        .filter(pl.col("_batch_id").str.starts_with("replay-"))
        .height
        == 2
    )


def test_replay_command(tmp_path: Path) -> None:
    import subprocess

    contracts = _contracts(tmp_path, 4)
    data_dir = tmp_path / "dados"
    env = lakehouse_env(data_dir, LAKEHOUSE_CONTRACTS_DIR=str(contracts))
    landing = data_dir / "landing" / "counts"
    landing.mkdir(parents=True)
    (landing / "a.ndjson").write_text("\n".join(json.dumps(r) for r in _rows()))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LAKEHOUSE, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert cli("process", "--once").returncode == 0
    assert (
        "would replay 2 row(s) of counts"
        in cli("replay", "quarantine", "counts", "--dry-run").stdout
    )
    assert "replayed 2 row(s) of counts" in cli("replay", "quarantine", "counts").stdout
    assert cli("replay", "quarantine", "nope").returncode == 2
