"""The table catalog: every Delta table of the lakehouse, as the serving layer sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from config.settings import Settings
from delta_processing.tables import LAYERS, Layer, TableStore, as_pyarrow, as_store


@dataclass(frozen=True)
class TableSnapshot:
    """One table at one version: what a view over it needs to be exact."""

    layer: Layer
    name: str
    version: int
    file_uris: list[str]
    partition_columns: list[str]
    schema: pa.Schema
    table: DeltaTable

    @property
    def qualified_name(self) -> str:
        return f"{self.layer}.{self.name}"


def snapshot_tables(location: TableStore | Path | str) -> list[TableSnapshot]:
    """Every table of ``location`` (a store or a local data directory), at its latest version."""
    store = as_store(location)
    snapshots = []
    for layer in LAYERS:
        for name in store.list(layer):
            table = store.open(layer, name)
            if table is None:  # removed between listing and opening
                continue
            snapshots.append(
                TableSnapshot(
                    layer=layer,
                    name=name,
                    version=table.version(),
                    file_uris=list(table.file_uris()),
                    partition_columns=list(table.metadata().partition_columns),
                    schema=pa.schema(table.schema().to_arrow()),
                    table=table,
                )
            )
    return snapshots


# --- Catalog details: what `/v1/tables` and `lakehouse tables` tell about one table ---

# Table names as our writers make them (sources, gold names, `_dead_letters`, `quality`):
# no dots, no slashes, so a name can never walk out of its layer's directory.
TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")
# Our own commit metadata keys (``commitInfo`` custom metadata) all start with this.
CUSTOM_METADATA_PREFIX = "lakehouse."


class CatalogError(LookupError):
    """A table reference that names nothing: bad layer, bad name, or no such table."""


class UnknownLayer(CatalogError):
    """The layer is not one of :data:`~delta_processing.tables.LAYERS`."""


class InvalidTableName(CatalogError):
    """The name cannot be a table name (path characters, too long, empty)."""


class UnknownTable(CatalogError):
    """No Delta table of that name exists in the layer."""


def table_store(settings: Settings) -> TableStore:
    """The table store of ``settings``: the one place the catalog's readers build it."""
    return TableStore.from_settings(settings)


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a table's schema."""

    name: str
    type: str
    nullable: bool


@dataclass(frozen=True)
class TableDetails:
    """What the catalog tells about one table at its latest version.

    ``row_count`` is the sum of the ``numRecords`` statistics of the active files,
    ``None`` when a file has no statistics. ``freshness_s`` is the age of the last
    commit; ``newest_data_at`` (gold only) is the largest event or window time the
    file statistics record, when the table has such a column.
    """

    layer: str
    name: str
    version: int
    columns: list[ColumnInfo]
    partition_columns: list[str]
    file_count: int
    total_bytes: int
    row_count: int | None
    created_at: datetime | None
    last_commit_at: datetime | None
    last_operation: str | None
    freshness_s: float | None
    newest_data_at: datetime | None

    @property
    def qualified_name(self) -> str:
        return f"{self.layer}.{self.name}"


@dataclass(frozen=True)
class HistoryEntry:
    """One commit of a table: what it did and what our pipeline recorded with it."""

    version: int
    timestamp: datetime | None
    operation: str | None
    parameters: dict[str, Any]
    metrics: dict[str, Any]
    metadata: dict[str, str]


def check_table_ref(layer: str, name: str) -> Layer:
    """``layer`` as a :data:`Layer` if ``layer/name`` is a well-formed table reference.

    Raises :class:`UnknownLayer` or :class:`InvalidTableName`.
    """
    if layer not in LAYERS:
        raise UnknownLayer(f"unknown layer {layer!r}: use one of {', '.join(LAYERS)}")
    if not TABLE_NAME_RE.fullmatch(name):
        raise InvalidTableName(
            f"invalid table name {name!r}: 1-128 letters, digits, '_' or '-', not starting with '-'"
        )
    return layer


def open_table(store: TableStore, layer: str, name: str) -> tuple[Layer, DeltaTable]:
    """The table ``layer/name`` at its latest version; :class:`CatalogError` if there is none."""
    checked = check_table_ref(layer, name)
    table = store.open(checked, name)
    if table is None:
        raise UnknownTable(f"no table {layer}/{name}")
    return checked, table


def _add_actions(table: DeltaTable) -> pa.Table:
    return as_pyarrow(table.get_add_actions(flatten=True))


def _row_count(actions: pa.Table) -> int | None:
    if actions.num_rows == 0:
        return 0
    if "num_records" not in actions.column_names:
        return None
    column = actions.column("num_records")
    if column.null_count:
        return None
    return int(pc.sum(column).as_py() or 0)


def _newest_data_at(actions: pa.Table, schema: pa.Schema) -> datetime | None:
    """Largest value of the first user timestamp column, from the file statistics."""
    for field in schema:
        if field.name.startswith("_") or not pa.types.is_timestamp(field.type):
            continue
        stat = f"max.{field.name}"
        if stat not in actions.column_names or actions.num_rows == 0:
            return None
        newest = pc.max(actions.column(stat)).as_py()
        if isinstance(newest, datetime):
            return newest if newest.tzinfo else newest.replace(tzinfo=UTC)
        return None
    return None


def _millis(value: object) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    return None


def describe_table(
    table: DeltaTable, layer: str, name: str, *, now: datetime | None = None
) -> TableDetails:
    """Schema, version, files, bytes, rows and freshness of ``table`` (read from its log)."""
    now = now or datetime.now(UTC)
    schema = pa.schema(table.schema().to_arrow())
    actions = _add_actions(table)
    metadata = table.metadata()
    last = table.history(1)
    last_commit = last[0] if last else {}
    last_at = _millis(last_commit.get("timestamp"))
    operation = last_commit.get("operation")
    return TableDetails(
        layer=layer,
        name=name,
        version=table.version(),
        columns=[ColumnInfo(f.name, str(f.type), f.nullable) for f in schema],
        partition_columns=list(metadata.partition_columns),
        file_count=actions.num_rows,
        total_bytes=int(pc.sum(actions.column("size_bytes")).as_py() or 0)
        if actions.num_rows
        else 0,
        row_count=_row_count(actions),
        created_at=_millis(metadata.created_time),
        last_commit_at=last_at,
        last_operation=operation if isinstance(operation, str) else None,
        freshness_s=None if last_at is None else max((now - last_at).total_seconds(), 0.0),
        newest_data_at=_newest_data_at(actions, schema) if layer == "gold" else None,
    )


def describe_tables(store: TableStore, *, now: datetime | None = None) -> list[TableDetails]:
    """:func:`describe_table` of every table, layer by layer (tables removed meanwhile skipped)."""
    details = []
    for layer in LAYERS:
        for name in store.list(layer):
            table = store.open(layer, name)
            if table is not None:
                details.append(describe_table(table, layer, name, now=now))
    return details


def history_entry(commit: dict[str, Any]) -> HistoryEntry:
    """One ``DeltaTable.history()`` entry as a :class:`HistoryEntry`."""
    operation = commit.get("operation")
    parameters = commit.get("operationParameters")
    metrics = commit.get("operationMetrics")
    return HistoryEntry(
        version=int(commit["version"]),
        timestamp=_millis(commit.get("timestamp")),
        operation=operation if isinstance(operation, str) else None,
        parameters=dict(parameters) if isinstance(parameters, dict) else {},
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
        metadata={
            key: str(value)
            for key, value in commit.items()
            if key.startswith(CUSTOM_METADATA_PREFIX)
        },
    )


def table_history(table: DeltaTable, limit: int | None = None) -> list[HistoryEntry]:
    """The table's commits, newest first (at most ``limit``; ``None``: all the log holds)."""
    return [history_entry(commit) for commit in table.history(limit)]
