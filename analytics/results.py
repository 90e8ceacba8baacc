"""Query results as the clients get them: JSON rows, CSV, Arrow IPC, Parquet, or Polars.

DuckDB can return what JSON and Polars cannot hold as-is (duplicate column
names, intervals, blobs); every result must still serialise, so such values
take a slower, general path instead of failing the request.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import io
import json
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


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


def _integral_decimals(table: pa.Table) -> pa.Table:
    """Scale-0 decimals that fit in 64 bits as integers: DuckDB types ``sum(bigint)`` as
    HUGEINT (Arrow ``decimal128(38, 0)``), and a count should be a JSON number, not text.
    """
    for index, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type) and field.type.scale == 0:
            column = table.column(index)
            low, high = pc.min(column).as_py(), pc.max(column).as_py()
            if low is None or (low >= -(2**63) and high < 2**63):
                table = table.set_column(index, field.name, column.cast(pa.int64()))
    return table


def rows_json(table: pa.Table) -> str:
    """The rows as a JSON array of objects (ISO-8601 times and intervals, base64 blobs;
    exact decimals as strings, integral ones that fit in 64 bits as numbers)."""
    table = _integral_decimals(_iso_intervals(unique_names(table)))
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


ResultFormat = Literal["json", "csv", "arrow", "parquet"]
RESULT_FORMATS: tuple[ResultFormat, ...] = ("json", "csv", "arrow", "parquet")
MEDIA_TYPES: dict[ResultFormat, str] = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "arrow": "application/vnd.apache.arrow.stream",
    "parquet": "application/vnd.apache.parquet",
}
_ACCEPTED: dict[str, ResultFormat] = {
    "application/json": "json",
    "text/csv": "csv",
    "application/vnd.apache.arrow.stream": "arrow",
    "application/vnd.apache.arrow.file": "arrow",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}


class UnsupportedResultFormat(ValueError):
    """The client accepts none of the formats results come in."""


def format_for_accept(accept: str | None) -> ResultFormat:
    """The first format the ``Accept`` header lists that we serve (JSON for ``*/*`` or none).

    Raises :class:`UnsupportedResultFormat` naming the formats we do serve.
    """
    if not accept or not accept.strip():
        return "json"
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if media in ("*/*", "application/*"):
            return "json"
        if media in _ACCEPTED:
            return _ACCEPTED[media]
        if media == "text/*":
            return "csv"
    served = ", ".join(sorted(_ACCEPTED))
    raise UnsupportedResultFormat(f"cannot answer with {accept!r}; results come as {served}")


class UnencodableResult(ValueError):
    """The result holds values the requested format cannot represent."""


def encode_result(table: pa.Table, fmt: ResultFormat) -> bytes:
    """The result in ``fmt``: CSV with a header row, an Arrow IPC stream, or a Parquet file.

    JSON is :func:`rows_json` inside the endpoint's envelope; here it is the bare rows.
    Raises :class:`UnencodableResult` naming the column types ``fmt`` cannot hold.
    """
    try:
        return _encode(table, fmt)
    except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError) as exc:
        types = ", ".join(f"{f.name} {f.type}" for f in table.schema)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnencodableResult(
            f"the result cannot be written as {fmt} ({first}); columns: {types}. "
            "Cast those columns (e.g. to VARCHAR) or ask for JSON"
        ) from None


def _encode(table: pa.Table, fmt: ResultFormat) -> bytes:
    if fmt == "json":
        return rows_json(table).encode()
    if fmt == "csv":
        text = _iso_intervals(unique_names(table))
        frame = pl.from_arrow(text)
        assert isinstance(frame, pl.DataFrame)
        blobs = [c for c, t in frame.schema.items() if t == pl.Binary]
        frame = frame.with_columns(pl.col(blobs).bin.encode("base64"))  # as in JSON
        try:
            return frame.write_csv().encode()
        except pl.exceptions.ComputeError:  # nested values: CSV has no place for them
            nested = [c for c, t in frame.schema.items() if t.is_nested()]
            frame = frame.with_columns(pl.col(nested).map_elements(_json_text, pl.String))
            return frame.write_csv().encode()
    sink = io.BytesIO()
    if fmt == "arrow":
        table = unique_names(table)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(unique_names(table), sink, compression="zstd")
    return sink.getvalue()


def _json_text(value: Any) -> str:
    converted = value.to_list() if isinstance(value, pl.Series) else value
    return json.dumps(converted, default=_jsonable)
