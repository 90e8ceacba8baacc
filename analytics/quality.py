"""Reading the data-quality metrics that silver records in ``_meta/quality``."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from delta_processing.quality import QUALITY_LAYER, QUALITY_SCHEMA, QUALITY_TABLE
from delta_processing.tables import TableStore, as_store, read_snapshot


def read_quality(
    data_dir: TableStore | Path, source: str | None = None, last: int = 20
) -> pl.DataFrame:
    """The most recent quality rows (newest first), optionally of one source.

    ``data_dir`` is the table store, or a local data directory holding the tables.
    """
    table = as_store(data_dir).open(QUALITY_LAYER, QUALITY_TABLE)
    if table is None:
        return pl.DataFrame(schema=QUALITY_SCHEMA)
    rows = read_snapshot(table)
    if source is not None:
        rows = rows.filter(pl.col("source") == source)
    return rows.sort("evaluated_at", descending=True).head(last).collect()
