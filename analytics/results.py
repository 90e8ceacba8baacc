"""Query results as the clients get them: JSON rows, CSV, or a Polars frame.

DuckDB can return what JSON and Polars cannot hold as-is (duplicate column
names, intervals, blobs); every result must still serialise, so such values
take a slower, general path instead of failing the request.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
from typing import Any

import polars as pl
import pyarrow as pa


def unique_names(table: pa.Table) -> pa.Table:
    """Rename repeated column names (``a``, ``a`` -> ``a``, ``a_1``)."""
    seen: set[str] = set()
    names = []
    for name in table.column_names:
        candidate, counter = name, 0
        while candidate in seen:
            counter += 1
            candidate = f"{name}_{counter}"
        seen.add(candidate)
        names.append(candidate)
    return table.rename_columns(names)


def to_frame(table: pa.Table) -> pl.DataFrame:
    """A Polars frame of the result (names made unique)."""
    frame = pl.from_arrow(unique_names(table))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _iso_intervals(table: pa.Table) -> pa.Table:
    """Intervals as ISO-8601 durations (``P1M2DT3.5S``): JSON has no interval type."""
    for index, field in enumerate(table.schema):
        if pa.types.is_interval(field.type):
            text = [
                None if v is None else f"P{v.months}M{v.days}DT{v.nanoseconds / 1e9:g}S"
                for v in table.column(index).to_pylist()
            ]
            table = table.set_column(index, field.name, pa.array(text, pa.string()))
    return table


def rows_json(table: pa.Table) -> str:
    """The rows as a JSON array of objects (ISO-8601 times and intervals, base64 blobs)."""
    table = _iso_intervals(unique_names(table))
    try:
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.write_json()
    except BaseException as exc:  # Polars panics on some types: take the general path
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
    return json.dumps(table.to_pylist(), default=_jsonable, allow_nan=False)


def columns_json(table: pa.Table) -> str:
    """``[{"name", "type"}]`` of the result, with the names :func:`rows_json` uses."""
    table = unique_names(table)
    return json.dumps([{"name": f.name, "type": str(f.type)} for f in table.schema])
