"""Read-only SQL over the lakehouse views, with time and row limits.

The sandbox has two walls: only a single ``SELECT`` statement is accepted (no
``ATTACH``, ``INSTALL``, ``LOAD``, ``COPY``, ``EXPORT``, ``SET``, DDL), and the
connection itself cannot touch files outside the tables or change its
configuration (:func:`analytics.views.connect` with ``sandboxed=True``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from analytics.views import connect
from config.settings import Settings
from delta_processing.tables import TableStore


class QueryError(Exception):
    """Base of query failures; ``str()`` is safe to show to the user."""


class QueryRejected(QueryError):
    """The SQL is not a single read-only SELECT."""


class QueryFailed(QueryError):
    """DuckDB could not run the query (syntax, unknown table or column, permission)."""


class QueryTimeout(QueryError):
    """The query ran past its time limit and was interrupted."""


class QueryRowLimit(QueryError):
    """The result has more rows than allowed."""


@dataclass(frozen=True)
class QueryLimits:
    """Bounds of one query: wall-clock seconds, result rows, memory and threads."""

    timeout_s: float
    max_rows: int
    memory_limit_mb: int = 1024
    threads: int = 2

    @classmethod
    def from_settings(cls, settings: Settings, max_rows: int | None = None) -> QueryLimits:
        """The configured limits; ``max_rows`` may only lower the configured row limit."""
        rows = min(max_rows or settings.query_max_rows, settings.query_max_rows)
        return cls(
            timeout_s=settings.query_timeout_s,
            max_rows=rows,
            memory_limit_mb=settings.query_memory_limit_mb,
            threads=settings.query_threads,
        )


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Accept exactly one SELECT statement; anything else raises :class:`QueryRejected`."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryFailed(f"SQL syntax error: {exc}") from None
    if len(statements) != 1:
        raise QueryRejected(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRejected(f"only SELECT queries are allowed, not {kind.name}")


def run_query(data_dir: TableStore | Path, sql: str, limits: QueryLimits) -> pa.Table:
    """Run read-only ``sql`` over fresh views of the tables; return the rows as Arrow.

    ``data_dir`` is the table store, or a local data directory holding the tables.
    """
    con = connect(
        data_dir,
        sandboxed=True,
        threads=limits.threads,
        memory_limit_mb=limits.memory_limit_mb,
    )
    try:
        check_read_only(con, sql)
        return _run_with_limits(con, sql, limits)
    finally:
        con.close()


def _run_with_limits(con: duckdb.DuckDBPyConnection, sql: str, limits: QueryLimits) -> pa.Table:
    outcome: dict[str, pa.Table | BaseException] = {}

    def work() -> None:
        try:
            reader = con.sql(sql).to_arrow_reader(min(limits.max_rows + 1, 100_000))
            batches: list[pa.RecordBatch] = []
            rows = 0
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if rows > limits.max_rows:
                    raise QueryRowLimit(
                        f"result has more than {limits.max_rows} rows; "
                        "add a LIMIT or aggregate further"
                    )
            outcome["table"] = pa.Table.from_batches(batches, schema=reader.schema)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="lakehouse-query", daemon=True)
    worker.start()
    worker.join(limits.timeout_s)
    if worker.is_alive():
        con.interrupt()
        worker.join(5)
        raise QueryTimeout(f"query exceeded the time limit of {limits.timeout_s:g} s")
    error = outcome.get("error")
    if isinstance(error, QueryError):
        raise error
    if isinstance(error, duckdb.Error):
        raise QueryFailed(str(error).splitlines()[0]) from None
    if error is not None:
        raise error
    table = outcome["table"]
    assert isinstance(table, pa.Table)
    return table
