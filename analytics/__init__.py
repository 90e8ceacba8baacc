"""Analytics: DuckDB over the lakehouse's Delta tables, for the API, the CLI and notebooks.

>>> from analytics import connect
>>> con = connect("dados")
>>> con.sql("SELECT * FROM gold.readings_hourly").pl()
"""

from analytics.query import (
    QueryError,
    QueryFailed,
    QueryLimits,
    QueryRejected,
    QueryRowLimit,
    QueryTimeout,
    run_query,
)
from analytics.views import connect, refresh_views

__all__ = [
    "QueryError",
    "QueryFailed",
    "QueryLimits",
    "QueryRejected",
    "QueryRowLimit",
    "QueryTimeout",
    "connect",
    "refresh_views",
    "run_query",
]
