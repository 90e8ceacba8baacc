"""Bronze look-ahead: on a backlog the next micro-batch is ingested on a second thread
while the previous one goes through silver and gold; nothing is lost or doubled, and a
failure ahead is reported for its source and retried like any other."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.bronze import BronzeIngestor
from delta_processing.processor import Processor
from tests.helpers import land_records

FILES = 6
ROWS_PER_FILE = 50


@pytest.fixture
def backlog_settings(data_dir: Path) -> Settings:
    """One landing file per bronze micro-batch, so every file but the last is a backlog."""
    return load_settings(
        data_dir=data_dir, trigger_latency_ms=0, file_settle_ms=0, batch_max_files=1
    )


def _land_backlog(data_dir: Path) -> None:
    start = datetime(2026, 11, 20, tzinfo=UTC)
    for file in range(FILES):
        rows: list[dict[str, object]] = [
            {
                "ts": (start + timedelta(minutes=file * ROWS_PER_FILE + i)).isoformat(),
                "device_id": "d1",
                "sensor": "t",
                "value": float(i),
            }
            for i in range(ROWS_PER_FILE)
        ]
        land_records(data_dir, "readings", rows)


def _silver_keys(data_dir: Path) -> pl.DataFrame:
    return pl.read_delta(str(data_dir / "silver" / "readings")).select("device_id", "sensor", "ts")


def test_a_backlog_is_ingested_ahead_and_lands_exactly_once(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    ingest_next = BronzeIngestor.ingest_next

    def recording(self: BronzeIngestor, source: str) -> object:
        threads.append(threading.current_thread().name)
        return ingest_next(self, source)

    monkeypatch.setattr(BronzeIngestor, "ingest_next", recording)
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    report = Processor(backlog_settings, load_contracts()).run_once()
    assert not report.failures
    assert len([b for b in report.bronze if b.files]) == FILES
    assert any(name.startswith("bronze-ahead") for name in threads), threads
    keys = _silver_keys(data_dir)
    assert keys.height == FILES * ROWS_PER_FILE
    assert not keys.is_duplicated().any()
    bronze = pl.read_delta(str(data_dir / "bronze" / "readings"))
    assert bronze.height == FILES * ROWS_PER_FILE
    hourly = pl.read_delta(str(data_dir / "gold" / "readings_hourly"))
    assert hourly["count"].sum() == FILES * ROWS_PER_FILE
    assert not list((data_dir / "landing" / "readings").glob("*.parquet"))


def test_a_failure_ahead_is_reported_for_its_source_and_retried(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    commit_claim = BronzeIngestor._commit_claim

    def failing_once_ahead(self: BronzeIngestor, *args: object, **kwargs: object) -> object:
        calls.append(threading.current_thread().name)
        if calls[-1].startswith("bronze-ahead") and calls.count(calls[-1]) == 1:
            raise RuntimeError("disk hiccup while ingesting ahead")
        return commit_claim(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BronzeIngestor, "_commit_claim", failing_once_ahead)
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    processor = Processor(backlog_settings, load_contracts())
    first = processor.run_cycle()
    assert any("disk hiccup while ingesting ahead" in f for f in first.failures)
    processor.run_once()  # the failed claim is recovered, the rest drained
    keys = _silver_keys(data_dir)
    assert keys.height == FILES * ROWS_PER_FILE
    assert not keys.is_duplicated().any()
    assert pl.read_delta(str(data_dir / "bronze" / "readings")).height == FILES * ROWS_PER_FILE
