"""DuckDB connections with every lakehouse table as a view ``<layer>.<table>``.

Fast path: a view over ``read_parquet`` of the table's *active* files at one
Delta version (``DeltaTable.file_uris()``), which is exact for our tables (no
deletion vectors, no column mapping) and several times faster than scanning a
registered Arrow dataset. Tables the fast path cannot honour (partition values
live only in the Delta log) and empty tables are served through Arrow.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from analytics.catalog import TableSnapshot, snapshot_tables
from delta_processing.tables import LAYERS


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
        if snap.file_uris and not snap.partition_columns:
            files = ", ".join(_literal(_local_path(uri)) for uri in snap.file_uris)
            # union_by_name: files written before a schema evolution lack the new columns.
            con.execute(
                f"CREATE OR REPLACE VIEW {target} AS "
                f"SELECT * FROM read_parquet([{files}], union_by_name = true)"
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


def table_directories(data_dir: Path) -> list[str]:
    """The directories a sandboxed connection may read: the layers' tables, nothing else."""
    root = data_dir.resolve()
    return [f"{root / layer}/" for layer in LAYERS]


def connect(
    data_dir: Path | str = "dados", *, sandboxed: bool = False, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view ``<layer>.<table>`` over every lakehouse table.

    The views pin each table's current Delta version; call again to see newer data.
    ``sandboxed`` forbids file and network access outside the tables and locks the
    configuration, for running SQL from untrusted users.
    """
    data_dir = Path(data_dir)
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    register_views(con, snapshot_tables(data_dir))
    if sandboxed:
        allowed = ", ".join(_literal(d) for d in table_directories(data_dir))
        con.execute(f"SET allowed_directories = [{allowed}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
    return con
