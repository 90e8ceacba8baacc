"""The DuckDB serving layer: views, their fallbacks, and the sandbox's limits."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from deltalake import write_deltalake

from analytics import (
    QueryFailed,
    QueryLimits,
    QueryRejected,
    QueryRowLimit,
    QueryTimeout,
    connect,
    run_query,
)

LIMITS = QueryLimits(timeout_s=10, max_rows=1000)


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    frame = pl.DataFrame({"day": ["a", "a", "b"], "v": [1, 2, 3]})
    write_deltalake(str(tmp_path / "gold" / "plain"), frame.to_arrow())
    write_deltalake(str(tmp_path / "gold" / "parted"), frame.to_arrow(), partition_by=["day"])
    write_deltalake(str(tmp_path / "silver" / "empty"), frame.head(0).to_arrow())
    # Schema evolution: a later append adds a column older files lack.
    wider = pl.DataFrame({"day": ["c"], "v": [4], "extra": ["x"]})
    write_deltalake(str(tmp_path / "gold" / "plain"), wider.to_arrow(), mode="append",
                    schema_mode="merge")  # fmt: skip
    return tmp_path


def test_views_cover_plain_partitioned_empty_and_evolved_tables(lake: Path) -> None:
    con = connect(lake)
    assert con.sql("SELECT day, v, extra FROM gold.plain ORDER BY v").fetchall() == [
        ("a", 1, None),
        ("a", 2, None),
        ("b", 3, None),
        ("c", 4, "x"),
    ]
    # Partition values live only in the Delta log: the Arrow fallback must supply them.
    assert con.sql("SELECT day, sum(v) FROM gold.parted GROUP BY 1 ORDER BY 1").fetchall() == [
        ("a", 3),
        ("b", 3),
    ]
    assert con.sql("SELECT count(*) FROM silver.empty").fetchall() == [(0,)]
    assert [c[0] for c in con.sql("SELECT * FROM silver.empty").description] == ["day", "v"]


def test_views_pin_a_version_and_a_new_connection_sees_new_data(lake: Path) -> None:
    old = connect(lake)
    write_deltalake(str(lake / "gold" / "plain"), pl.DataFrame({"day": ["z"], "v": [9]}).to_arrow(),
                    mode="append", schema_mode="merge")  # fmt: skip
    assert old.sql("SELECT count(*) FROM gold.plain").fetchall() == [(4,)]
    assert connect(lake).sql("SELECT count(*) FROM gold.plain").fetchall() == [(5,)]


def test_removed_files_are_not_read_after_an_overwrite(lake: Path) -> None:
    write_deltalake(str(lake / "gold" / "plain"), pl.DataFrame({"day": ["o"], "v": [0]}).to_arrow(),
                    mode="overwrite", schema_mode="overwrite")  # fmt: skip
    assert run_query(lake, "SELECT day FROM gold.plain", LIMITS).to_pylist() == [{"day": "o"}]


@pytest.mark.parametrize(
    ("sql", "error", "text"),
    [
        ("ATTACH 'other.db'", QueryRejected, "only SELECT"),
        ("INSTALL httpfs", QueryRejected, "only SELECT"),
        ("LOAD httpfs", QueryRejected, "only SELECT"),
        ("SET threads = 1", QueryRejected, "only SELECT"),
        ("EXPORT DATABASE 'x'", QueryRejected, "only SELECT"),
        ("CREATE TABLE t AS SELECT 1", QueryRejected, "only SELECT"),
        ("SELECT 1; SELECT 2", QueryRejected, "exactly one statement"),
        ("SELECT * FROM read_csv('/etc/passwd')", QueryFailed, "Permission"),
        ("SELECT * FROM read_text('/etc/hostname')", QueryFailed, "Permission"),
        ("SELEC 1", QueryFailed, "syntax"),
        ("SELECT * FROM gold.nope", QueryFailed, "does not exist"),
    ],
)
def test_sandbox_refuses(lake: Path, sql: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        run_query(lake, sql, LIMITS)


def test_sandbox_cannot_read_parquet_outside_the_tables(
    lake: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside") / "secret.parquet"
    pl.DataFrame({"secret": [1]}).write_parquet(outside)
    with pytest.raises(QueryFailed, match="Permission"):
        run_query(lake, f"SELECT * FROM read_parquet('{outside}')", LIMITS)


def test_row_and_time_limits(lake: Path) -> None:
    with pytest.raises(QueryRowLimit, match="more than 10 rows"):
        run_query(lake, "SELECT * FROM range(11)", QueryLimits(timeout_s=10, max_rows=10))
    assert run_query(lake, "SELECT * FROM range(10)", QueryLimits(10, 10)).num_rows == 10
    slow = "SELECT count(*) FROM range(100000000) a, range(100000) b WHERE a.range + b.range = -1"
    with pytest.raises(QueryTimeout, match=r"time limit of 0\.5 s"):
        run_query(lake, slow, QueryLimits(timeout_s=0.5, max_rows=10))


def test_sandbox_sees_only_active_files_not_old_versions_or_the_log(lake: Path) -> None:
    write_deltalake(str(lake / "gold" / "plain"), pl.DataFrame({"day": ["o"], "v": [0]}).to_arrow(),
                    mode="overwrite", schema_mode="overwrite")  # fmt: skip
    table_dir = lake / "gold" / "plain"
    removed = [p for p in table_dir.glob("*.parquet")]
    assert len(removed) > 1  # old files are still on disk until vacuum
    for sql in (
        f"SELECT * FROM read_parquet('{table_dir}/*.parquet')",
        f"SELECT * FROM read_text('{table_dir}/_delta_log/00000000000000000000.json')",
        f"SELECT * FROM glob('{table_dir}/*')",
    ):
        with pytest.raises(QueryFailed, match="Permission"):
            run_query(lake, sql, LIMITS)
    assert run_query(lake, "SELECT count(*) AS n FROM gold.plain", LIMITS).to_pylist() == [{"n": 1}]


def test_sandbox_memory_limit_is_enforced(lake: Path) -> None:
    limits = QueryLimits(timeout_s=30, max_rows=10, memory_limit_mb=64, threads=1)
    greedy = "SELECT list(range) FROM range(50000000)"
    with pytest.raises(QueryFailed, match=r"(?i)memory"):
        run_query(lake, greedy, limits)


def test_every_result_serialises_to_json(lake: Path) -> None:
    import json

    from analytics.results import columns_json, rows_json

    table = run_query(
        lake,
        "SELECT 1 AS a, 2 AS a, INTERVAL 1 DAY AS i, 'x'::BLOB AS b, 1.50::DECIMAL(5,2) AS d, "
        "TIMESTAMPTZ '2026-11-20 10:00:00+00' AS t",
        LIMITS,
    )
    rows = json.loads(rows_json(table))
    assert rows == [
        {
            "a": 1,
            "a_1": 2,
            "i": "P0M1DT0S",
            "b": "eA==",
            "d": "1.50",
            "t": "2026-11-20T10:00:00+00:00",
        }
    ]
    assert [c["name"] for c in json.loads(columns_json(table))] == ["a", "a_1", "i", "b", "d", "t"]
    plain = run_query(lake, "SELECT day, v FROM gold.plain ORDER BY v LIMIT 1", LIMITS)
    assert json.loads(rows_json(plain)) == [{"day": "a", "v": 1}]
