"""Table maintenance: compaction, checkpoints, log cleanup, vacuum and row retention.

Invariants protected here:

* **Maintenance never changes what a table contains, nor what its change data
  feed reports.** Compaction (``OPTIMIZE``) rewrites files with
  ``dataChange=false``; the change data feed that silver and gold consume
  yields no rows for such a commit, so no downstream row is lost or repeated.
* **Maintenance never makes a pipeline commit fail.** :func:`maintain` is
  meant to run in the processor's own thread, between micro-batches, so it
  never races the pipeline's commits. When :func:`compact` does race other
  writers (``lakehouse optimize`` beside a running processor), a conflict makes
  *the compaction* fail and retry, never the other commit: in deltalake 1.6 an
  ``OPTIMIZE`` and concurrent blind appends both succeed, while a concurrent
  schema change or MERGE makes the ``OPTIMIZE`` commit fail (and the MERGE may
  fail too, which is why compaction of MERGE-written tables belongs in the
  processor thread).
* **Nothing a reader may still need is deleted.** :func:`vacuum` never uses a
  retention shorter than the policy's, and deltalake's own minimum (the table's
  ``delta.deletedFileRetentionDuration``) is only bypassed on explicit request.
  :func:`vacuum` and :func:`cleanup_log` accept ``keep_from_version``: the first
  version a lagging change-feed consumer still has to read, whose files and log
  entries are then kept.
* **A maintenance commit is as durable as a pipeline commit**: the files a
  compaction adds, its log entry and new checkpoints are fsynced, as
  :func:`~delta_processing.tables.sync_commit` does for pipeline commits.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs
import structlog
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError

from config.settings import Settings
from delta_processing.tables import (
    Layer,
    TableStore,
    as_pyarrow,
    checkpoint_files,
    commit_entry,
    fsync_file,
    local_root,
    reopen,
    sync_commit,
    table_filesystem,
)
from landing_zone.layout import fsync_directory

MiB = 1024 * 1024
# Marks commits written by maintenance (``commitInfo`` custom metadata).
MAINTENANCE_KEY = "lakehouse.maintenance"
# A unique id per maintenance commit, to find its version among concurrent commits.
RUN_KEY = "lakehouse.maintenance_run"
# deltalake's filter type for partition columns: [(column, op, value), ...].
PartitionFilters = list[tuple[str, str, Any]]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MaintenancePolicy:
    """How one table is maintained.

    ``vacuum_retention`` is how long files no longer in the table are kept (time
    travel, slow readers); ``None`` keeps them forever. ``log_retention`` is how
    long log entries are kept once a newer checkpoint exists; ``None`` keeps
    them forever. Row retention is :mod:`delta_processing.retention`'s job.
    """

    target_file_size: int = 128 * MiB
    min_files_to_compact: int = 8
    checkpoint_interval: int = 100
    vacuum_retention: timedelta | None = timedelta(days=7)
    log_retention: timedelta | None = timedelta(days=30)
    max_commit_attempts: int = 5

    def __post_init__(self) -> None:
        if self.target_file_size <= 0:
            raise ValueError("target_file_size must be positive")
        if self.min_files_to_compact < 2:
            raise ValueError("min_files_to_compact must be at least 2 (one file is never packed)")
        if self.checkpoint_interval <= 0:
            raise ValueError("checkpoint_interval must be positive")
        if self.max_commit_attempts <= 0:
            raise ValueError("max_commit_attempts must be positive")
        for name in ("vacuum_retention", "log_retention"):
            value = getattr(self, name)
            if value is not None and value < timedelta(0):
                raise ValueError(f"{name} must not be negative")


def policy_for(settings: Settings) -> MaintenancePolicy:
    """The maintenance policy configured for every table (``LAKEHOUSE_*`` settings)."""
    return MaintenancePolicy(
        target_file_size=settings.compaction_target_mb * MiB,
        checkpoint_interval=settings.checkpoint_interval,
        vacuum_retention=timedelta(days=settings.vacuum_retention_days),
        log_retention=timedelta(hours=settings.log_retention_hours),
    )


@dataclass(frozen=True)
class CompactionResult:
    """What one :func:`compact` call did.

    ``small_files`` counts the files it could pack (smaller than the target,
    with at least one other small file in the same partition) when it looked;
    ``attempts`` counts commit attempts (more than one: it lost a race and
    retried); ``version`` is the ``OPTIMIZE`` commit, ``None`` if nothing ran.
    """

    ran: bool
    small_files: int
    files_removed: int = 0
    files_added: int = 0
    version: int | None = None
    attempts: int = 0
    zorder: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaintenanceReport:
    """What :func:`maintain` did to one table."""

    layer: Layer
    name: str
    version: int
    properties_updated: bool
    compaction: CompactionResult
    checkpointed: bool
    log_files_removed: int


def compact(
    table: DeltaTable,
    policy: MaintenancePolicy,
    *,
    zorder: list[str] | None = None,
    partition_filters: PartitionFilters | None = None,
) -> CompactionResult:
    """Bin-pack small files into files of about ``policy.target_file_size`` bytes.

    Protects the table's contents and change feed (the commit is
    ``dataChange=false``) and concurrent writers' commits: on a commit conflict
    the compaction itself is re-planned against the new table version and
    retried, up to ``policy.max_commit_attempts`` times, then the conflict is
    raised. Plain compaction is skipped while fewer than
    ``policy.min_files_to_compact`` files can be packed; ``zorder`` always
    runs (it rewrites every file it selects, however large).
    """
    columns = tuple(zorder or ())
    for attempt in range(1, policy.max_commit_attempts + 1):
        table.update_incremental()
        read_version = table.version()
        small = small_file_count(table, policy.target_file_size, partition_filters)
        if not columns and small < policy.min_files_to_compact:
            return CompactionResult(ran=False, small_files=small, attempts=attempt - 1)
        marker, run = _maintenance_commit("optimize")
        try:
            if columns:
                metrics = table.optimize.z_order(
                    columns,
                    partition_filters=partition_filters,
                    target_size=policy.target_file_size,
                    commit_properties=marker,
                )
            else:
                metrics = table.optimize.compact(
                    partition_filters=partition_filters,
                    target_size=policy.target_file_size,
                    commit_properties=marker,
                )
        except CommitFailedError as exc:
            if attempt == policy.max_commit_attempts:
                raise
            log.warning("maintenance.compact_conflict", table=table.table_uri,
                        attempt=attempt, error=str(exc).splitlines()[0])  # fmt: skip
            time.sleep(0.02 * attempt)
            continue
        removed = int(metrics["numFilesRemoved"])
        version = committed_version(table, read_version, run) if removed else None
        if version is not None:
            sync_commit(table, version)
        result = CompactionResult(
            ran=removed > 0,
            small_files=small,
            files_removed=removed,
            files_added=int(metrics["numFilesAdded"]),
            version=version,
            attempts=attempt,
            zorder=columns,
        )
        log.info("maintenance.compacted", table=table.table_uri, **result.__dict__)
        return result
    raise AssertionError("unreachable: the last attempt returns or raises")


def small_file_count(
    table: DeltaTable, target_size: int, partition_filters: PartitionFilters | None = None
) -> int:
    """Files below ``target_size`` that share their partition with another such file.

    Only those can be bin-packed: a lone small file in its partition stays as it is.
    """
    actions = as_pyarrow(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    partition_columns = [n for n in actions.column_names if n.startswith("partition.")]
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    partitions = list(zip(*(actions.column(c).to_pylist() for c in partition_columns), strict=True))
    if not partitions:
        partitions = [()] * len(paths)
    selected: set[str] | None = None
    if partition_filters:
        selected = {
            _file_name(uri) for uri in table.file_uris(file_pruning_predicate=partition_filters)
        }
    per_partition: Counter[tuple[Any, ...]] = Counter(
        partition
        for path, size, partition in zip(paths, sizes, partitions, strict=True)
        if size < target_size and (selected is None or _file_name(path) in selected)
    )
    return sum(count for count in per_partition.values() if count >= 2)


def apply_policy_properties(table: DeltaTable, policy: MaintenancePolicy) -> bool:
    """Record the policy in the table's own properties; True if a commit was needed.

    Protects the policy from deltalake's post-commit hooks, which checkpoint every
    ``delta.checkpointInterval`` commits and, by default, delete expired log
    entries at every checkpoint using ``delta.logRetentionDuration``. Automatic
    log cleanup is switched off so that only :func:`cleanup_log`, which can keep
    what a lagging change-feed consumer needs, deletes log entries. The vacuum
    minimum (``delta.deletedFileRetentionDuration``) follows the policy too, so
    other Delta engines respect it.

    This is a metadata commit: it conflicts with concurrent writers, so call it
    where no other commit runs (the processor thread).
    """
    wanted = {
        "delta.checkpointInterval": str(policy.checkpoint_interval),
        "delta.enableExpiredLogCleanup": "false",
    }
    if policy.log_retention is not None:
        wanted["delta.logRetentionDuration"] = delta_interval(policy.log_retention)
    if policy.vacuum_retention is not None:
        wanted["delta.deletedFileRetentionDuration"] = delta_interval(policy.vacuum_retention)
    current = table.metadata().configuration
    changed = {key: value for key, value in wanted.items() if current.get(key) != value}
    if not changed:
        return False
    read_version = table.version()
    marker, run = _maintenance_commit("policy")
    table.alter.set_table_properties(changed, commit_properties=marker)
    sync_commit(table, committed_version(table, read_version, run))
    return True


def delta_interval(duration: timedelta) -> str:
    """A Delta interval string (``interval 7 days``), rounded up to whole seconds."""
    seconds = math.ceil(duration.total_seconds())
    if seconds and seconds % 86400 == 0:
        return f"interval {seconds // 86400} days"
    return f"interval {seconds} seconds"


def checkpoint_if_due(table: DeltaTable, policy: MaintenancePolicy) -> bool:
    """Write a checkpoint when ``policy.checkpoint_interval`` commits passed since the last one.

    Protects read latency: without checkpoints every reader replays the whole
    JSON log. Due on the schedule of deltalake's own post-commit hook (after
    every ``interval`` commits: versions ``interval - 1``, ``2 * interval - 1``,
    ...) or when the last checkpoint is at least an interval behind, so the
    two never checkpoint the same stretch twice. Returns True if one was written.
    """
    version = table.version()
    last = last_checkpoint_version(table)
    if version <= 0 or version == last:
        return False
    behind = version - last if last is not None else version + 1
    interval = policy.checkpoint_interval
    if (version + 1) % interval != 0 and behind < interval:
        return False
    table.create_checkpoint()
    root = local_root(table)
    if root is not None:
        log_dir = root / "_delta_log"
        for path in checkpoint_files(log_dir):  # named by the pointer just written
            fsync_file(path)
        fsync_directory(log_dir)
    log.info("maintenance.checkpointed", table=table.table_uri, version=version)
    return True


def last_checkpoint_version(table: DeltaTable) -> int | None:
    """Version of the table's newest checkpoint (``_last_checkpoint``), if any."""
    root = local_root(table)
    try:
        if root is None:  # object storage
            with table_filesystem(table).open_input_stream("_delta_log/_last_checkpoint") as f:
                pointer = json.loads(f.read())
        else:
            pointer = json.loads((root / "_delta_log" / "_last_checkpoint").read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return int(pointer["version"])


def cleanup_log(
    table: DeltaTable, policy: MaintenancePolicy, *, keep_from_version: int | None = None
) -> int:
    """Delete log entries older than ``policy.log_retention`` that a checkpoint supersedes.

    Protects time travel within the log retention and, with ``keep_from_version``,
    a lagging change-feed consumer: nothing is deleted while the log entry of
    that version is itself past the retention. Applies the policy's table
    properties first (see :func:`apply_policy_properties`). Returns the number
    of log files removed.
    """
    if policy.log_retention is None:
        return 0
    apply_policy_properties(table, policy)
    if keep_from_version is not None:
        kept = table_filesystem(table).get_file_info(commit_entry(keep_from_version))
        cutoff = time.time() - policy.log_retention.total_seconds()
        # An entry of unknown age is held too: better a longer log than a lost change feed.
        age_unknown = kept.mtime_ns is None
        if kept.type == pafs.FileType.File and (age_unknown or kept.mtime_ns / 1e9 < cutoff):
            log.warning("maintenance.log_cleanup_held", table=table.table_uri,
                        keep_from_version=keep_from_version)  # fmt: skip
            return 0
    before = _log_files(table)
    table.cleanup_metadata()
    removed = len(before - _log_files(table))
    if removed:
        log.info("maintenance.log_cleaned", table=table.table_uri, removed=removed)
    return removed


def vacuum(
    table: DeltaTable,
    policy: MaintenancePolicy,
    *,
    dry_run: bool,
    keep_from_version: int | None = None,
    allow_below_table_minimum: bool = False,
) -> list[str]:
    """Delete (or with ``dry_run`` only list) files no longer in the table and past retention.

    Protects time travel and slow readers for ``policy.vacuum_retention`` (``None``:
    never vacuum). deltalake refuses a retention below the table's
    ``delta.deletedFileRetentionDuration`` (7 days by default) unless
    ``allow_below_table_minimum`` is given explicitly. With ``keep_from_version``
    the files of every version from there on are kept, so a change-feed
    consumer that has not read them yet still can.

    Returns the table-relative paths of files that existed and are (to be)
    deleted. deltalake 1.6 lists already-deleted files again and writes two
    commits per run even when it deletes nothing; here a run that would
    delete nothing writes nothing.
    """
    if policy.vacuum_retention is None:
        return []
    options: dict[str, Any] = {
        "retention_hours": math.ceil(policy.vacuum_retention.total_seconds() / 3600),
        "enforce_retention_duration": not allow_below_table_minimum,
        "commit_properties": CommitProperties(custom_metadata={MAINTENANCE_KEY: "vacuum"}),
    }
    if keep_from_version is not None:
        options["keep_versions"] = list(range(max(keep_from_version, 0), table.version() + 1))
    listed = table.vacuum(dry_run=True, **options)
    files = table_filesystem(table)
    gone = {
        path for path in listed if files.get_file_info(unquote(path)).type == pafs.FileType.NotFound
    }
    candidates = [path for path in listed if path not in gone]
    if dry_run or not candidates:
        return candidates
    deleted = [path for path in table.vacuum(dry_run=False, **options) if path not in gone]
    log.info("maintenance.vacuumed", table=table.table_uri, files=len(deleted))
    return deleted


def maintain(
    store: TableStore,
    layer: Layer,
    name: str,
    policy: MaintenancePolicy,
    *,
    keep_from_version: int | None = None,
) -> MaintenanceReport | None:
    """Compact, checkpoint and clean the log of ``<layer>/<name>`` (never vacuum).

    Call it in the processor's thread between micro-batches: it then never
    races a pipeline commit, and its own commits never change the change feed.
    ``None`` if the table does not exist.
    """
    table = store.open(layer, name)
    if table is None:
        return None
    updated = apply_policy_properties(table, policy)
    compaction = compact(table, policy)
    checkpointed = checkpoint_if_due(table, policy)
    removed = cleanup_log(table, policy, keep_from_version=keep_from_version)
    return MaintenanceReport(
        layer=layer,
        name=name,
        version=table.version(),
        properties_updated=updated,
        compaction=compaction,
        checkpointed=checkpointed,
        log_files_removed=removed,
    )


def committed_version(table: DeltaTable, read_version: int, run: str) -> int:
    """The version of the commit marked ``run`` that ``table`` made after ``read_version``.

    Found in the log itself: after a commit that raced other writers, deltalake
    1.6 loads their commits too, so ``table.version()`` can be later than the
    commit, and that object's ``history()`` numbers versions wrongly.
    """
    root = local_root(table)
    if root is None:
        fresh = reopen(table)
        for entry in fresh.history(limit=max(fresh.version() - read_version, 1)):
            if entry.get(RUN_KEY) == run:
                return int(entry["version"])
    else:
        version = read_version + 1
        while (commit := root / commit_entry(version)).exists():
            for line in commit.read_text(encoding="utf-8").splitlines():
                info = json.loads(line).get("commitInfo") if line.strip() else None
                if info is not None and info.get(RUN_KEY) == run:
                    return version
            version += 1
    raise LookupError(f"commit {run} not found after version {read_version} of {table.table_uri}")


def _maintenance_commit(kind: str) -> tuple[CommitProperties, str]:
    run = uuid.uuid4().hex
    return CommitProperties(custom_metadata={MAINTENANCE_KEY: kind, RUN_KEY: run}), run


def _file_name(path_or_uri: str) -> str:
    return unquote(path_or_uri).rsplit("/", 1)[-1]


def _log_files(table: DeltaTable) -> set[str]:
    found = table_filesystem(table).get_file_info(pafs.FileSelector("_delta_log"))
    return {info.base_name for info in found if info.base_name[:1].isdigit()}
