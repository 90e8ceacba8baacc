"""Bronze look-ahead: on a backlog the next micro-batch is ingested on a second thread
while the previous one goes through silver and gold; nothing is lost or doubled, and a
failure ahead is reported for its source and retried like any other."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.bronze import BronzeIngestor
from delta_processing.gold import GoldRefresher, gold_frame
from delta_processing.processor import Processor
from delta_processing.silver import SilverPromoter
from delta_processing.tables import TableStore
from tests.helpers import count_change_feed_reads, land_records

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


def _fail_on_call(
    monkeypatch: pytest.MonkeyPatch,
    owner: type,
    name: str,
    error: BaseException,
    *,
    call: int = 1,
    thread: str = "",
) -> list[str]:
    """Make ``owner.name`` raise ``error`` on its ``call``-th call from a thread whose
    name starts with ``thread``; returns the names of those calls' threads."""
    real = getattr(owner, name)
    calls: list[str] = []

    def failing(self: object, *args: object, **kwargs: object) -> object:
        current = threading.current_thread().name
        if current.startswith(thread):
            calls.append(current)
            if len(calls) == call:
                raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def test_a_backlog_is_ingested_ahead_and_lands_exactly_once(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    ingest_next = BronzeIngestor.ingest_next

    def recording(self: BronzeIngestor, source: str) -> object:
        threads.append(threading.current_thread().name)
        return ingest_next(self, source)

    monkeypatch.setattr(BronzeIngestor, "ingest_next", recording)
    feed_reads = count_change_feed_reads(monkeypatch)
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    report = Processor(backlog_settings, load_contracts()).run_once()
    assert not report.failures
    assert len([b for b in report.bronze if b.files]) == FILES
    assert any(name.startswith("bronze-ahead") for name in threads), threads
    # Silver took each bronze commit once, in order, from the rows handed over (bronze
    # being a batch ahead did not make it read the change feed).
    versions = [s.bronze_version for s in report.silver]
    assert versions == sorted(set(versions)) and len(versions) == FILES
    assert sum(s.rows_in for s in report.silver) == FILES * ROWS_PER_FILE
    assert feed_reads == []
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
    hiccup = RuntimeError("disk hiccup while ingesting ahead")
    _fail_on_call(monkeypatch, BronzeIngestor, "_commit_claim", hiccup, thread="bronze-ahead")
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    processor = Processor(backlog_settings, load_contracts())
    first = processor.run_cycle()
    assert any(f.startswith("readings: disk hiccup while ingesting ahead") for f in first.failures)
    processor.run_once()  # the failed claim is recovered, the rest drained
    keys = _silver_keys(data_dir)
    assert keys.height == FILES * ROWS_PER_FILE
    assert not keys.is_duplicated().any()
    assert pl.read_delta(str(data_dir / "bronze" / "readings")).height == FILES * ROWS_PER_FILE


def test_a_batch_ahead_of_a_failed_step_ends_with_its_cycle(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silver fails once while the next batch is being ingested ahead: that batch is
    reported by the cycle it ran in, and the next cycle starts clean (no stale result,
    no stale failure), and nothing is lost or doubled."""
    _fail_on_call(monkeypatch, SilverPromoter, "promote", RuntimeError("silver hiccup"))
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    processor = Processor(backlog_settings, load_contracts())
    first = processor.run_cycle()
    assert first.failures == ["readings: silver hiccup"]
    assert len([b for b in first.bronze if b.files]) == 2  # the failed step's and the one ahead
    second = processor.run_cycle()
    assert second.failures == [] and not second.storage_unavailable
    assert len([b for b in second.bronze if b.files]) == FILES - 2
    assert sum(s.rows_in for s in [*first.silver, *second.silver]) == FILES * ROWS_PER_FILE
    keys = _silver_keys(data_dir)
    assert keys.height == FILES * ROWS_PER_FILE


def test_gold_refreshes_behind_silver_at_the_version_it_was_asked_for(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gold's first refresh is held until silver has committed the next micro-batch:
    silver must go on meanwhile (gold runs on its own thread), the refresh must take in
    exactly the silver version it was asked for, and gold must end up complete."""
    settings = load_settings(
        data_dir=data_dir,
        trigger_latency_ms=0,
        file_settle_ms=0,
        batch_max_files=1,
        gold_catch_up_ms=0,  # a refresh after every micro-batch
    )
    store = TableStore(data_dir)

    def silver_version() -> int:
        silver = store.open("silver", "readings")
        return -1 if silver is None else silver.version()

    refresh = GoldRefresher.refresh
    seen: list[tuple[str, int | None, int]] = []  # thread, version asked for, silver then

    def held_first(self: GoldRefresher, *args: object, **kwargs: object) -> object:
        asked = kwargs.get("silver_version")  # None: inline, after the last batch
        assert isinstance(asked, int) or seen
        if not seen:
            assert isinstance(asked, int)
            deadline = time.monotonic() + 20
            while silver_version() <= asked and time.monotonic() < deadline:
                time.sleep(0.02)
        seen.append((threading.current_thread().name, asked, silver_version()))
        return refresh(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GoldRefresher, "refresh", held_first)
    _land_backlog(data_dir)
    report = Processor(settings, load_contracts()).run_once()

    assert not report.failures
    name, asked, silver_then = seen[0]
    assert name.startswith("gold-behind") and asked is not None and silver_then > asked, seen
    # The last batch left nothing to overlap with: its refresh ran on the main thread.
    assert seen[-1][:2] == ("MainThread", None), seen
    first = [r for r in report.gold if r.silver_version == asked]
    assert first and all(r.table.startswith("readings_") for r in first)
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    contract = load_contracts()["readings"]
    for spec in contract.gold:
        expected = gold_frame(silver, spec, contract)
        got = pl.read_delta(str(data_dir / "gold" / spec.name)).select(expected.columns)
        assert got.sort(got.columns).equals(expected.sort(expected.columns)), spec.name


class _Panic(BaseException):
    """Stands in for pyo3's PanicException, which derives from BaseException."""


def test_a_panic_behind_silver_is_one_source_failure_not_the_processors_end(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    panic = _Panic("deltalake panicked")
    panicked = _fail_on_call(monkeypatch, GoldRefresher, "refresh", panic, thread="gold-behind")
    # The source's step fails right after gold went behind: the cycle ends, and only its
    # drain meets the panic.
    hiccup = RuntimeError("silver hiccup")
    _fail_on_call(monkeypatch, SilverPromoter, "promote", hiccup, call=2)
    data_dir = backlog_settings.data_dir
    _land_backlog(data_dir)
    processor = Processor(backlog_settings, load_contracts())
    first = processor.run_cycle()  # used to raise out of the cycle's drain
    assert panicked and "readings: silver hiccup" in first.failures, first.failures
    assert any("deltalake panicked" in f for f in first.failures), first.failures
    assert processor.run_once().failures == []
    hourly = pl.read_delta(str(data_dir / "gold" / "readings_hourly"))
    assert hourly["count"].sum() == FILES * ROWS_PER_FILE


def test_a_failed_gold_refresh_keeps_its_batches_for_the_end_to_end_figure(
    backlog_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on_call(monkeypatch, GoldRefresher, "refresh", RuntimeError("gold hiccup"))
    _land_backlog(backlog_settings.data_dir)
    processor = Processor(backlog_settings, load_contracts())
    assert "readings: gold hiccup" in processor.run_cycle().failures
    assert processor.run_once().failures == []
    counts = [
        sample.value
        for metric in processor.metrics.end_to_end.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    ]
    assert counts == [FILES]  # every micro-batch, the failed refresh's included
