"""The processor in-process: recovery states, bad files, schema evolution, incremental gold."""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.bronze import BRONZE_APP_ID, with_lineage
from delta_processing.column_names import delta_safe_names
from delta_processing.processor import CycleReport, Processor, ProcessorLock, ProcessorLockedError
from delta_processing.silver import QUARANTINE_APP_ID, consumed_by_sinks
from delta_processing.tables import TableStore
from landing_zone.formats import decode_batch
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import reference_gold


def _ndjson(rows: list[dict[str, object]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in rows)


def _write(settings: Settings, rows: list[dict[str, object]]) -> str:
    writer = LandingWriter(LandingLayout(settings.data_dir))
    return writer.write_frame("readings", decode_batch(_ndjson(rows), "ndjson")).path.name


def _reading(minute: int, value: float, device: str = "d1", sensor: str = "t") -> dict[str, object]:
    ts = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(minutes=minute)
    return {"ts": ts.isoformat(), "device_id": device, "sensor": sensor, "value": value}


def _table(settings: Settings, layer: str, name: str = "readings") -> pl.DataFrame:
    return pl.read_delta(str(settings.data_dir / layer / name))


def _assert_gold_matches_silver(settings: Settings) -> None:
    silver = _table(settings, "silver")
    for name, reference in reference_gold(silver).items():
        keys = [c for c in ("device_id", "sensor", "window_start") if c in reference.columns]
        gold = _table(settings, "gold", name).sort(keys)
        assert_frame_equal(gold, reference.sort(keys), check_exact=False)


def test_claimed_batch_already_committed_is_archived_not_appended_again(
    settings: Settings,
) -> None:
    """Crash between the bronze commit and the archive move: recovery must not re-append."""
    processor = Processor(settings, load_contracts())
    name = _write(settings, [_reading(1, 1.0), _reading(2, 2.0)])
    processor.run_once()
    layout = LandingLayout(settings.data_dir)
    archived = next((settings.data_dir / "archive" / "readings").rglob(name))
    # Put the file back into a claim with the committed sequence, as a crash would leave it.
    claim = layout.inflight_dir("readings", 1)
    claim.mkdir(parents=True)
    os.rename(archived, claim / name)

    processor.run_once()

    bronze = _table(settings, "bronze")
    assert bronze.height == 2
    assert layout.inflight_batches("readings") == []
    assert next((settings.data_dir / "archive" / "readings").rglob(name)).is_file()


def test_claimed_batch_not_committed_is_appended_once(settings: Settings) -> None:
    """Crash between the claim and the bronze commit: recovery appends under the same seq."""
    layout = LandingLayout(settings.data_dir)
    name = _write(settings, [_reading(1, 1.0)])
    claim = layout.inflight_dir("readings", 1)
    claim.mkdir(parents=True)
    os.rename(layout.source_dir("readings") / name, claim / name)

    Processor(settings, load_contracts()).run_once()

    bronze_table = TableStore(settings.data_dir).open("bronze", "readings")
    assert bronze_table is not None
    assert bronze_table.transaction_version(BRONZE_APP_ID) == 1
    assert _table(settings, "bronze")["_landing_file"].to_list() == [name]
    assert _table(settings, "silver").height == 1


def test_unreadable_file_is_quarantined_with_an_error_file(settings: Settings) -> None:
    source_dir = LandingLayout(settings.data_dir).source_dir("readings")
    source_dir.mkdir(parents=True)
    (source_dir / "dropped.ndjson").write_bytes(b'{"ts": 1}\n{broken\n')
    (source_dir / "good.ndjson.gz").write_bytes(gzip.compress(_ndjson([_reading(5, 5.0)])))

    report = Processor(settings, load_contracts()).run_once()

    assert report.failures == []
    bad_dir = settings.data_dir / "quarantine" / "_files" / "readings"
    assert (bad_dir / "dropped.ndjson").read_bytes() == b'{"ts": 1}\n{broken\n'
    error = json.loads((bad_dir / "dropped.ndjson.error.json").read_text())
    assert error["file"] == "dropped.ndjson" and "line 2" in error["error"]
    assert _table(settings, "silver")["value"].to_list() == [5.0]
    assert list(source_dir.glob("*.*")) == []


def test_new_fields_widen_bronze_and_odd_names_are_made_delta_safe(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _write(settings, [_reading(1, 1.0)])
    processor.run_once()
    odd = {**_reading(2, 2.0), "battery level": 90, "_source": "spoofed", "Extra": {"a": [1]}}
    _write(settings, [odd])
    processor.run_once()

    bronze = _table(settings, "bronze").sort("_row", "_ingested_at")
    assert {"battery_level", "_source_1", "Extra"} <= set(bronze.columns)
    assert bronze["_source"].unique().to_list() == ["readings"]  # lineage not spoofable
    assert bronze["Extra"].drop_nulls().to_list() == ['{"a":[1]}']
    assert _table(settings, "silver").height == 2


def test_delta_safe_names_dedupes_case_insensitively_and_reserves_platform_columns() -> None:
    spellings = {"unit": "unit"}  # already in the table
    mapping = delta_safe_names(
        ["a b", "A_B", "x=1", "", "_row", "_Change_Type", "_reason", "Unit", "c\x00"], spellings
    )
    assert mapping == {
        "a b": "a_b",
        "A_B": "A_B_1",
        "x=1": "x_1",
        "": "_blank",
        "_row": "_row_1",
        "_Change_Type": "_Change_Type_1",
        "_reason": "_reason_1",
        "Unit": "unit",  # joins the existing column
        "c\x00": "c_",
    }
    # A later frame of the same batch reuses the spellings chosen so far.
    assert delta_safe_names(["A_b", "a_B_1"], spellings) == {"A_b": "a_b", "a_B_1": "A_B_1"}


def test_resent_and_updated_readings_keep_one_silver_row(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _write(settings, [_reading(1, 1.0), _reading(1, 1.0)])  # duplicate inside one batch
    processor.run_once()
    _write(settings, [_reading(1, 1.0)])  # re-sent
    _write(settings, [_reading(1, 7.0)])  # corrected later: latest arrival wins
    processor.run_once()
    silver = _table(settings, "silver")
    assert silver.select("value").to_series().to_list() == [7.0]
    _assert_gold_matches_silver(settings)


def test_contract_violations_go_to_quarantine_with_reasons(settings: Settings) -> None:
    rows: list[dict[str, object]] = [
        {"ts": "yesterday", "device_id": "d", "sensor": "s", "value": 1},
        {"ts": "2026-11-20T00:00:00Z", "device_id": "d", "sensor": "s", "value": "NaN"},
        {"ts": "2026-11-20T00:00:00Z", "sensor": "s", "value": 1},
        {"ts": "2026-11-20T00:00:00Z", "device_id": "d", "sensor": "s", "value": 3, "unit": "C"},
    ]
    _write(settings, rows)
    Processor(settings, load_contracts()).run_once()
    reasons = sorted(_table(settings, "quarantine")["_reason"].to_list())
    assert reasons == [
        "device_id: required field is missing",
        "ts: cannot parse 'yesterday' as timestamp",
        "value: cannot parse 'NaN' as float",
    ]
    assert _table(settings, "silver")["unit"].to_list() == ["C"]


def test_clean_batches_make_no_quarantine_commit_and_resume_exactly(settings: Settings) -> None:
    """A batch with nothing to quarantine records the quarantine's position in its
    quality commit instead of an empty quarantine commit; every sink still resumes at
    the right bronze version, and the next rejects land once."""
    processor = Processor(settings, load_contracts())
    store = TableStore(str(settings.data_dir))
    bad = {"ts": "never", "device_id": "d", "sensor": "s", "value": 1}

    def versions() -> tuple[int, int, int]:
        quarantine, quality = store.open("quarantine", "readings"), store.open("_meta", "quality")
        bronze = store.open("bronze", "readings")
        assert quarantine is not None and quality is not None and bronze is not None
        return bronze.version(), quarantine.version(), quality.version()

    _write(settings, [_reading(1, 1.0)])
    processor.run_once()  # the first batch creates the quarantine table, empty
    _, quarantine_at, quality_at = versions()
    for minute in range(2, 5):
        _write(settings, [_reading(minute, 1.0)])
        processor.run_once()
    bronze_at, quarantine_now, quality_now = versions()
    assert quarantine_now == quarantine_at  # three clean batches: no quarantine commit
    assert quality_now == quality_at + 3
    silver = store.open("silver", "readings")
    quarantine = store.open("quarantine", "readings")
    quality = store.open("_meta", "quality")
    assert consumed_by_sinks(silver, quarantine, quality, "readings") == {
        "quality": bronze_at,
        "quarantine": bronze_at,
        "silver": bronze_at,
    }
    assert quarantine is not None and quarantine.transaction_version(QUARANTINE_APP_ID) == 0

    _write(settings, [_reading(5, 1.0), bad])
    Processor(settings, load_contracts()).run_once()  # a new process: markers only
    assert _table(settings, "quarantine")["ts"].to_list() == ["never"]
    assert _table(settings, "silver").height == 5
    assert versions()[1] == quarantine_at + 1
    _assert_gold_matches_silver(settings)


def test_timestamps_in_every_accepted_spelling_are_stored_as_utc(settings: Settings) -> None:
    spellings = [
        "2026-11-20T10:00:00Z",
        "2026-11-20T11:00:00+01:00",
        "2026-11-20T10:00:00",
        "2026-11-20 10:00:00.000",
        "1795168800000",
    ]
    rows: list[dict[str, object]] = [
        {"ts": ts, "device_id": f"d{i}", "sensor": "s", "value": i}
        for i, ts in enumerate(spellings)
    ]
    _write(settings, rows)
    Processor(settings, load_contracts()).run_once()
    stored = _table(settings, "silver")["ts"].unique().to_list()
    assert stored == [datetime(2026, 11, 20, 10, tzinfo=UTC)]


def test_incremental_gold_equals_full_recomputation_over_random_arrivals(
    settings: Settings,
) -> None:
    """Random batches with duplicates, corrections and rows weeks late, processed in steps."""
    rng = random.Random(2026)
    processor = Processor(settings, load_contracts())
    for _step in range(8):
        for _batch in range(rng.randint(1, 3)):
            rows = [
                _reading(
                    rng.randint(0, 60 * 24 * 21),  # three weeks of event time
                    rng.choice([rng.uniform(-10, 40), 0.0]),
                    device=f"d{rng.randint(0, 3)}",
                    sensor=rng.choice(["t", "h"]),
                )
                for _ in range(rng.randint(1, 40))
            ]
            rows += rng.sample(rows, k=min(3, len(rows)))  # exact duplicates
            _write(settings, rows)
        report = processor.run_once()
        assert report.failures == []
        _assert_gold_matches_silver(settings)


def test_second_processor_on_the_same_data_dir_is_refused(settings: Settings) -> None:
    lock = ProcessorLock(settings.data_dir)
    lock.acquire()
    try:
        with pytest.raises(ProcessorLockedError, match="only one may run"):
            Processor(settings, load_contracts()).run_once()
    finally:
        lock.release()


def test_a_processor_waits_for_an_operation_holding_the_lock(settings: Settings) -> None:
    """A maintenance operation (`lakehouse optimize` from cron, say) holds the lock: a
    processor started meanwhile waits for it instead of exiting, then runs."""
    _write(settings, [_reading(1, 1.0)])
    operation = ProcessorLock(settings.data_dir, role="operation optimize")
    operation.acquire()
    outcome: list[object] = []
    runner = threading.Thread(
        target=lambda: outcome.append(Processor(settings, load_contracts()).run_once())
    )
    try:
        runner.start()
        runner.join(timeout=1.0)
        assert runner.is_alive() and outcome == []  # waiting, not refused
        assert ProcessorLock(settings.data_dir).holder() == "operation optimize"
    finally:
        operation.release()
    runner.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], CycleReport)
    assert outcome[0].did_work
    assert _table(settings, "silver").height == 1
    assert ProcessorLock(settings.data_dir).holder() == "processor"  # it held the lock


def test_a_processor_waiting_for_an_operation_still_stops_when_asked(
    settings: Settings,
) -> None:
    """SIGTERM (``stop``) reaches a processor that waits for an operation's lock."""
    operation = ProcessorLock(settings.data_dir, role="operation vacuum")
    operation.acquire()
    stop = threading.Event()
    runner = threading.Thread(
        target=Processor(settings, load_contracts()).run_forever, args=(stop,)
    )
    try:
        runner.start()
        runner.join(timeout=0.6)
        assert runner.is_alive()
        stop.set()
        runner.join(timeout=5)
        assert not runner.is_alive()
        assert ProcessorLock(settings.data_dir).holder() == "operation vacuum"
    finally:
        stop.set()
        operation.release()


def test_an_unreadable_lock_holder_counts_as_a_processor(settings: Settings) -> None:
    """A lock whose holder wrote no role (an older processor) refuses, after a few looks."""
    lock = ProcessorLock(settings.data_dir)
    lock.acquire()
    (settings.data_dir / "_meta" / "processor.lock").write_text("12345\n")
    try:
        with pytest.raises(ProcessorLockedError, match="another processor"):
            ProcessorLock(settings.data_dir).acquire(wait_for_operations=True)
    finally:
        lock.release()


def test_sources_without_a_contract_still_land_in_bronze(settings: Settings) -> None:
    source_dir = LandingLayout(settings.data_dir).source_dir("events")
    source_dir.mkdir(parents=True)
    (source_dir / "batch.csv").write_text("kind,count\nclick,3\n")
    Processor(settings, load_contracts()).run_once()
    assert _table(settings, "bronze", "events").select("kind", "count").rows() == [("click", "3")]
    assert not (settings.data_dir / "silver" / "events").exists()


def test_watcher_wakes_on_new_files_in_new_and_existing_source_dirs(settings: Settings) -> None:
    import threading

    from landing_zone.watcher import LandingWatcher

    layout = LandingLayout(settings.data_dir)
    layout.source_dir("readings").mkdir(parents=True)
    wake = threading.Event()
    watcher = LandingWatcher(layout.landing_root, wake)
    watcher.start()
    try:
        assert wake.wait(2)  # start-up wake: files may predate the watch
        wake.clear()
        (layout.source_dir("readings") / ".partial.tmp").write_text("{}")
        assert not wake.wait(0.5)  # hidden temp names never wake the processor
        _write(settings, [_reading(1, 1.0)])
        assert wake.wait(5)
        wake.clear()
        new_source = layout.source_dir("events")
        new_source.mkdir()
        assert wake.wait(5)  # a new source directory is watched from now on
        wake.clear()
        (new_source / "drop.csv").write_text("a\n1\n")
        assert wake.wait(5)
    finally:
        watcher.stop()


def test_sync_latest_commit_finds_every_added_file_even_in_encoded_partitions(
    tmp_path: Path,
) -> None:
    from deltalake import write_deltalake

    from delta_processing.tables import sync_latest_commit

    frame = pl.DataFrame({"part": ["a:b c", "ümlaut/x"], "v": [1, 2]})
    write_deltalake(str(tmp_path / "t"), frame.to_arrow(), partition_by=["part"])
    sync_latest_commit(str(tmp_path / "t"))  # raises if a path does not resolve
    sync_latest_commit(f"file://{tmp_path / 't'}/")
    sync_latest_commit("az://container/never-touched")  # remote: nothing to do


def test_hostile_field_names_never_block_a_source(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    _write(settings, [{**_reading(1, 1.0), "Unit": "C", "_change_type": "x", "\u0000": 1}])
    _write(settings, [{**_reading(2, 2.0), "unit": "F", "_REASON": "r", "_commit_version": 3}])
    assert processor.run_once().failures == []
    _write(settings, [{**_reading(3, 3.0), "UNIT": "K"}])
    assert processor.run_once().failures == []
    bronze = _table(settings, "bronze")
    # The contract's spelling wins, whatever case senders use.
    assert [c for c in bronze.columns if c.lower() == "unit"] == ["unit"]
    assert sorted(bronze["unit"].to_list()) == ["C", "F", "K"]
    assert sorted(_table(settings, "silver")["unit"].to_list()) == ["C", "F", "K"]
    assert {"_change_type_1", "_REASON_1", "_commit_version_1", "_"} <= set(bronze.columns)
    assert _table(settings, "silver").height == 3
    assert pl.read_delta(str(settings.data_dir / "gold" / "readings_hourly")).height == 1


def test_a_claim_that_keeps_failing_is_set_aside_and_the_source_moves_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Delta write fault no real input produces on demand: injected with a mock."""
    import delta_processing.bronze as bronze_module
    from delta_processing.bronze import MAX_CLAIM_ATTEMPTS

    real_append = bronze_module.append
    poisoned = _write(settings, [_reading(1, 1.0)])

    def failing_append(target, frame, marker, **kwargs):
        if poisoned in frame["_landing_file"].to_list():
            raise OSError("simulated storage fault")
        return real_append(target, frame, marker, **kwargs)

    monkeypatch.setattr(bronze_module, "append", failing_append)
    processor = Processor(settings, load_contracts())
    for _attempt in range(1, MAX_CLAIM_ATTEMPTS):
        report = processor.run_once()
        assert len(report.failures) == 1 and "simulated storage fault" in report.failures[0]
    assert processor.run_once().failures == []
    bad_dir = settings.data_dir / "quarantine" / "_files" / "readings"
    assert (bad_dir / poisoned).is_file()
    error = json.loads((bad_dir / f"{poisoned}.error.json").read_text())
    assert "simulated storage fault" in error["error"]
    # Later data flows again.
    _write(settings, [_reading(2, 2.0)])
    assert processor.run_once().failures == []
    assert _table(settings, "silver")["value"].to_list() == [2.0]


def test_files_dropped_twice_under_one_name_are_all_kept(settings: Settings) -> None:
    processor = Processor(settings, load_contracts())
    source_dir = LandingLayout(settings.data_dir).source_dir("readings")
    source_dir.mkdir(parents=True)
    for value in (1.0, 2.0):
        (source_dir / "export.ndjson").write_bytes(_ndjson([_reading(int(value), value)]))
        (source_dir / "broken.json").write_bytes(b"{not json")
        processor.run_once()
    archived = sorted(p.name for p in (settings.data_dir / "archive").rglob("*.ndjson"))
    assert archived == ["export.ndjson", "export~1.ndjson"]
    quarantined = sorted(
        p.name for p in (settings.data_dir / "quarantine" / "_files" / "readings").iterdir()
    )
    assert quarantined == [
        "broken.json",
        "broken.json.error.json",
        "broken~1.json",
        "broken~1.json.error.json",
    ]
    assert sorted(_table(settings, "silver")["value"].to_list()) == [1.0, 2.0]


def test_hand_dropped_files_keep_their_arrival_order(settings: Settings) -> None:
    """A later correction wins even when its file name sorts first."""
    import time

    source_dir = LandingLayout(settings.data_dir).source_dir("readings")
    source_dir.mkdir(parents=True)
    (source_dir / "z_first.ndjson").write_bytes(_ndjson([_reading(1, 1.0)]))
    time.sleep(0.05)
    (source_dir / "a_second.ndjson").write_bytes(_ndjson([_reading(1, 2.0)]))
    time.sleep(0.05)
    _write(settings, [_reading(1, 3.0)])  # an API batch after both: wins over both
    Processor(settings, load_contracts()).run_once()
    assert _table(settings, "silver")["value"].to_list() == [3.0]
    bronze = _table(settings, "bronze").sort("_file_order")
    assert bronze["_landing_file"].to_list()[:2] == ["z_first.ndjson", "a_second.ndjson"]
    archived = {p.name for p in (settings.data_dir / "archive").rglob("*.ndjson")}
    assert archived == {"z_first.ndjson", "a_second.ndjson"}


def test_review_regressions_case_retries_json_and_predicates(
    settings: Settings, tmp_path: Path
) -> None:
    """Wrong-cased fields, a retried record with a `unique` rule, an unparseable json
    field and a predicate that errors on the data: none may block the source."""
    contracts_dir = tmp_path / "contracts"
    contracts_dir.mkdir()
    (contracts_dir / "things.toml").write_text(
        'name = "things"\nkeys = ["id"]\nevent_time = "ts"\n'
        '[[fields]]\nname = "id"\ntype = "string"\n'
        '[[fields]]\nname = "ts"\ntype = "timestamp"\nrequired = true\n'
        '[[fields]]\nname = "code"\ntype = "string"\n'
        '[[fields]]\nname = "meta"\ntype = "json"\n'
        '[[expectations]]\nname = "one_id"\nkind = "unique"\ncolumn = "id"\n'
        '[[expectations]]\nname = "small_code"\nkind = "predicate"\n'
        'predicate = "CAST(code AS INTEGER) < 100"\n'
    )
    processor = Processor(settings, load_contracts(contracts_dir))
    writer = LandingWriter(LandingLayout(settings.data_dir))
    rows = [
        {"ID": "a", "TS": "2026-11-20T10:00:00Z", "code": "1"},
        {"id": "a", "ts": "2026-11-20T10:00:00Z", "code": "1"},  # client retry
        {"id": "b", "ts": "2026-11-20T10:00:00Z", "meta": "NaN"},
        {"id": "c", "ts": "2026-11-20T10:00:00Z", "code": "abc"},
    ]
    writer.write_frame("things", decode_batch(_ndjson(rows), "ndjson"))
    report = processor.run_once()
    assert report.failures == []
    assert _table(settings, "silver", "things")["id"].to_list() == ["a"]
    reasons = dict(_table(settings, "quarantine", "things").select("id", "_reason").iter_rows())
    assert reasons["b"] == "meta: cannot parse 'NaN' as json"
    assert reasons["c"].startswith("expectation small_code could not be evaluated:")


def test_a_file_still_being_copied_is_not_read_half_written(data_dir: Path) -> None:
    import time

    from config.settings import load_settings

    settings = load_settings(data_dir=data_dir, file_settle_ms=600)
    layout = LandingLayout(data_dir)
    source_dir = layout.source_dir("readings")
    source_dir.mkdir(parents=True)
    copying = source_dir / "big.ndjson"
    with copying.open("wb") as handle:  # a copy in progress: half a line so far
        handle.write(b'{"ts": "2026-11-20T10:00:00Z", "device_id": "d", "sen')
        handle.flush()
        assert layout.pending_files("readings", 0.6) == []
        assert layout.has_unsettled_files(0.6)
        api_file = _write(settings, [_reading(1, 1.0)])  # our writer's files need no settling
        assert [p.name for p in layout.pending_files("readings", 0.6)] == [api_file]
        handle.write(b'sor": "t", "value": 5}\n')
    started = time.monotonic()
    report = Processor(settings, load_contracts()).run_once()  # waits for the copy to settle
    assert time.monotonic() - started >= 0.5
    assert report.failures == []
    assert sorted(_table(settings, "silver")["value"].to_list()) == [1.0, 5.0]
    assert not list((settings.data_dir / "quarantine").rglob("big.ndjson"))


def test_bronze_batches_are_bounded_by_rows(data_dir: Path) -> None:
    """A backlog is taken in micro-batches of at most LAKEHOUSE_BATCH_MAX_ROWS rows
    (memory stays bounded), a larger single file alone, and nothing is left behind."""
    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor
    from tests.helpers import land_records

    def rows(start: int, n: int) -> list[dict[str, object]]:
        return [
            {"ts": f"2026-11-20T10:{i % 60:02d}:{i // 60:02d}Z", "device_id": "d", "sensor": "s",
             "value": float(i)}
            for i in range(start, start + n)
        ]  # fmt: skip

    for start, n in ((0, 10), (10, 10), (20, 25), (45, 3), (48, 3)):
        land_records(data_dir, "readings", rows(start, n))
    settings = load_settings(data_dir=data_dir, file_settle_ms=0, batch_max_rows=15)
    report = Processor(settings, load_contracts()).run_once()
    assert not report.failures
    assert [(b.files, b.rows) for b in report.bronze] == [(1, 10), (1, 10), (1, 25), (2, 6)]
    assert sum(r.upserted for r in report.silver) == 51


def test_run_once_reports_an_outage_of_any_of_its_cycles(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`process --once` sums its cycles; a cycle cut short by a storage outage must not
    vanish from the sum (it used to be dropped field by field)."""
    processor = Processor(settings, load_contracts())
    outage = CycleReport(failures=["readings: store down"], storage_unavailable=True)
    cycles = iter([outage, CycleReport()])  # the store is back for the second cycle
    monkeypatch.setattr(Processor, "run_cycle", lambda self: next(cycles))
    # A file still settling after the first cycle makes run_once take a second one.
    settling = iter([True, False])
    monkeypatch.setattr(LandingLayout, "has_unsettled_files", lambda self, s: next(settling))
    report = processor.run_once()
    assert next(cycles, None) is None  # both cycles ran
    assert report.storage_unavailable
    assert report.failures == ["readings: store down"]


def test_lineage_is_made_per_file_for_the_whole_batch_at_once() -> None:
    """Each record gets its own file's name, batch id, order and position in the file,
    whatever the files' columns, empty files included."""
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    files = [
        (pl.DataFrame({"x": ["1", "2"]}), "a1.parquet", 3),
        (pl.DataFrame(schema={"x": pl.String}), "empty.csv", 4),
        (pl.DataFrame({"y": ["3"]}), "b2.part.ndjson", None),
        (pl.DataFrame({"x": ["4", "5", "6"], "y": ["7", None, "8"]}), "c3.json.gz", 9),
    ]
    batch = with_lineage(files, "src", now)
    assert batch.columns == [
        "x", "y", "_source", "_landing_file", "_batch_id", "_row", "_ingested_at", "_file_order"
    ]  # fmt: skip
    assert batch.select(pl.exclude("_ingested_at")).rows() == [
        ("1", None, "src", "a1.parquet", "a1", 0, 3),
        ("2", None, "src", "a1.parquet", "a1", 1, 3),
        (None, "3", "src", "b2.part.ndjson", "b2", 0, None),
        ("4", "7", "src", "c3.json.gz", "c3", 0, 9),
        ("5", None, "src", "c3.json.gz", "c3", 1, 9),
        ("6", "8", "src", "c3.json.gz", "c3", 2, 9),
    ]
    assert batch.schema["_ingested_at"] == pl.Datetime("us", "UTC")
    assert batch["_ingested_at"].unique().to_list() == [now]
    assert with_lineage(files[1:2], "src", now).height == 0


def test_lineage_keeps_records_without_fields_in_their_own_files() -> None:
    """A file of ``{}`` records has rows but no columns; Polars' diagonal concatenation
    drops such rows, which lost them and shifted later rows onto the wrong file."""
    now = datetime(2026, 11, 23, 1, tzinfo=UTC)
    fieldless = decode_batch(b"{}\n{}", "ndjson")
    assert fieldless.shape == (2, 0)
    files = [
        (fieldless, "a.parquet", 1),
        (pl.DataFrame({"x": ["1"]}), "b.parquet", 2),
        (decode_batch(b"{}", "json"), "c.parquet", 3),
    ]
    batch = with_lineage(files, "src", now)
    assert batch.select("x", "_landing_file", "_row").rows() == [
        (None, "a.parquet", 0),
        (None, "a.parquet", 1),
        ("1", "b.parquet", 0),
        (None, "c.parquet", 0),
    ]


def test_records_without_fields_reach_bronze_and_quarantine(settings: Settings) -> None:
    """Acknowledged ``{}`` records are kept: in bronze with their lineage, then in
    quarantine (they miss the contract's required fields), none lost, none misfiled."""
    writer = LandingWriter(LandingLayout(settings.data_dir))
    names = [
        writer.write_frame("readings", decode_batch(body, "ndjson")).path.name
        for body in (b"{}", b"{}\n{}", _ndjson([_reading(1, 1.0), {}]), b"{}")
    ]
    Processor(settings, load_contracts()).run_once()
    bronze = _table(settings, "bronze").sort("_landing_file", "_row")
    assert bronze.select("_landing_file", "_row", "device_id").rows() == [
        (names[0], 0, None),
        (names[1], 0, None),
        (names[1], 1, None),
        (names[2], 0, "d1"),
        (names[2], 1, None),
        (names[3], 0, None),
    ]
    assert _table(settings, "silver")["device_id"].to_list() == ["d1"]
    quarantine = _table(settings, "quarantine")
    assert quarantine.height == 5
    assert quarantine["_reason"].str.contains("required field is missing").all()
