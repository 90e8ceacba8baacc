"""Maintenance: compaction keeps contents and change feed, survives racing appends; vacuum,
log cleanup and checkpoints keep what readers need."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, PostCommitHookProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.table import TableOptimizer

from delta_processing.maintenance import (
    MaintenancePolicy,
    apply_policy_properties,
    checkpoint_if_due,
    cleanup_log,
    compact,
    delta_interval,
    last_checkpoint_version,
    maintain,
    small_file_count,
    vacuum,
)
from delta_processing.retention import expire
from delta_processing.tables import (
    TableStore,
    append,
    commit_marker,
    read_changes,
    read_snapshot,
    to_arrow,
)

APP = "lakehouse/bronze"


def batch(start: int, size: int = 5) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": list(range(start, start + size)), "payload": [f"p{i}" for i in range(size)]}
    )


def ingest(uri: str, batches: int, *, size: int = 5, first_seq: int = 1) -> pl.DataFrame:
    """Bronze-style appends: one commit per batch, each recording its sequence."""
    frames = []
    for seq in range(first_seq, first_seq + batches):
        frame = batch(seq * 1000, size)
        append(uri, frame, commit_marker(APP, seq), cdf=True)
        frames.append(frame)
    return pl.concat(frames)


def rows(table: DeltaTable) -> Counter[tuple[object, ...]]:
    """The table's rows as a multiset."""
    frame = read_snapshot(table).collect().select("id", "payload")
    return Counter(frame.iter_rows())


def active_files(table: DeltaTable) -> set[str]:
    paths = pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()
    return {unquote(p) for p in paths}


def log_actions(uri: str, version: int) -> list[dict[str, dict[str, object]]]:
    entry = Path(uri) / "_delta_log" / f"{version:020d}.json"
    return [json.loads(line) for line in entry.read_text().splitlines() if line.strip()]


def operation(uri: str, version: int) -> object:
    """The operation of one commit, read from the log itself."""
    infos = [a["commitInfo"] for a in log_actions(uri, version) if "commitInfo" in a]
    return infos[0]["operation"]


# (1) ------------------------------------------------------------------------


def test_compaction_packs_small_files_keeping_every_row(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    written = ingest(uri, 20)
    table = DeltaTable(uri)
    before, version = rows(table), table.version()
    assert len(table.file_uris()) == 20

    result = compact(table, MaintenancePolicy())

    assert result.ran and result.attempts == 1
    assert (result.files_removed, result.files_added) == (20, 1)
    assert result.version == version + 1 == DeltaTable(uri).version()
    assert len(DeltaTable(uri).file_uris()) == 1
    assert rows(DeltaTable(uri)) == before == Counter(written.iter_rows())
    # The commit only rearranges data; the pipeline's own marker is untouched.
    actions = log_actions(uri, result.version)
    assert operation(uri, result.version) == "OPTIMIZE"
    changed = [a[kind] for a in actions for kind in ("add", "remove") if kind in a]
    assert len(changed) == 21 and all(a["dataChange"] is False for a in changed)
    assert DeltaTable(uri).transaction_version(APP) == 20
    # Idempotent: nothing left to pack, no commit.
    again = compact(DeltaTable(uri), MaintenancePolicy())
    assert not again.ran and DeltaTable(uri).version() == result.version


def test_compaction_waits_for_enough_small_files(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    ingest(uri, 5)
    table = DeltaTable(uri)
    version = table.version()

    result = compact(table, MaintenancePolicy(min_files_to_compact=8))

    assert (result.ran, result.small_files, result.attempts) == (False, 5, 0)
    assert DeltaTable(uri).version() == version
    # Files at or above the target size are not "small".
    assert small_file_count(table, target_size=1) == 0


def test_small_files_are_counted_per_partition(tmp_path: Path) -> None:
    uri = str(tmp_path / "parted")
    for part in ["a", "a", "a", "b"]:
        write_deltalake(uri, to_arrow(batch(0).with_columns(p=pl.lit(part))), mode="append",
                        partition_by=["p"])  # fmt: skip
    table = DeltaTable(uri)
    # The lone file of partition b cannot be packed with anything.
    assert small_file_count(table, 128 << 20) == 3
    assert small_file_count(table, 128 << 20, [("p", "=", "b")]) == 0
    result = compact(
        table, MaintenancePolicy(min_files_to_compact=2), partition_filters=[("p", "=", "a")]
    )
    assert (result.files_removed, result.files_added) == (3, 1)
    assert len(DeltaTable(uri).file_uris()) == 2


def test_zorder_rewrites_files_and_rejects_unknown_columns(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    written = ingest(uri, 3)
    result = compact(DeltaTable(uri), MaintenancePolicy(), zorder=["payload", "id"])
    assert result.ran and result.zorder == ("payload", "id")
    assert rows(DeltaTable(uri)) == Counter(written.iter_rows())
    assert read_changes(DeltaTable(uri), result.version, result.version).is_empty()
    with pytest.raises(DeltaError, match="nope"):
        compact(DeltaTable(uri), MaintenancePolicy(), zorder=["nope"])


# (2) ------------------------------------------------------------------------


def test_change_feed_has_no_rows_for_optimize_and_consumers_see_each_row_once(
    tmp_path: Path,
) -> None:
    uri = str(tmp_path / "bronze")
    early = ingest(uri, 10)
    consumed = DeltaTable(uri).version()  # a silver-style consumer has read up to here
    late = [ingest(uri, 10, first_seq=11)]
    assert maintain(TableStore(tmp_path), "bronze", "absent", MaintenancePolicy()) is None
    optimized = compact(DeltaTable(uri), MaintenancePolicy(min_files_to_compact=2))
    assert optimized.version is not None
    late.append(ingest(uri, 3, first_seq=21))
    latest = DeltaTable(uri).version()

    assert read_changes(DeltaTable(uri), optimized.version, optimized.version).is_empty()
    changes = read_changes(DeltaTable(uri), consumed + 1, latest)
    assert set(changes["_change_type"]) == {"insert"}
    assert optimized.version not in set(changes["_commit_version"])
    seen = Counter(changes.select("id", "payload").iter_rows())
    assert seen == Counter(pl.concat(late).iter_rows())
    assert max(seen.values()) == 1
    # Reading everything from the first version also sees each row exactly once.
    everything = read_changes(DeltaTable(uri), 0, latest).select("id", "payload")
    assert Counter(everything.iter_rows()) == Counter(pl.concat([early, *late]).iter_rows())


def test_change_feed_of_merged_table_survives_compaction_and_policy_commits(
    tmp_path: Path,
) -> None:
    """Silver is written by MERGE (update pre/post images); gold reads those."""
    store = TableStore(tmp_path)
    uri = store.uri("silver", "readings")
    ingest(uri, 8)
    table = DeltaTable(uri)
    start = table.version() + 1
    table.merge(
        to_arrow(pl.DataFrame({"id": [1000, 2000], "payload": ["new", "new"]})),
        predicate="t.id = s.id",
        source_alias="s",
        target_alias="t",
    ).when_matched_update_all().execute()
    report = maintain(store, "silver", "readings", MaintenancePolicy(min_files_to_compact=2))

    assert report is not None and report.properties_updated and report.compaction.ran
    changes = read_changes(DeltaTable(uri), start, DeltaTable(uri).version())
    assert sorted(changes["_change_type"]) == ["update_postimage"] * 2 + ["update_preimage"] * 2
    assert DeltaTable(uri).transaction_version(APP) == 8


# (3) ------------------------------------------------------------------------


def test_compaction_racing_ingestion_loses_no_commit_and_no_row(tmp_path: Path) -> None:
    """One thread appends bronze-style batches (some evolving the schema, which
    conflicts with OPTIMIZE), another compacts in a loop."""
    uri = str(tmp_path / "bronze")
    ingest(uri, 1)
    batches = 150
    policy = MaintenancePolicy(min_files_to_compact=2, max_commit_attempts=10)
    done = threading.Event()
    append_errors: list[BaseException] = []
    compact_errors: list[BaseException] = []
    results = []

    def ingestion() -> None:
        try:
            for seq in range(2, batches + 2):
                frame = batch(seq * 1000)
                if seq % 10 == 0:  # a new field arrives: a metadata change
                    frame = frame.with_columns(pl.lit(seq).alias(f"extra_{seq}"))
                try:
                    append(uri, frame, commit_marker(APP, seq), evolve_schema=True)
                except BaseException as exc:
                    append_errors.append(exc)
        finally:
            done.set()

    def compaction() -> None:
        while not done.is_set():
            try:
                results.append(compact(DeltaTable(uri), policy))
            except BaseException as exc:
                compact_errors.append(exc)

    threads = [threading.Thread(target=ingestion), threading.Thread(target=compaction)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)

    ran = [r for r in results if r.ran]
    retried = [r for r in ran if r.attempts > 1]
    attempts = [r.attempts for r in retried]
    print(f"\nrace: {batches} appends, {len(ran)} compactions, {len(retried)} retried {attempts}")
    assert append_errors == []
    assert compact_errors == []
    assert ran, "the compaction never overlapped the ingestion"

    table = DeltaTable(uri)
    expected = Counter(
        i for seq in range(1, batches + 2) for i in range(seq * 1000, seq * 1000 + 5)
    )
    assert Counter(read_snapshot(table).collect()["id"].to_list()) == expected
    assert table.transaction_version(APP) == batches + 1
    # Each reported version is that compaction's own OPTIMIZE commit, per the log.
    assert all(operation(uri, r.version) == "OPTIMIZE" for r in ran)
    assert len({r.version for r in ran}) == len(ran)
    # A consumer of the change feed across the whole race sees each row once.
    inserted = read_changes(table, 0, table.version())
    assert set(inserted["_change_type"]) == {"insert"}
    assert Counter(inserted["id"].to_list()) == expected


# (4) ------------------------------------------------------------------------


def test_vacuum_deletes_only_unreferenced_files_past_retention(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    written = ingest(uri, 6)
    table = DeltaTable(uri)
    small_files = active_files(table)
    optimized = compact(table, MaintenancePolicy(min_files_to_compact=2))
    assert optimized.version is not None
    active = active_files(DeltaTable(uri))
    orphan = Path(uri) / "part-00000-orphan-c000.snappy.parquet"  # never in the log
    orphan.write_bytes(b"not parquet")

    # Within retention (default 7 days, or 1 hour): nothing qualifies.
    assert vacuum(DeltaTable(uri), MaintenancePolicy(), dry_run=True) == []
    one_hour = MaintenancePolicy(vacuum_retention=timedelta(hours=1))
    assert vacuum(DeltaTable(uri), one_hour, dry_run=True, allow_below_table_minimum=True) == []
    # Below the table's minimum only on explicit request.
    zero = MaintenancePolicy(vacuum_retention=timedelta(0))
    with pytest.raises(DeltaError, match="retention"):
        vacuum(DeltaTable(uri), zero, dry_run=True)
    # Forever: never.
    assert vacuum(DeltaTable(uri), MaintenancePolicy(vacuum_retention=None), dry_run=False) == []

    listed = vacuum(DeltaTable(uri), zero, dry_run=True, allow_below_table_minimum=True)
    assert set(listed) == small_files and not set(listed) & active
    assert all((Path(uri) / p).exists() for p in listed)
    version = DeltaTable(uri).version()

    deleted = vacuum(DeltaTable(uri), zero, dry_run=False, allow_below_table_minimum=True)

    assert set(deleted) == small_files
    assert not any((Path(uri) / p).exists() for p in deleted)
    assert orphan.exists()
    assert all((Path(uri) / p).exists() for p in active)
    assert rows(DeltaTable(uri)) == Counter(written.iter_rows())
    # deltalake would list the deleted files again and commit twice; we do neither.
    after = DeltaTable(uri).version()
    assert after > version
    assert vacuum(DeltaTable(uri), zero, dry_run=False, allow_below_table_minimum=True) == []
    assert DeltaTable(uri).version() == after


def test_vacuum_keeps_files_a_lagging_change_feed_consumer_needs(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    ingest(uri, 6)
    lagging_from = 3  # a consumer has read versions 0..2 only
    compact(DeltaTable(uri), MaintenancePolicy(min_files_to_compact=2))
    zero = MaintenancePolicy(vacuum_retention=timedelta(0))

    kept = vacuum(DeltaTable(uri), zero, dry_run=False, allow_below_table_minimum=True,
                  keep_from_version=lagging_from)  # fmt: skip

    latest = DeltaTable(uri).version()
    assert len(read_changes(DeltaTable(uri), lagging_from, latest)) == 3 * 5
    # Whole snapshots from there on are kept: here every file compacted away.
    assert kept == []
    # Without it the consumer's change feed is gone for good.
    vacuum(DeltaTable(uri), zero, dry_run=False, allow_below_table_minimum=True)
    with pytest.raises(BaseException, match="not found"):
        read_changes(DeltaTable(uri), lagging_from, DeltaTable(uri).version())


# (5) ------------------------------------------------------------------------


def _bare_append(uri: str, seq: int) -> None:
    """An append whose post-commit hook writes no checkpoint."""
    no_checkpoint = PostCommitHookProperties(create_checkpoint=False)
    write_deltalake(
        uri, to_arrow(batch(seq)), mode="append", post_commithook_properties=no_checkpoint
    )


def test_checkpoint_written_at_the_interval(tmp_path: Path) -> None:
    """Every 5 commits (versions 4, 9, ... as deltalake's hook), or when 5 behind."""
    uri = str(tmp_path / "t")
    policy = MaintenancePolicy(checkpoint_interval=5)
    for seq in range(4):  # versions 0..3
        _bare_append(uri, seq)
    assert not checkpoint_if_due(DeltaTable(uri), policy)
    _bare_append(uri, 4)  # version 4: the fifth commit
    assert last_checkpoint_version(DeltaTable(uri)) is None
    assert checkpoint_if_due(DeltaTable(uri), policy)
    assert last_checkpoint_version(DeltaTable(uri)) == 4
    assert (Path(uri) / "_delta_log" / f"{4:020d}.checkpoint.parquet").exists()
    assert not checkpoint_if_due(DeltaTable(uri), policy)
    for seq in range(5, 9):  # version 8: four behind, not on the schedule
        _bare_append(uri, seq)
    assert not checkpoint_if_due(DeltaTable(uri), policy)
    for seq in range(9, 12):  # version 11: the scheduled one (9) was missed
        _bare_append(uri, seq)
    assert checkpoint_if_due(DeltaTable(uri), policy)
    assert last_checkpoint_version(DeltaTable(uri)) == 11
    assert len(read_snapshot(DeltaTable(uri)).collect()) == 12 * 5


def test_maintain_hands_checkpoints_to_the_commit_hook_and_owns_log_cleanup(
    tmp_path: Path,
) -> None:
    store = TableStore(tmp_path)
    uri = store.uri("bronze", "readings")
    ingest(uri, 3)
    policy = MaintenancePolicy(checkpoint_interval=4, log_retention=timedelta(days=1))

    report = maintain(store, "bronze", "readings", policy)

    assert report is not None and report.properties_updated and not report.compaction.ran
    config = DeltaTable(uri).metadata().configuration
    assert config["delta.checkpointInterval"] == "4"
    assert config["delta.enableExpiredLogCleanup"] == "false"
    assert config["delta.logRetentionDuration"] == "interval 1 days"
    assert config["delta.deletedFileRetentionDuration"] == "interval 7 days"
    # Version 3 is the policy commit; deltalake's hook checkpoints at 3, 7, 11, ...
    assert report.version == 3 and last_checkpoint_version(DeltaTable(uri)) == 3
    ingest(uri, 5, first_seq=4)  # versions 4..8
    assert last_checkpoint_version(DeltaTable(uri)) == 7
    assert not checkpoint_if_due(DeltaTable(uri), policy)
    again = maintain(store, "bronze", "readings", policy)
    assert again is not None and not again.properties_updated and again.log_files_removed == 0

    # Every entry is now expired, yet the hook deletes none of them at checkpoints ...
    expired = MaintenancePolicy(checkpoint_interval=4, log_retention=timedelta(0))
    assert apply_policy_properties(DeltaTable(uri), expired)  # version 9
    ingest(uri, 4, first_seq=9)  # versions 10..13
    assert last_checkpoint_version(DeltaTable(uri)) == 11
    assert (Path(uri) / "_delta_log" / f"{0:020d}.json").exists()
    # ... a lagging change-feed consumer holds cleanup_log back ...
    assert cleanup_log(DeltaTable(uri), expired, keep_from_version=2) == 0
    # ... otherwise entries before the checkpoint go, and the table still reads.
    assert cleanup_log(DeltaTable(uri), expired) == 11 + 2  # 0..10.json, checkpoints 3, 7
    assert sorted(p.name for p in (Path(uri) / "_delta_log").glob("0*"))[0].startswith(f"{11:020d}")
    assert len(read_snapshot(DeltaTable(uri)).collect()) == 12 * 5
    assert DeltaTable(uri).transaction_version(APP) == 12
    assert len(read_changes(DeltaTable(uri), 11, 13)) == 3 * 5
    # Keep the log forever: nothing is ever removed.
    assert cleanup_log(DeltaTable(uri), MaintenancePolicy(log_retention=None)) == 0


# Row retention ---------------------------------------------------------------


def test_expired_bronze_rows_go_without_reaching_silver_style_consumers(tmp_path: Path) -> None:
    uri = str(tmp_path / "bronze")
    now = datetime(2026, 6, 1, tzinfo=UTC)
    ages = [timedelta(days=d) for d in (45, 31, 29, 1)]
    frame = pl.DataFrame({"id": [1, 2, 3, 4], "_ingested_at": [now - a for a in ages]})
    append(uri, frame.with_columns(pl.col("_ingested_at").dt.cast_time_unit("us")),
           commit_marker(APP, 1), cdf=True)  # fmt: skip
    consumed = DeltaTable(uri).version()
    cutoff = now - timedelta(days=30)

    assert expire(DeltaTable(uri), "_ingested_at", cutoff) == 2

    assert sorted(read_snapshot(DeltaTable(uri)).collect()["id"]) == [3, 4]
    changes = read_changes(DeltaTable(uri), consumed + 1, DeltaTable(uri).version())
    assert changes.filter(pl.col("_change_type") == "insert").is_empty()
    assert sorted(changes.filter(pl.col("_change_type") == "delete")["id"]) == [1, 2]
    assert expire(DeltaTable(uri), "_ingested_at", cutoff) == 0


def test_policy_validation_and_intervals() -> None:
    assert delta_interval(timedelta(days=7)) == "interval 7 days"
    assert delta_interval(timedelta(hours=1, milliseconds=1)) == "interval 3601 seconds"
    assert delta_interval(timedelta(0)) == "interval 0 seconds"
    with pytest.raises(ValueError, match="min_files_to_compact"):
        MaintenancePolicy(min_files_to_compact=1)
    with pytest.raises(ValueError, match="vacuum_retention"):
        MaintenancePolicy(vacuum_retention=timedelta(hours=-1))


def test_compaction_retries_a_lost_commit_race_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "bronze")
    written = ingest(uri, 4)
    real = TableOptimizer.compact
    failures = {"left": 2}

    def losing(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise CommitFailedError("Metadata changed since last commit.")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TableOptimizer, "compact", losing)
    policy = MaintenancePolicy(min_files_to_compact=2, max_commit_attempts=3)

    result = compact(DeltaTable(uri), policy)

    assert result.ran and result.attempts == 3
    assert rows(DeltaTable(uri)) == Counter(written.iter_rows())
    failures["left"] = 3
    ingest(uri, 2, first_seq=5)
    with pytest.raises(CommitFailedError):
        compact(DeltaTable(uri), policy)


def test_processor_housekeeping_and_the_optimize_and_vacuum_commands(tmp_path: Path) -> None:
    import json
    import subprocess

    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter
    from tests.helpers import LAKEHOUSE, REPO, lakehouse_env

    data_dir = tmp_path / "dados"
    settings = load_settings(data_dir=data_dir)
    processor = Processor(settings, load_contracts())
    writer = LandingWriter(LandingLayout(data_dir))
    for i in range(12):  # twelve micro-batches: twelve small bronze files
        row = {"ts": f"2026-11-20T10:{i:02d}:00Z", "device_id": "d", "sensor": "s", "value": i}
        writer.write_frame("readings", pl.DataFrame([row]).cast(pl.String))
        processor.run_once()
    bronze_files = len(DeltaTable(str(data_dir / "bronze" / "readings")).file_uris())
    assert bronze_files == 12
    processor.housekeeping()
    assert len(DeltaTable(str(data_dir / "bronze" / "readings")).file_uris()) == 1
    assert pl.read_delta(str(data_dir / "silver" / "readings")).height == 12

    env = lakehouse_env(data_dir)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LAKEHOUSE, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    optimized = cli("optimize", "gold/readings_hourly", "--zorder", "device_id")
    assert optimized.returncode == 0, optimized.stderr
    assert "gold/readings_hourly:" in optimized.stdout
    dry = cli("vacuum", "bronze/readings", "--dry-run")
    assert dry.returncode == 0 and "bronze/readings: would delete 0 file(s)" in dry.stdout
    assert cli("optimize").returncode == 0
    assert cli("vacuum", "nowhere/x").returncode == 2
    assert json.loads(cli("sql", "SELECT count(*) AS n FROM silver.readings", "-f", "json")
                      .stdout) == [{"n": 12}]  # fmt: skip


def test_the_log_retention_setting_reaches_the_policy(tmp_path: Path) -> None:
    """The processor's log cleanup keeps a short log by default: deltalake lists the
    whole log on every commit, so a month of entries (Delta's default) would slow every
    commit of a table that commits several times a second."""
    from config.settings import load_settings
    from delta_processing.maintenance import policy_for

    assert policy_for(load_settings(data_dir=tmp_path)).log_retention == timedelta(hours=1)
    custom = load_settings(data_dir=tmp_path, log_retention_hours=0.25)
    assert policy_for(custom).log_retention == timedelta(minutes=15)
    assert delta_interval(timedelta(minutes=15)) == "interval 900 seconds"
