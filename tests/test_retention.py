"""Retention per layer: old rows expire; gold outlives silver."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from delta_processing.retention import RetentionPolicy, apply_retention
from delta_processing.tables import TableStore
from landing_zone.formats import decode_batch
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


def _send(settings: Settings, days_ago: list[int], bad: int = 0) -> None:
    rows: list[dict[str, object]] = [
        {"ts": (NOW - timedelta(days=d)).isoformat(), "device_id": "d", "sensor": "s", "value": d}
        for d in days_ago
    ]
    rows += [{"ts": "nope", "device_id": "d", "sensor": "s", "value": 1}] * bad
    body = b"\n".join(json.dumps(r).encode() for r in rows)
    LandingWriter(LandingLayout(settings.data_dir)).write_frame(
        "readings", decode_batch(body, "ndjson")
    )


def _read(settings: Settings, path: str) -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / path))


def test_silver_expires_by_event_time_and_gold_is_kept(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _send(settings, [400, 200, 10, 1], bad=1)
    processor.run_once()
    store = TableStore(settings.data_dir)
    contracts = list(load_contracts().values())
    results = apply_retention(store, contracts, RetentionPolicy(silver_days=365), NOW)
    assert [(r.table, r.rows_deleted) for r in results] == [("silver/readings", 1)]
    assert sorted(_read(settings, "silver/readings")["value"].to_list()) == [1.0, 10.0, 200.0]
    # The pipeline goes on; gold still holds the expired row's day.
    _send(settings, [2])
    processor.run_once()
    daily = _read(settings, "gold/readings_daily")
    assert daily.height == 5 and 400.0 in daily["sum"].to_list()
    assert _read(settings, "bronze/readings").height == 6  # bronze has no retention here


def test_every_layer_with_a_retention_expires(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _send(settings, [40, 3], bad=2)
    processor.run_once()
    policy = RetentionPolicy(bronze_days=30, silver_days=30, quarantine_days=30, gold_days=30)
    store = TableStore(settings.data_dir)
    contracts = list(load_contracts().values())
    # Bronze and quarantine age by arrival: everything here arrived just now.
    assert {r.table for r in apply_retention(store, contracts, policy, NOW)} == {
        "silver/readings",
        "gold/readings_hourly",
        "gold/readings_daily",
    }
    later = datetime.now(UTC) + timedelta(days=31)
    expired = {r.table: r.rows_deleted for r in apply_retention(store, contracts, policy, later)}
    assert expired["bronze/readings"] == 4 and expired["quarantine/readings"] == 2
    assert _read(settings, "bronze/readings").height == 0


def test_retention_apply_command(tmp_path: Path) -> None:
    import subprocess

    data_dir = tmp_path / "dados"
    landing = data_dir / "landing" / "readings"
    landing.mkdir(parents=True)
    old = (datetime.now(UTC) - timedelta(days=100)).isoformat()
    (landing / "a.ndjson").write_text(
        json.dumps({"ts": old, "device_id": "d", "sensor": "s", "value": 1}) + "\n"
    )
    env = lakehouse_env(data_dir, LAKEHOUSE_RETENTION_SILVER_DAYS="30")
    run = [*LAKEHOUSE]
    assert subprocess.run([*run, "process", "--once"], cwd=REPO, env=env).returncode == 0
    result = subprocess.run([*run, "retention", "apply"], cwd=REPO, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "silver/readings: 1 row(s)" in result.stdout
