"""Delta table locations and the small set of Delta operations every stage shares.

Exactly-once promotion rests on one mechanism: each stage writes the upstream
position it consumed as a Delta *application transaction* inside the same
commit as its data (``txn`` action, as kafka-delta-ingest and Spark Structured
Streaming do). Reading that position back (:func:`consumed_version`) after a
crash says exactly where to resume.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.table import TableMerger

from delta_processing.column_names import CHANGE_FEED_COLUMNS
from delta_processing.storage import (
    is_local_uri,
    local_path,
    remote_filesystem,
    storage_options,
    storage_root,
)
from landing_zone.layout import fsync_directory

if TYPE_CHECKING:
    from config.settings import Settings

Layer = Literal["bronze", "silver", "gold", "quarantine", "_meta"]
LAYERS: tuple[Layer, ...] = ("bronze", "silver", "gold", "quarantine", "_meta")

# Stage tables are read by change data feed downstream.
CDF_CONFIGURATION = {"delta.enableChangeDataFeed": "true"}


# Commits a reused table object may move through before it is loaded afresh (see
# TableStore.reusing_tables): deltalake's checkpoint interval, so a fresh load replays
# about as much as the object carries.
RELOAD_AFTER_COMMITS = 100


@dataclass(frozen=True)
class TableStore:
    """Resolves ``<layer>/<name>`` to Delta table URIs under one root.

    The root is a local directory (the data directory by default) or an
    object-store URI (``az://container/prefix``, ``s3://bucket/prefix``) with the
    deltalake ``storage_options`` to reach it; build it from the settings with
    :meth:`from_settings`. The options hold credentials: they are kept out of
    ``repr`` and comparisons.
    """

    root: Path | str
    storage_options: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    # Per thread: (layer, name, pinned) -> the table as last opened (see `reusing_tables`).
    _reused: threading.local | None = field(default=None, repr=False, compare=False)

    def reusing_tables(self) -> TableStore:
        """This store, but :meth:`open` brings the thread's earlier table object up to
        date instead of loading the table again.

        Loading replays the log since the last checkpoint (up to 100 commits, ~15 ms
        locally, far more from object storage); bringing an open table up to date reads
        only the commits since, and locally is skipped when there are none. Meant for
        the processor, the only writer of its tables: an object that one caller holds
        moves forward when another, in the same thread, opens the same table, or writes
        through it (see :func:`write_synced`). Objects are never shared between threads.

        An object is loaded afresh once it has moved :data:`RELOAD_AFTER_COMMITS` commits
        past where it was loaded: deltalake's table object accumulates the commits it
        moves through, and each write through it then costs more (an append ~4 ms on a
        fresh object, ~130 ms after 1,000 commits through the same one), where a fresh
        load starts from the newest checkpoint.
        """
        return replace(self, _reused=threading.local())

    @classmethod
    def from_settings(cls, settings: Settings) -> TableStore:
        """The store the settings configure (``LAKEHOUSE_STORAGE_URI``, else ``data_dir``)."""
        root = storage_root(settings)
        if isinstance(root, Path):
            return cls(root)
        return cls(root, storage_options(settings) or None)

    @property
    def options(self) -> dict[str, str] | None:
        """The storage options as deltalake takes them (``None`` for local tables)."""
        return dict(self.storage_options) if self.storage_options else None

    @property
    def local_root(self) -> Path | None:
        """The root directory if the tables are on the local file system, else ``None``."""
        if isinstance(self.root, Path):
            return self.root
        return local_path(self.root) if is_local_uri(self.root) else None

    def uri(self, layer: Layer, name: str) -> str:
        """Where ``<layer>/<name>`` lives: a local path or an object-store URI."""
        local = self.local_root
        if local is not None:
            return str(local / layer / name)
        return f"{str(self.root).rstrip('/')}/{layer}/{name}"

    def open(self, layer: Layer, name: str, version: int | None = None) -> DeltaTable | None:
        """The table (at ``version``, else its latest), or ``None`` if it was never created."""
        # key -> (the table, the version it was loaded fresh at)
        tables: dict[tuple[str, str, bool], tuple[DeltaTable, int]] | None = None
        key = (layer, name, version is not None)
        if self._reused is not None:
            tables = getattr(self._reused, "tables", None)
            if tables is None:
                tables = self._reused.tables = {}
            table, loaded_at = tables.pop(key, (None, 0))
            if table is not None and (
                table.version() - loaded_at >= RELOAD_AFTER_COMMITS
                or (version is not None and abs(version - loaded_at) >= RELOAD_AFTER_COMMITS)
                or not self._still_there(layer, name, table.version())
            ):
                # Worn (see reusing_tables), or deleted (or re-created) behind our back.
                table = None
            if table is not None:
                try:
                    if version is None:
                        if self._may_be_newer(layer, name, table.version()):
                            table.update_incremental()
                    elif table.version() != version:
                        table.load_as_version(version)
                except Exception:  # load afresh below: a real fault recurs there
                    table = None
                else:
                    tables[key] = (table, loaded_at)
                    return table
        try:
            table = DeltaTable(self.uri(layer, name), version=version, storage_options=self.options)
        except TableNotFoundError:
            return None
        if tables is not None:
            tables[key] = (table, table.version())
        return table

    def _still_there(self, layer: Layer, name: str, version: int) -> bool:
        """Whether a local table still has the commit a reused object is at (a table
        deleted by hand would otherwise live on in the object, which
        ``update_incremental`` finds nothing new for). Object stores: assumed."""
        return self._may_have_commit(layer, name, version)

    def _may_be_newer(self, layer: Layer, name: str, version: int) -> bool:
        """Whether a local table may have commits after ``version``: only if the next
        one exists, versions being contiguous. Checked first because deltalake finds new
        commits by listing the whole log, which grows by a file per commit until
        maintenance cleans it. Object stores: always."""
        return self._may_have_commit(layer, name, version + 1)

    def _may_have_commit(self, layer: Layer, name: str, version: int) -> bool:
        """Whether commit ``version`` of a local table exists (object stores: maybe)."""
        local = self.local_root
        if local is None:
            return True
        return (local / layer / name / commit_entry(version)).is_file()

    def answers(self, min_free_bytes: int = 0) -> bool:
        """Whether the store takes requests again: one cheap look, never raises.

        Object stores: a metadata request under the root (a HEAD, then a one-level
        listing) succeeds, whatever it finds; it waits at most the client's own
        ``timeout``/``retry_timeout`` options. Local disk, whose only outage is a
        full or failing file system: the root's file system has more than
        ``min_free_bytes`` free.
        """
        local = self.local_root
        try:
            if local is not None:
                return shutil.disk_usage(local).free > min_free_bytes
            remote_filesystem(str(self.root), self.options).get_file_info("_meta")
        except BaseException as exc:  # deltalake panics included: all mean "not yet"
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return False
        return True

    def list(self, layer: Layer) -> list[str]:
        """Names of the Delta tables of one layer."""
        local = self.local_root
        if local is not None:
            root = local / layer
            if not root.is_dir():
                return []
            return sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir())
        # Object stores have no directories, only key prefixes: a table is a prefix
        # holding a `_delta_log/` prefix.
        fs = remote_filesystem(str(self.root), self.options)
        found = fs.get_file_info(pafs.FileSelector(layer, allow_not_found=True))
        names = []
        for info in found:
            if info.type != pafs.FileType.Directory:
                continue
            log_dir = fs.get_file_info(pafs.FileSelector(f"{info.path}/_delta_log",
                                                         allow_not_found=True))  # fmt: skip
            if log_dir:
                names.append(info.base_name)
        return sorted(names)


def as_store(location: TableStore | Path | str) -> TableStore:
    """``location`` as a store: a :class:`TableStore` as is, a path as a local store.

    An object-store URI string gets no storage options (object_store then reads
    credentials from the environment); pass a store to give them.
    """
    if isinstance(location, TableStore):
        return location
    if isinstance(location, str) and not is_local_uri(location):
        return TableStore(location.rstrip("/"))
    return TableStore(Path(location))


def reopen(table: DeltaTable, version: int | None = None) -> DeltaTable:
    """A fresh handle on ``table`` (latest or ``version``), with the storage options it has.

    deltalake keeps the options it was opened with only in ``_storage_options``;
    a remote table reopened by its URI alone would lose its credentials.
    """
    return DeltaTable(table.table_uri, version=version, storage_options=table._storage_options)


def table_filesystem(table: DeltaTable) -> pafs.FileSystem:
    """A file system rooted at the table's directory (local or on object storage)."""
    root = local_root(table)
    if root is not None:
        return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    return remote_filesystem(table.table_uri, table._storage_options)


def table_columns(table: DeltaTable) -> list[str]:
    """Column names of a table, in schema order."""
    return [field.name for field in table.schema().fields]


def commit_entry(version: int) -> str:
    """The log entry of commit ``version``, relative to its table's root."""
    return f"_delta_log/{version:020d}.json"


def consumed_version(table: DeltaTable | None, app_id: str) -> int | None:
    """The upstream version ``app_id`` recorded in ``table``, or ``None`` if never."""
    return None if table is None else table.transaction_version(app_id)


def commit_marker(
    app_id: str, version: int, extra: dict[str, int] | None = None, /, **metadata: str
) -> CommitProperties:
    """Commit properties that record ``version`` for ``app_id`` in the same commit as the data.

    ``extra`` records further application positions (e.g. Kafka partitions) alongside.
    """
    transactions = [Transaction(app_id, version)]
    transactions += [Transaction(other, position) for other, position in (extra or {}).items()]
    return CommitProperties(app_transactions=transactions, custom_metadata=metadata or None)


def to_arrow(frame: pl.DataFrame) -> pa.Table:
    """Arrow for Delta writes, without view types so every Delta reader can read the table."""
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest())


class PartitioningChanged(RuntimeError):
    """A table's partition columns differ from what its contract now declares."""


def ensure_table(
    store: TableStore,
    layer: Layer,
    name: str,
    schema: pl.Schema,
    *,
    cdf: bool,
    partition_by: list[str] | None = None,
) -> DeltaTable:
    """Open the table, creating it empty with ``schema`` if it does not exist yet.

    Raises :class:`PartitioningChanged` if an existing table is partitioned otherwise.
    """
    table = store.open(layer, name)
    if table is not None:
        current = list(table.metadata().partition_columns)
        if current != (partition_by or []):
            raise PartitioningChanged(
                f"{layer}/{name} is partitioned by {current or 'nothing'} but the contract "
                f"says {partition_by or 'nothing'}; rebuild it with `lakehouse refresh "
                f"{layer}/{name}`"
            )
        return table
    empty = to_arrow(pl.DataFrame(schema=schema))
    created = DeltaTable.create(
        store.uri(layer, name),
        schema=empty.schema,
        storage_options=store.options,
        mode="ignore",
        partition_by=partition_by or None,
        configuration=CDF_CONFIGURATION if cdf else None,
    )
    # The object is at the version it created (0), or at the one it found (mode "ignore").
    sync_commit(created, created.version())
    return created


def local_root(table: str | DeltaTable) -> Path | None:
    """The table's directory if it is on the local file system, else ``None``."""
    uri = table.table_uri if isinstance(table, DeltaTable) else table
    return local_path(uri) if is_local_uri(uri) else None


def sync_latest_commit(table: str | DeltaTable) -> None:
    """fsync the newest commit of a local table (see :func:`sync_commit`).

    For a write made by URI, which leaves no table object to ask for its version.
    Finding the newest commit costs a few file probes (:func:`latest_local_version`),
    not a listing of the log, which grows with every commit until maintenance
    cleans it.
    """
    root = local_root(table)
    if root is None:
        return
    version = latest_local_version(root)
    if version is not None:
        sync_commit(table, version)


def latest_local_version(root: Path) -> int | None:
    """The newest commit version in the log of the local table at ``root`` (``None``: none).

    Delta versions are contiguous from the oldest kept commit to the newest, so from one
    known commit the newest is found by probing ``<version>.json`` names: doubling steps
    forward, then halving back (about ``2 * log2(commits since)`` probes). The known
    commit is the one ``_last_checkpoint`` names (log cleanup keeps it and everything
    after), else version 0; without either (no pointer and a cleaned log) the log is
    listed, as a correct last resort.
    """
    log_dir = root / "_delta_log"

    def committed(version: int) -> bool:
        return (root / commit_entry(version)).exists()

    pointer = _checkpoint_pointer(log_dir)
    known = int(pointer["version"]) if pointer is not None else None
    if known is None or not committed(known):
        known = 0 if committed(0) else None
    if known is None:
        versions = [int(p.stem) for p in log_dir.glob("*.json") if p.stem.isdigit()]
        return max(versions, default=None)
    # `known` exists; find an absent version above it, then the boundary between them.
    step = 1
    absent = known + step
    while committed(absent):
        known, step = absent, step * 2
        absent = known + step
    while absent - known > 1:
        middle = (known + absent) // 2
        if committed(middle):
            known = middle
        else:
            absent = middle
    return known


def _checkpoint_pointer(log_dir: Path) -> dict[str, Any] | None:
    """The content of ``_last_checkpoint`` (``None``: absent or unreadable, as mid-write)."""
    try:
        pointer = json.loads((log_dir / "_last_checkpoint").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), int):
        return None
    return pointer


def checkpoint_files(log_dir: Path) -> list[Path]:
    """``_last_checkpoint`` and the files of the checkpoint it names, those that exist.

    Named from the pointer (single-part ``<v>.checkpoint.parquet`` or the parts of a
    multi-part one) rather than found by listing the log; a checkpoint named otherwise
    (v2 checkpoints, which deltalake does not write) is looked for by listing.
    """
    pointer_file = log_dir / "_last_checkpoint"
    pointer = _checkpoint_pointer(log_dir)
    if pointer is None:
        return [pointer_file] if pointer_file.exists() else []
    version = int(pointer["version"])
    parts = pointer.get("parts")
    if isinstance(parts, int) and parts > 1:
        named = [
            log_dir / f"{version:020d}.checkpoint.{part:010d}.{parts:010d}.parquet"
            for part in range(1, parts + 1)
        ]
    else:
        named = [log_dir / f"{version:020d}.checkpoint.parquet"]
    found = [path for path in named if path.exists()]
    if len(found) < len(named):
        found = sorted(log_dir.glob(f"{version:020d}.checkpoint*.parquet"))
    return [*found, pointer_file]


def sync_commit(table: str | DeltaTable, version: int) -> None:
    """fsync one commit of a local table: its log entry and the files it adds.

    deltalake writes without fsync. A stage that lets go of its input after a
    commit (bronze archives landing files) must first make that commit survive a
    power loss, or the input would be gone and the commit with it. Object stores
    are durable once a write returns, so only local paths need this.

    The newest checkpoint and its pointer are fsynced too: deltalake's post-commit
    hook may have written them with this commit.
    """
    root = local_root(table)
    if root is None:
        return
    log_dir = root / "_delta_log"
    entry = root / commit_entry(version)
    directories = {log_dir, root}
    for line in entry.read_text(encoding="utf-8").splitlines():
        added = json.loads(line).get("add") if line.strip() else None
        if added:
            data_file = root / unquote(added["path"])
            fsync_file(data_file)
            directories.add(data_file.parent)
    fsync_file(entry)
    for extra in checkpoint_files(log_dir):
        fsync_file(extra)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(directory)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append(
    target: str | DeltaTable,
    frame: pl.DataFrame,
    marker: CommitProperties,
    *,
    evolve_schema: bool = False,
    cdf: bool = False,
    partition_by: list[str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> None:
    """Append ``frame`` and the marker in one commit (an empty frame commits just the marker).

    Pass the open table where there is one (see :func:`write_synced`); a URI ``target``
    is for the append that creates the table. ``partition_by`` applies when the append
    creates the table. A URI ``target`` on object storage needs the store's
    ``storage_options`` (a table carries its own).
    """
    write_synced(
        target,
        to_arrow(frame),
        mode="append",
        storage_options=storage_options,
        partition_by=partition_by or None,
        schema_mode="merge" if evolve_schema else None,
        configuration=CDF_CONFIGURATION if cdf else None,
        commit_properties=marker,
    )


def write_synced(target: str | DeltaTable, data: pa.Table, **options: Any) -> None:
    """``write_deltalake(target, data, **options)``, then fsync the commit it made.

    Protects the durability of the commit (see :func:`sync_commit`) without listing the
    log. Through a table object, deltalake leaves the object at the version it
    committed (checked for appends, schema merges, predicate and schema overwrites in
    deltalake 1.6, also when other commits landed since the object was loaded), so
    that version is fsynced and the object stays current for whoever holds it (the
    store's reused tables). By URI, deltalake loads the table itself and hands nothing
    back, so the newest commit is looked up (:func:`sync_latest_commit`).
    """
    write_deltalake(target, data, **options)
    if isinstance(target, DeltaTable):
        sync_commit(target, target.version())
    else:
        sync_latest_commit(target)


def merge(
    table: DeltaTable,
    source: pl.DataFrame,
    keys: list[str],
    build: Callable[[TableMerger], TableMerger],
    marker: CommitProperties,
    *,
    evolve_schema: bool = False,
    prune: str | None = None,
) -> None:
    """MERGE ``source`` into ``table`` on ``keys`` and record ``marker`` in the commit.

    ``prune`` (a predicate on the target ``t``, e.g. its partitions) narrows the
    files the MERGE reads; it must hold for every target row a source row matches.

    ``build`` adds the when-clauses. A MERGE that changes nothing writes no commit,
    so the marker would be lost and the same input consumed again forever; the
    marker then goes in an empty append instead.
    """
    before = table.version()
    merger = table.merge(
        to_arrow(source),
        predicate=key_predicate(keys) + (f" AND ({prune})" if prune else ""),
        source_alias="s",
        target_alias="t",
        merge_schema=evolve_schema,
        commit_properties=marker,
    )
    build(merger).execute()
    if table.version() == before:
        empty = source.clear()
        if not evolve_schema:  # columns only the MERGE reads (gold's _present) stay out
            kept = set(table_columns(table))
            empty = empty.select([c for c in empty.columns if c in kept])
        append(table, empty, marker, evolve_schema=evolve_schema)
    else:
        sync_commit(table, table.version())  # the MERGE moved it to its commit


REFRESH_MARK = "lakehouse.refresh"


def commits_after(table: DeltaTable, after: int) -> list[dict[str, Any]]:
    """The history entries of ``table``'s commits after version ``after``, oldest first.

    One read of the table's recent history; :func:`marked_versions` and
    :func:`correlation_ids_in` then look through it.
    """
    newer = table.version() - after
    if newer <= 0:
        return []
    entries = (entry for entry in table.history(newer) if int(entry["version"]) > after)
    return sorted(entries, key=lambda entry: int(entry["version"]))


def marked_versions(commits: list[dict[str, Any]], *marks: str) -> dict[str, set[int]]:
    """For each of ``marks``: the versions of ``commits`` whose commit metadata carries it."""
    return {mark: {int(entry["version"]) for entry in commits if mark in entry} for mark in marks}


CORRELATION_IDS = "lakehouse.correlation_ids"
# Commit metadata is read with every history scan: a backlog's thousands of request ids
# would bloat it, so a commit names at most this many (the log lines name them all).
MAX_COMMITTED_IDS = 100


def correlation_ids_in(commits: list[dict[str, Any]]) -> list[str]:
    """The request correlation ids recorded by ``commits`` (see :func:`commits_after`).

    Each stage records the ids of the input it consumed, so a request can be followed
    from its landing file through bronze, silver and gold commits and log lines.
    """
    found: list[str] = []
    for entry in commits:
        if CORRELATION_IDS in entry:
            found.extend(json.loads(str(entry[CORRELATION_IDS])))
    return list(dict.fromkeys(found))


def correlation_metadata(ids: list[str]) -> dict[str, str]:
    """Commit metadata naming the requests a commit carries (capped)."""
    return {CORRELATION_IDS: json.dumps(ids[:MAX_COMMITTED_IDS])} if ids else {}


def in_list(column: str, values: Iterable[date]) -> str:
    """``column IN (...)`` over date or timestamp literals (datetimes are dates too),
    sorted, each once; ``column`` as the predicate names it (``t."_event_date"``)."""
    literals = ", ".join(f"'{value.isoformat()}'" for value in sorted(set(values)))
    return f"{column} IN ({literals})"


def key_predicate(keys: list[str]) -> str:
    """MERGE predicate joining source ``s`` to target ``t`` on ``keys``."""
    return " AND ".join(f't."{key}" = s."{key}"' for key in keys)


def as_pyarrow(data: Any) -> pa.Table:
    """deltalake's Arrow results (arro3 tables, batches, stream readers) as a pyarrow table.

    Read through the Arrow C stream interface: ``pa.table`` would first probe whether
    ``data`` is a pandas DataFrame, importing pandas (about a second) into processes
    that never use it.
    """
    return pa.RecordBatchReader.from_stream(data).read_all()


def read_changes(
    table: DeltaTable, start: int, end: int, columns: list[str] | None = None
) -> pl.DataFrame:
    """Change data feed rows of versions ``start..end`` (inclusive).

    ``columns`` narrows the table's columns read; the change feed's own columns
    (``_change_type``, ``_commit_version``, ``_commit_timestamp``) are always there.
    """
    if columns is not None:
        columns = [*dict.fromkeys(columns), *CHANGE_FEED_COLUMNS]
    reader = table.load_cdf(starting_version=start, ending_version=end, columns=columns)
    return pl.DataFrame(as_pyarrow(reader))


def as_inserts(
    rows: pl.DataFrame, table: DeltaTable, version: int, committed_ms: int
) -> pl.DataFrame:
    """``rows``, which commit ``version`` of ``table`` appended at ``committed_ms`` (its
    commit timestamp, epoch ms), shaped exactly as :func:`read_changes` of that one
    version returns them: the table's columns in the change feed's order and types
    (null where the rows lack a column), then the change feed columns.

    ``table`` must be loaded at ``version`` or later with no schema change since.
    """
    # (`pa.Schema.empty_table` would import pandas: a second of start-up.)
    schema = pl.DataFrame(pa.Table.from_batches([], pa.schema(table.schema().to_arrow()))).schema
    partitions = table.metadata().partition_columns
    # The change feed puts partition columns after the others.
    names = [n for n in schema if n not in partitions] + [n for n in schema if n in partitions]
    shaped = rows.select(
        pl.col(name).cast(schema[name])
        if name in rows.columns
        else pl.lit(None, schema[name]).alias(name)
        for name in names
    )
    return shaped.with_columns(
        pl.lit("insert").alias("_change_type"),
        pl.lit(version, dtype=pl.UInt64).alias("_commit_version"),
        pl.lit(committed_ms, dtype=pl.Int64).cast(pl.Datetime("ms")).alias("_commit_timestamp"),
    )


# Storage option names Polars reads as its own settings, with its own value types
# (polars.io.cloud._utils.POLARS_STORAGE_CONFIG_KEYS, Polars 1.x-2.x).
POLARS_STORAGE_OPTIONS = frozenset(
    {
        "file_cache_ttl",
        "max_retries",
        "retry_timeout_ms",
        "retry_init_backoff_ms",
        "retry_max_backoff_ms",
        "retry_base_multiplier",
    }
)


def read_snapshot(table: DeltaTable) -> pl.LazyFrame:
    """A lazy scan of the table at the version ``table`` is loaded at.

    Polars' own Delta scan cannot open %-escaped local paths (a data directory
    with a space in its name), and takes some storage options as its own (it wants
    a number for ``max_retries``, which deltalake wants as text); such tables are
    scanned through deltalake's Arrow dataset instead (slower on object storage).
    """
    root = local_root(table)
    # Derived from the root alone: listing the files to look for escapes costs a pass
    # over the whole snapshot on every gold refresh.
    escaped = root is not None and quote(str(root)) != str(root)
    if escaped or POLARS_STORAGE_OPTIONS & set(getattr(table, "_storage_options", None) or {}):
        return pl.scan_pyarrow_dataset(table.to_pyarrow_dataset())
    return pl.scan_delta(table)
