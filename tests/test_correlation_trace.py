"""A request's correlation id follows its records through bronze, silver and gold."""

from __future__ import annotations

import json

import structlog
from deltalake import DeltaTable

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from delta_processing.tables import CORRELATION_IDS, MAX_COMMITTED_IDS, correlation_metadata
from tests.helpers import land_records


def _land(settings: Settings, minute: int, correlation_id: str) -> None:
    reading = {
        "ts": f"2026-11-20T10:{minute:02d}:00Z",
        "device_id": "d1",
        "sensor": "t",
        "value": 1,
    }
    land_records(settings.data_dir, "readings", [reading], correlation_id)


def _committed_ids(settings: Settings, layer: str, name: str) -> list[str]:
    history = DeltaTable(str(settings.data_dir / layer / name)).history()
    newest = max(history, key=lambda entry: int(entry["version"]))
    return list(json.loads(str(newest.get(CORRELATION_IDS, "[]"))))


def test_ids_reach_the_silver_and_gold_commits_and_log_lines(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _land(settings, 1, "req-first")
    processor.run_once()
    _land(settings, 2, "req-second")
    with structlog.testing.capture_logs() as logs:
        processor.run_once()

    assert _committed_ids(settings, "silver", "readings") == ["req-second"]
    for table in ("readings_hourly", "readings_daily", "readings_latest"):
        assert _committed_ids(settings, "gold", table) == ["req-second"]
    traced = {
        (entry["event"], entry.get("table")): entry.get("correlation_ids")
        for entry in logs
        if entry["event"] in ("bronze.committed", "silver.promoted", "gold.refreshed")
    }
    assert traced == {
        ("bronze.committed", None): ["req-second"],
        ("silver.promoted", None): ["req-second"],
        ("gold.refreshed", "readings_hourly"): ["req-second"],
        ("gold.refreshed", "readings_daily"): ["req-second"],
        ("gold.refreshed", "readings_latest"): ["req-second"],
    }


def test_commit_metadata_names_a_bounded_number_of_requests() -> None:
    ids = [f"req-{i}" for i in range(MAX_COMMITTED_IDS + 50)]
    assert json.loads(correlation_metadata(ids)[CORRELATION_IDS]) == ids[:MAX_COMMITTED_IDS]
    assert correlation_metadata([]) == {}
