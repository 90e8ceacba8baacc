"""NDJSON typed from its first lines, when that provably equals typing it from all of them.

:func:`landing_zone.formats.decode_batch` types an NDJSON body the way
``polars.read_ndjson(infer_schema_length=None)`` does: from *every* line, so that a
late line can never change a column's type unnoticed. That inference costs about
three times the parse itself. Here the schema is inferred from the first lines
only, and the whole body is then parsed by pyarrow's JSON reader with that schema
as its *explicit* schema, which refuses (instead of converting or dropping) any key
outside the schema, a repeated key, and any value of another JSON type than its
column's. So if it succeeds, every line holds only keys of the sample, with values
of the sample's types, and full inference gives the same schema and values
(an integer in a float column becomes that float either way).

Only flat schemas (string, integer, float, boolean columns; no all-null column)
qualify, and only bodies whose every line starts an object: pyarrow accepts some
things Polars refuses (two values on a line, ``NaN`` and ``Infinity``), which are
checked for. Anything else returns ``None`` and the caller takes the full path, so
this changes only speed, never a result. The result is the raw Arrow table itself:
the landing writer stores it as it is, without a detour through a Polars frame.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

# Below this the full inference is cheap anyway.
MIN_BYTES = 64 * 1024
# The sample: the complete lines within the first this many bytes.
SAMPLE_BYTES = 16 * 1024

_ARROW_TYPES: dict[pl.DataType, pa.DataType] = {
    pl.String(): pa.string(),
    pl.Int64(): pa.int64(),
    pl.Float64(): pa.float64(),
    pl.Boolean(): pa.bool_(),
}


def read_sampled_raw(data: bytes) -> pa.Table | None:
    """The raw (all-string) records of ``data`` (NDJSON, no byte order mark) exactly as
    :func:`landing_zone.formats.decode_batch` makes them through full inference, or
    ``None`` when that cannot be established cheaply (then take the full path)."""
    table = _parse(data)
    if table is None:
        return None
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if field.type == pa.string():
            columns.append(column)
            continue
        if field.type == pa.float64() and _suspect(column):
            return None
        # Numbers and booleans spelled the way Polars spells them (the full path's way).
        series = pl.from_arrow(column)
        assert isinstance(series, pl.Series)
        columns.append(series.cast(pl.String).to_arrow())
    return pa.Table.from_arrays(columns, names=table.column_names)


def _suspect(column: pa.ChunkedArray) -> bool:
    """Whether a float column holds values the full path may make differently: NaN and
    Infinity literals (pyarrow reads them, JSON has not), magnitudes where an integer
    may have lost digits (2**53), or negative zero (Polars reads the integer ``-0`` as
    0, pyarrow as -0.0; its bits are those of the smallest int64)."""
    odd = pc.or_(pc.is_nan(column), pc.greater_equal(pc.abs(column), 2.0**53))  # inf too
    bits = pa.chunked_array([chunk.view(pa.int64()) for chunk in column.chunks], pa.int64())
    negative_zero = pc.equal(bits, -(2**63))
    return bool(pc.any(pc.or_(odd, negative_zero)).as_py())


def _parse(data: bytes) -> pa.Table | None:
    """``data`` typed by its sample's schema, checked by pyarrow line by line; or ``None``."""
    if len(data) < MIN_BYTES or not data.startswith(b"{"):
        return None
    lines = _object_lines(data)
    if lines is None:
        return None
    schema = _sample_schema(data)
    if schema is None:
        return None
    options = pa_json.ParseOptions(
        explicit_schema=schema, unexpected_field_behavior="error", newlines_in_values=False
    )
    try:
        table = pa_json.read_json(
            pa.BufferReader(data),
            # One block, one thread: a block must hold whole lines, and the API's
            # workers already keep every core busy.
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
            parse_options=options,
        )
    except (pa.ArrowException, ValueError):
        return None
    return table if table.num_rows == lines else None  # else 2 values on some line


def _object_lines(data: bytes) -> int | None:
    """How many lines ``data`` has if every one starts an object (none blank), else ``None``."""
    try:
        text = pl.Series([data.decode("utf-8")]).str  # Polars counts ~3x faster than bytes
    except UnicodeDecodeError:
        return None
    newlines = int(text.count_matches("\n", literal=True)[0])
    lines = int(text.count_matches("\n{", literal=True)[0]) + 1
    return lines if lines == newlines + (0 if data.endswith(b"\n") else 1) else None


def _sample_schema(data: bytes) -> pa.Schema | None:
    """The flat Arrow schema Polars infers from the first lines, or ``None``."""
    end = data.rfind(b"\n", 0, SAMPLE_BYTES)
    if end <= 0:
        return None
    try:
        inferred = pl.read_ndjson(data[:end], infer_schema_length=None).schema
    except Exception:  # malformed: the full path finds and reports the fault
        return None
    fields = []
    for name, dtype in inferred.items():
        if "\0" in name:  # Arrow's C interface (pyarrow -> Polars) cannot carry the name
            return None
        arrow_type = _ARROW_TYPES.get(dtype)
        if arrow_type is None:  # nested or all-null: later lines could widen it
            return None
        fields.append(pa.field(name, arrow_type))
    return pa.schema(fields) if fields else None
