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

import duckdb
import pyarrow as pa

from analytics.catalog import TableSnapshot, snapshot_tables
from delta_processing.tables import LAYERS, TableStore, as_store, local_root


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def register_views(con: duckdb.DuckDBPyConnection, snapshots: list[TableSnapshot]) -> None:
    """Create one schema per layer and one view per table in ``con``."""
    for layer in LAYERS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(layer)}")
    for snap in snapshots:
        target = f"{_ident(snap.layer)}.{_ident(snap.name)}"
        local = local_root(snap.table) is not None
        if local and snap.file_uris and all(c.startswith("_") for c in snap.partition_columns):
            files = ", ".join(_literal(_local_path(uri)) for uri in snap.file_uris)
            # union_by_name: files written before a schema evolution lack the new columns.
            # Our own partition columns (_ingest_date, _event_date) are dates DuckDB reads
            # back exactly from the hive-style paths deltalake writes.
            hive = ", hive_partitioning = true" if snap.partition_columns else ""
            con.execute(
                f"CREATE OR REPLACE VIEW {target} AS "
                f"SELECT * FROM read_parquet([{files}], union_by_name = true{hive})"
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


def connect(
    data_dir: TableStore | Path | str = "dados",
    *,
    sandboxed: bool = False,
    threads: int | None = None,
    memory_limit_mb: int | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view ``<layer>.<table>`` over every lakehouse table.

    ``data_dir`` is a table store (``TableStore.from_settings(settings)``, which
    also reaches tables on object storage) or a local data directory. The views
    pin each table's current Delta version; call again to see newer data.
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
    register_views(con, snapshots)
    if sandboxed:
        # Remote tables are read through Arrow by deltalake, not by DuckDB: they need no
        # allowed path, and DuckDB keeps no network access.
        active = ", ".join(
            _literal(_local_path(uri))
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
