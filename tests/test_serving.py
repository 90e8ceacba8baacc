"""DuckDB serving: views follow table versions; pruning works on the fast and the Arrow path."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from analytics import connect, refresh_views
from analytics.catalog import snapshot_tables
from config.contracts import ContractRegistry, load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from delta_processing.tables import as_store
from tests.helpers import land_records


def _partitioned() -> ContractRegistry:
    readings = load_contracts()["readings"]
    partitioning = readings.partitioning.model_copy(update={"silver": "event_date"})
    return ContractRegistry(
        {"readings": readings.model_copy(update={"partitioning": partitioning})}
    )


def _readings(day: str, device: str, n: int) -> list[dict[str, object]]:
    return [
        {"ts": f"{day}T10:{i:02d}:00Z", "device_id": device, "sensor": "temp", "value": float(i)}
        for i in range(n)
    ]


def _fill(data_dir: Path, contracts: ContractRegistry, *batches: list[dict[str, object]]) -> None:
    processor = Processor(load_settings(data_dir=data_dir, file_settle_ms=0), contracts)
    for rows in batches:
        land_records(data_dir, "readings", rows)
    assert not processor.run_once().failures


def _versions(data_dir: Path) -> dict[str, int]:
    return {snap.qualified_name: snap.version for snap in snapshot_tables(as_store(data_dir))}


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    value = con.sql(sql).fetchall()[0][0]
    assert isinstance(value, int)
    return value


def test_refresh_repoints_only_the_views_whose_table_changed(data_dir: Path) -> None:
    contracts = load_contracts()
    _fill(data_dir, contracts, _readings("2026-11-20", "d1", 3))
    con = connect(data_dir)
    total = "SELECT count(*) FROM silver.readings"
    assert _count(con, total) == 3
    assert refresh_views(con, data_dir) == []  # nothing moved

    before = _versions(data_dir)
    _fill(data_dir, contracts, _readings("2026-11-21", "d2", 4))
    after = _versions(data_dir)
    assert _count(con, total) == 3  # views pin the version they were made at
    changed = refresh_views(con, data_dir)
    # exactly the tables whose version moved (or that are new)
    assert changed == sorted(name for name, v in after.items() if before.get(name) != v)
    assert {"bronze.readings", "silver.readings", "gold.readings_hourly"} <= set(changed)
    assert _count(con, total) == 7
    assert _count(con, "SELECT sum(count) FROM gold.readings_hourly") == 7
    assert refresh_views(con, data_dir) == []

    with pytest.raises(ValueError, match="sandboxed connection cannot be refreshed"):
        refresh_views(connect(data_dir, sandboxed=True), data_dir)


@pytest.mark.parametrize("fast_path", [True, False], ids=["read_parquet", "arrow_dataset"])
def test_partition_pruning_skips_files_of_other_partitions(data_dir: Path, fast_path: bool) -> None:
    """A filter on the partition column never opens another partition's files.

    Proved the hard way: the other day's files are overwritten with garbage, so any
    read of them fails the query.
    """
    contracts = _partitioned()
    _fill(data_dir, contracts, _readings("2026-11-20", "d1", 5), _readings("2026-11-21", "d2", 6))
    silver = DeltaTable(str(data_dir / "silver" / "readings"))
    assert silver.metadata().partition_columns == ["_event_date"]
    uris = silver.file_uris()
    # DuckDB reads the first file's footer to bind the view: break the other day.
    kept = "2026-11-20" if "_event_date=2026-11-20" in uris[0] else "2026-11-21"
    broken_day = "2026-11-21" if kept == "2026-11-20" else "2026-11-20"
    broken = [uri for uri in uris if f"_event_date={broken_day}" in uri]
    assert broken
    for uri in broken:
        Path(uri.removeprefix("file://")).write_bytes(b"not parquet at all" * 100)

    con = connect(data_dir, sandboxed=True, fast_path=fast_path)
    wanted = f"SELECT count(*) FROM silver.readings WHERE _event_date = DATE '{kept}'"
    assert _count(con, wanted) == (5 if kept == "2026-11-20" else 6)
    with pytest.raises(duckdb.Error):  # the check can fail: reading the broken day fails
        _count(con, f"SELECT count(*) FROM silver.readings WHERE _event_date = '{broken_day}'")


def test_statistics_pruning_on_the_arrow_path(data_dir: Path) -> None:
    """The Arrow path skips whole files by the min/max statistics in the Delta log."""
    contracts = load_contracts()  # silver not partitioned: one file per batch
    _fill(data_dir, contracts, _readings("2026-11-20", "d1", 5))
    _fill(data_dir, contracts, _readings("2026-11-22", "d2", 6))
    silver = DeltaTable(str(data_dir / "silver" / "readings"))
    old = [
        action["path"]
        for action in pa.table(silver.get_add_actions(flatten=True)).to_pylist()
        if str(action["max.device_id"]) == "d1"
    ]
    assert len(old) == 1
    (data_dir / "silver" / "readings" / old[0]).write_bytes(b"garbage" * 200)

    con = connect(data_dir, fast_path=False)
    new_rows = (
        "SELECT count(*) FROM silver.readings WHERE ts >= TIMESTAMPTZ '2026-11-22 00:00:00+00'"
    )
    assert _count(con, new_rows) == 6
    with pytest.raises(duckdb.Error):
        _count(con, "SELECT count(*) FROM silver.readings")


def test_notebook_helper_gives_polars_and_pandas_frames(data_dir: Path) -> None:
    import pandas as pd
    import polars as pl

    _fill(data_dir, load_contracts(), _readings("2026-11-20", "d1", 3))
    con = connect(data_dir)
    sql = "SELECT device_id, count FROM gold.readings_hourly"
    as_polars = con.sql(sql).pl()
    as_pandas = con.sql(sql).df()
    assert isinstance(as_polars, pl.DataFrame) and isinstance(as_pandas, pd.DataFrame)
    assert as_polars.to_dicts() == as_pandas.to_dict("records") == [{"device_id": "d1", "count": 3}]


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in con.sql(f"DESCRIBE {table}").fetchall()]


def test_fast_path_serves_the_delta_schema_exactly(tmp_path: Path) -> None:
    """Odd data directory paths, and a column no file holds yet, read the same on both paths."""
    import polars as pl
    from deltalake import write_deltalake

    data_dir = tmp_path / "my data" / "dados"  # file_uris() %-escapes the space
    data_dir.mkdir(parents=True)
    contracts = _partitioned()
    _fill(data_dir, contracts, _readings("2026-11-20", "d1", 3))
    # A foreign table whose latest schema change added a column with no rows behind it.
    meta = data_dir / "gold" / "evolved"
    write_deltalake(str(meta), pl.DataFrame({"a": [1, 2]}).to_arrow())
    empty = pl.DataFrame(schema={"a": pl.Int64, "b": pl.String}).to_arrow()
    write_deltalake(str(meta), empty, mode="append", schema_mode="merge")

    fast, arrow = connect(data_dir), connect(data_dir, fast_path=False)
    for table in ("bronze.readings", "silver.readings", "gold.readings_hourly", "gold.evolved"):
        assert _columns(fast, table) == _columns(arrow, table), table
        rows = f"SELECT * FROM {table} ORDER BY ALL"
        assert fast.sql(rows).pl().equals(arrow.sql(rows).pl()), table
    assert fast.sql("SELECT a, b FROM gold.evolved ORDER BY a").fetchall() == [(1, None), (2, None)]
    assert _count(connect(data_dir, sandboxed=True), "SELECT count(*) FROM silver.readings") == 3
