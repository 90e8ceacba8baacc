"""The table catalog: every Delta table of the lakehouse, as the serving layer sees it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from delta_processing.tables import LAYERS, Layer, TableStore


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


def snapshot_tables(data_dir: Path) -> list[TableSnapshot]:
    """Open every table under ``data_dir`` at its latest version."""
    store = TableStore(data_dir)
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
