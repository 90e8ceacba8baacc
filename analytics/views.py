"""DuckDB connections with every lakehouse table as a view ``<layer>.<table>``.

Fast path: a view over ``read_parquet`` of the table's *active* files at one
Delta version (``DeltaTable.file_uris()``), which is exact for our tables (no
deletion vectors, no column mapping) and several times faster than scanning a
registered Arrow dataset. Tables the fast path cannot honour (partition values
live only in the Delta log), empty tables and tables on object storage (DuckDB's
own file access never reaches them: deltalake reads them, with the store's
credentials) are served through Arrow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from analytics.catalog import TableSnapshot, snapshot_tables
from delta_processing.storage import local_path
from delta_processing.tables import LAYERS, TableStore, as_pyarrow, as_store, local_root


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_VERSIONS = "__lakehouse_versions"


def register_views(
    con: duckdb.DuckDBPyConnection, snapshots: list[TableSnapshot], *, fast_path: bool = True
) -> None:
    """Create one schema per layer and one view per table in ``con``.

    ``fast_path=False`` serves every table through deltalake's Arrow dataset (for
    tables written by other engines, or to compare the two paths).
    """
    for layer in LAYERS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(layer)}")
    con.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_VERSIONS} (name VARCHAR PRIMARY KEY, v BIGINT)")
    for snap in snapshots:
        target = f"{_ident(snap.layer)}.{_ident(snap.name)}"
        con.execute(
            f"INSERT OR REPLACE INTO {_VERSIONS} VALUES (?, ?)", [snap.qualified_name, snap.version]
        )
        plan = _fast_path_plan(snap) if fast_path and local_root(snap.table) is not None else None
        if plan is not None:
            # file_uris() %-escapes spaces and other characters of the path.
            files = ", ".join(_literal(str(local_path(uri))) for uri in snap.file_uris)
            options = ""
            if snap.partition_columns:
                # Our partition columns (_ingest_date, _event_date) are dates DuckDB reads
                # back from the hive-style paths deltalake writes; typed explicitly, or an
                # all-null partition would come back as text.
                types = ", ".join(f"{_literal(c)}: 'DATE'" for c in snap.partition_columns)
                options += f", hive_partitioning = true, hive_types = {{{types}}}"
            if plan == "union":
                # Files written before a schema evolution lack the new columns. This opens
                # every file when the view is bound; without it a partition filter skips
                # other partitions' files unopened.
                options += ", union_by_name = true"
            # Exactly the Delta schema's columns: key=value folders above the data
            # directory would otherwise become columns too.
            columns = ", ".join(_ident(field.name) for field in snap.schema)
            con.execute(
                f"CREATE OR REPLACE VIEW {target} AS "
                f"SELECT {columns} FROM read_parquet([{files}]{options})"
            )
            continue
        relation_name = f"__delta_{snap.layer}_{snap.name}"
        source = (
            snap.table.to_pyarrow_dataset()
            if snap.file_uris
            else pa.Table.from_batches([], schema=snap.schema)
        )
        con.register(relation_name, source)
        con.execute(f"CREATE OR REPLACE VIEW {target} AS SELECT * FROM {_ident(relation_name)}")


def _fast_path_plan(snap: TableSnapshot) -> Literal["plain", "union"] | None:
    """How ``read_parquet`` can serve the table exactly, or ``None`` (use Arrow).

    From the Delta log's statistics: a file written before a column was added has
    none for it. ``plain`` when every file holds every column; ``union`` when some
    file lacks one that others hold; ``None`` when a column is in no file at all
    (a schema change that added no rows), when the log keeps no statistics for a
    column (past the first 32, say), for partition columns that are not our own
    date columns, for empty tables, and for reader features the fast path cannot
    honour (deletion vectors, column mapping).
    """
    if not snap.file_uris or not all(c.startswith("_") for c in snap.partition_columns):
        return None
    by_name = {field.name: field for field in snap.schema}
    if any(not pa.types.is_date32(by_name[c].type) for c in snap.partition_columns):
        return None
    features = snap.table.protocol().reader_features or []
    if {"deletionVectors", "columnMapping"} & set(features):
        return None
    actions = as_pyarrow(snap.table.get_add_actions(flatten=True))
    plan: Literal["plain", "union"] = "plain"
    for field in snap.schema:
        if field.name in snap.partition_columns:
            continue
        stats = f"null_count.{field.name}"
        if stats not in actions.column_names:
            return None
        missing = actions.column(stats).null_count
        if missing == actions.num_rows:
            return None
        if missing:
            plan = "union"
    return plan


def connect(
    data_dir: TableStore | Path | str = "dados",
    *,
    sandboxed: bool = False,
    threads: int | None = None,
    memory_limit_mb: int | None = None,
    fast_path: bool = True,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view ``<layer>.<table>`` over every lakehouse table.

    ``data_dir`` is a table store (``TableStore.from_settings(settings)``, which
    also reaches tables on object storage) or a local data directory. The views
    pin each table's current Delta version; :func:`refresh_views` re-points the
    views of tables that changed since (or call again).
    ``sandboxed`` is for SQL from untrusted users: DuckDB may then open exactly the
    active data files of the tables (not files a newer version removed, not the
    Delta log, not anything else on disk or the network), may not spill to disk,
    and its configuration is locked.
    """
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit_mb is not None:
        con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MB'")
    snapshots = snapshot_tables(as_store(data_dir))
    register_views(con, snapshots, fast_path=fast_path)
    if sandboxed:
        # Remote tables are read through Arrow by deltalake, not by DuckDB: they need no
        # allowed path, and DuckDB keeps no network access.
        active = ", ".join(
            _literal(str(local_path(uri)))
            for snap in snapshots
            if local_root(snap.table) is not None
            for uri in snap.file_uris
        )
        con.execute(f"SET allowed_paths = [{active}]")
        con.execute("SET temp_directory = ''")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
    return con


def refresh_views(
    con: duckdb.DuckDBPyConnection,
    data_dir: TableStore | Path | str = "dados",
    *,
    fast_path: bool = True,
) -> list[str]:
    """Re-point the views of ``con`` at the tables' current versions; what changed.

    Only tables whose Delta version moved (or that are new) are registered again;
    views of tables that were removed are dropped. A sandboxed connection is
    pinned to the files it was allowed to read: open a new one instead.
    """
    locked = con.sql("SELECT current_setting('lock_configuration')").fetchall()[0][0]
    if locked:
        raise ValueError("a sandboxed connection cannot be refreshed; open a new one")
    known = dict(con.sql(f"SELECT name, v FROM {_VERSIONS}").fetchall())
    snapshots = snapshot_tables(as_store(data_dir))
    changed = [s for s in snapshots if known.get(s.qualified_name) != s.version]
    register_views(con, changed, fast_path=fast_path)
    current = {s.qualified_name for s in snapshots}
    removed = sorted(set(known) - current)
    for name in removed:
        layer, table = name.split(".", 1)
        con.execute(f"DROP VIEW IF EXISTS {_ident(layer)}.{_ident(table)}")
        con.execute(f"DELETE FROM {_VERSIONS} WHERE name = ?", [name])
    return sorted(s.qualified_name for s in changed) + removed
