"""Decoding of batches (request bodies and dropped files) into raw record frames.

Every writer and the bronze job read batches through this module, so a record
means the same thing whichever way it arrived. Records come out *raw*: every
column is a string (numbers and booleans in their JSON spelling, nested
objects and arrays as JSON text), like Auto Loader's schema-less JSON mode.
Typing happens in silver, against the source contract; bronze therefore never
rejects a record for its shape, whatever JSON the sender invents.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import polars as pl
import pyarrow as pa
from polars.datatypes import DataTypeClass

from landing_zone.sampled_ndjson import read_sampled_raw

BatchFormat = Literal["json", "ndjson", "csv", "parquet"]
# A record as it lands: field name -> raw string (JSON null -> None).
RawRecord = dict[str, str | None]

CONTENT_TYPES: dict[str, BatchFormat] = {
    "application/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/json-lines": "ndjson",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}

FILE_SUFFIXES: dict[str, BatchFormat] = {
    ".json": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".csv": "csv",
    ".parquet": "parquet",
}


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). Polars decodes a lone one to NUL
# (silently changing the data); the Python path pairs them or refuses lone ones.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_BOM = b"\xef\xbb\xbf"


# JSON bodies up to this size holding one record skip the Polars reader (see decode_batch).
SMALL_JSON_BYTES = 4096


class BatchDecodeError(ValueError):
    """Base of the errors raised while turning bytes into records."""


class UnsupportedFormat(BatchDecodeError):
    """The content type or file suffix names no format we can read."""


class MalformedBatch(BatchDecodeError):
    """The bytes do not parse as the declared format.

    ``line`` (1-based, for text formats) or ``record`` (1-based) says where, when known.
    """

    def __init__(self, message: str, *, line: int | None = None, record: int | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        where = where or (f"record {record}: " if record is not None else "")
        super().__init__(where + message)
        self.line = line
        self.record = record


class BatchTooLarge(BatchDecodeError):
    """The batch decompresses to more bytes than allowed."""


def format_for_content_type(content_type: str | None) -> BatchFormat:
    """Map a ``Content-Type`` header (parameters ignored) to a batch format."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        return CONTENT_TYPES[media_type]
    except KeyError:
        accepted = ", ".join(sorted(CONTENT_TYPES))
        shown = media_type or "<none>"
        raise UnsupportedFormat(
            f"unsupported content type {shown!r}; accepted: {accepted}"
        ) from None


def format_for_filename(name: str) -> tuple[BatchFormat, bool]:
    """Map a landing file name to ``(format, gzipped)``; ``.gz`` may follow any text suffix."""
    gzipped = name.endswith(".gz")
    stem = name[: -len(".gz")] if gzipped else name
    for suffix, fmt in FILE_SUFFIXES.items():
        if stem.endswith(suffix):
            return fmt, gzipped
    raise UnsupportedFormat(f"file {name!r} has no supported suffix ({', '.join(FILE_SUFFIXES)})")


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip ``data``, refusing to inflate past ``max_bytes`` (zip bombs).

    Every member is read, as ``gzip -d`` does: concatenated ``.gz`` files are valid gzip,
    and stopping after the first member would silently drop the records of the others.
    """
    if not data:
        raise MalformedBatch("truncated gzip stream")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(max_bytes + 1)
    except EOFError:
        raise MalformedBatch("truncated gzip stream") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise MalformedBatch(f"invalid gzip data: {exc}") from None
    if len(out) > max_bytes:
        raise BatchTooLarge(f"gzip body inflates past the limit of {max_bytes} bytes")
    return out


def decode_batch(data: bytes, fmt: BatchFormat) -> pl.DataFrame:
    """Parse one batch into a raw (all-string) frame, one row per record.

    Raises :class:`MalformedBatch` naming the line or record at fault.
    """
    decoded = decode_for_landing(data, fmt)
    return decoded if isinstance(decoded, pl.DataFrame) else _frame_of(decoded)


def decode_for_landing(data: bytes, fmt: BatchFormat) -> pl.DataFrame | pa.Table:
    """:func:`decode_batch`'s records in the form cheapest to land: for large NDJSON,
    the raw Arrow table (see :mod:`landing_zone.sampled_ndjson`), else the raw frame."""
    if fmt == "parquet":
        return _decode_parquet(data)
    data = _text_body(data)
    if fmt == "csv":
        return _decode_csv(data)
    record = _small_flat_record(data, fmt)
    if record is not None:
        return raw_frame([record])
    return _decode_json_family(data, ndjson=fmt == "ndjson")


def decode_small(data: bytes, fmt: BatchFormat) -> RawRecord | pl.DataFrame:
    """:func:`decode_batch`'s records, parsed once; a small JSON or NDJSON body holding one
    flat record (a device's reading) comes back as that raw record, without building a
    frame (~25x cheaper).

    Raises :class:`MalformedBatch` exactly as :func:`decode_batch` would.
    """
    if fmt not in ("json", "ndjson"):
        return decode_batch(data, fmt)
    data = _text_body(data)
    record = _small_flat_record(data, fmt)
    if record is None:
        decoded = _decode_json_family(data, ndjson=fmt == "ndjson")
        return decoded if isinstance(decoded, pl.DataFrame) else _frame_of(decoded)
    if not record or (b"\\" in data and _SURROGATE_ESCAPE.search(data)):
        # No field (an empty frame), or a surrogate escape, which only the frame
        # construction judges (lone ones have no UTF-8 form).
        return raw_frame([record])
    return {name: _raw_value(value) for name, value in record.items()}


def raw_table(records: Sequence[RawRecord]) -> pa.Table:
    """Raw records as an Arrow table of string columns, as :func:`decode_batch` would frame
    them: columns in order of first appearance, absent fields null. Each record needs a
    field (a table without columns has no rows)."""
    if not all(records):
        raise ValueError("a raw record needs at least one field")
    columns = {name: [record.get(name) for record in records] for name in field_names(records)}
    return pa.table({name: pa.array(values, pa.large_string()) for name, values in columns.items()})


def concat_records(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """Frames of raw records stacked in order: columns in order of first appearance,
    absent values null (``pl.concat(how="diagonal_relaxed")``).

    Protects records without a field (``{}``): a frame of them has rows but no
    columns, and Polars' diagonal concatenation drops such a frame's rows when another
    frame has columns, which would lose acknowledged records and shift every row after
    them onto the wrong landing file.
    """
    if len(frames) == 1:
        return frames[0]
    if all(frame.width for frame in frames):
        return pl.concat(frames, how="diagonal_relaxed")
    held = [
        frame if frame.width else frame.with_columns(pl.lit(None, pl.String).alias(_FIELDLESS))
        for frame in frames
    ]
    return pl.concat(held, how="diagonal_relaxed").drop(_FIELDLESS)


def field_names(records: Sequence[Mapping[str, object]]) -> list[str]:
    """Every field name of ``records``, in order of first appearance.

    Consecutive records mostly share their fields, so only a change of shape is merged
    in: frames are then built a column at a time instead of a record at a time.
    """
    names: dict[str, None] = {}
    shape: object = None
    for record in records:
        keys = record.keys()
        if keys != shape:
            names.update(dict.fromkeys(keys))
            shape = keys
    return list(names)


def _text_body(data: bytes) -> bytes:
    """A text body without its byte order mark; MalformedBatch if it holds nothing."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]  # a UTF-8 byte order mark is accepted, in every text format
    if not data.strip():
        raise MalformedBatch("empty body: expected at least one record")
    return data


def _small_flat_record(data: bytes, fmt: BatchFormat) -> dict[str, object] | None:
    """The record of a small JSON/NDJSON body holding one record of scalars, else ``None``.

    Parsing that in Python is ~6x cheaper than starting a Polars reader, and with a
    single record of scalars there is no type unification, so the raw strings are
    exactly the ones the Polars path makes.
    """
    if fmt not in ("json", "ndjson") or len(data) > SMALL_JSON_BYTES:
        return None
    records = _ndjson_records(data) if fmt == "ndjson" else _json_records(data)
    if len(records) == 1 and not any(isinstance(v, dict | list) for v in records[0].values()):
        return records[0]
    return None


def _frame_of(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def read_batch_file(raw: bytes, name: str, max_bytes: int) -> pl.DataFrame:
    """Decode a landing file's bytes, choosing the format from its name."""
    fmt, gzipped = format_for_filename(name)
    if gzipped:
        raw = gunzip(raw, max_bytes)
    return decode_batch(raw, fmt)


def _decode_json_family(data: bytes, *, ndjson: bool) -> pl.DataFrame | pa.Table:
    reader = pl.read_ndjson if ndjson else pl.read_json
    try:
        if b"\\" in data and _SURROGATE_ESCAPE.search(data):  # `in` (memchr): a fast first look
            raise ValueError("surrogate escapes: parsed in Python")
        sampled = read_sampled_raw(data) if ndjson else None
        if sampled is not None:  # raw already, and checked as below
            return sampled
        frame = reader(io.BytesIO(data), infer_schema_length=None)
        if not ndjson and not _booleans_kept(data, frame):
            raise ValueError("read_json turned booleans into numbers")
        if not _floats_exact(frame):
            # An integer past 2**53 sharing a column with floats would lose digits.
            raise ValueError("long integers in a float column")
        if not _nested_kept(data, frame, ndjson=ndjson):
            raise ValueError("type unification rewrote nested values")
        return to_raw_strings(frame)
    except Exception:
        # Polars rejects malformed input without a position, and cannot type some valid
        # shapes (arrays mixing objects and numbers). Parse in Python: it either locates
        # the fault or yields records that we stringify ourselves.
        records = _ndjson_records(data) if ndjson else _json_records(data)
    return raw_frame(records)


def _nested_kept(data: bytes, frame: pl.DataFrame, *, ndjson: bool) -> bool:
    """Whether Polars' type unification left the meaning of every nested value alone.

    Inferring one type per column, Polars turns the numbers, booleans and containers of
    an array that also holds strings into strings (``[1, "a"]`` -> ``["1", "a"]``) and
    gives every object of a column the keys of all of them (missing ones null). Either
    adds quotes to the value's JSON text, and nothing else in unification does: so a
    column is kept if its values, read again as JSON text (what Polars makes of a nested
    value read as a string), hold as many quotes as the unified ones. A JSON array is
    read again as the one array of an NDJSON line (``read_json`` cannot read a nested
    value as text).
    """
    nested = [
        name
        for name, dtype in frame.schema.items()
        if dtype.is_nested() and not _unification_proof(dtype)
    ]
    if not nested:
        return True
    try:
        texts = _nested_texts(data, nested, ndjson=ndjson)
    except Exception:  # cannot tell: the exact path decides
        return False
    if texts.height != frame.height:
        return False
    unified = to_raw_strings(frame.select(nested))
    quotes = [
        texts[name]
        .str.count_matches('"', literal=True)
        .ne_missing(unified[name].str.count_matches('"', literal=True))
        for name in nested
    ]
    return not pl.select(pl.any_horizontal(quotes).any()).item()


def _nested_texts(data: bytes, nested: list[str], *, ndjson: bool) -> pl.DataFrame:
    """The ``nested`` columns of ``data`` read as JSON text, one row per record."""
    as_text = {name: pl.String() for name in nested}  # other fields are skipped
    if ndjson:
        return pl.read_ndjson(io.BytesIO(data), schema=as_text)
    body = data.lstrip()
    array = body if body.startswith(b"[") else b"[" + body + b"]"
    records = pl.Struct(as_text)
    line = pl.read_ndjson(io.BytesIO(b'{"r":' + array + b"}"), schema={"r": pl.List(records)})
    return line.explode("r").unnest("r")


def _unification_proof(dtype: pl.DataType) -> bool:
    """Arrays (of arrays) of numbers or booleans: no unification rewrites their values."""
    while isinstance(dtype, pl.List | pl.Array):
        dtype = _instance(dtype.inner)
    return dtype.is_numeric() or dtype == pl.Boolean


def _instance(dtype: pl.DataType | DataTypeClass) -> pl.DataType:
    """A data type as an instance (Polars hands inner types over as classes at times)."""
    return dtype() if isinstance(dtype, type) else dtype


def _floats_exact(frame: pl.DataFrame) -> bool:
    """No float, also inside arrays and objects, holds a magnitude where an integer
    could have lost digits (2**53)."""
    checks = [
        check for name, dtype in frame.schema.items() for check in _too_big(pl.col(name), dtype)
    ]
    if not checks:
        return True
    return not frame.select(pl.any_horizontal(checks).any()).item()


def _too_big(value: pl.Expr, dtype: pl.DataType) -> list[pl.Expr]:
    """Per row, whether a float of ``value`` (of type ``dtype``) is at or past 2**53."""
    if dtype == pl.Float64:
        return [value.abs() >= 2**53]
    if isinstance(dtype, pl.List):
        checks = _too_big(pl.element(), _instance(dtype.inner))
        if not checks:
            return []
        return [value.list.eval(pl.any_horizontal(checks)).list.any()]
    if isinstance(dtype, pl.Struct):
        return [
            check
            for field in dtype.fields
            for check in _too_big(value.struct.field(field.name), _instance(field.dtype))
        ]
    return []


def _booleans_kept(data: bytes, frame: pl.DataFrame) -> bool:
    """Whether every ``true``/``false`` in ``data`` is a value of a Boolean column.

    ``read_json`` (unlike ``read_ndjson``) silently turns booleans that share a column
    with numbers into numbers (``true`` -> ``1``). Each Boolean value stems from one
    literal, and the byte count bounds the literals, so equality proves none was lost.
    """
    literals = data.count(b"true") + data.count(b"false")
    if not literals:
        return True
    kept = sum(
        frame.get_column(name).count()
        for name, dtype in frame.schema.items()
        if dtype == pl.Boolean
    )
    return kept == literals


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def json_kind(value: object) -> str:
    """What a parsed JSON value is, as an error message names it ("an array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def json_object_error(value: bytes) -> str | None:
    """Why ``value`` (one message on its own, not a batch) is not one JSON object, or
    ``None`` when it is. JSON as this module reads it: ``NaN`` and ``Infinity`` refused."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}: {exc.reason}"
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(parsed, dict):
        return f"expected a JSON object, got {json_kind(parsed)}"
    return None


def first_wins(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose repeated keys keep their first value, as Polars' reader does."""
    record: dict[str, object] = {}
    for key, value in pairs:
        record.setdefault(key, value)
    return record


def _loads(text: bytes) -> object:
    return json.loads(
        text.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=first_wins
    )


def _ndjson_records(data: bytes) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        value = _located(functools.partial(_loads, line), line=number)
        if not isinstance(value, dict):
            raise MalformedBatch(f"expected a JSON object, got {_kind(value)}", line=number)
        records.append(value)
    return records


def _json_records(data: bytes) -> list[dict[str, object]]:
    value = _located(lambda: _loads(data), line=None)
    records = [value] if isinstance(value, dict) else value
    if not isinstance(records, list):
        raise MalformedBatch("expected a JSON object or an array of JSON objects")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise MalformedBatch(f"expected a JSON object, got {_kind(record)}", record=index)
    return records


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# A column that keeps the rows of field-less frames through a concatenation (see
# concat_records); the control character keeps it apart from any field name.
_FIELDLESS = "\x01fieldless"


def raw_frame(records: Sequence[Mapping[str, object]]) -> pl.DataFrame:
    """Stringify parsed records the way :func:`to_raw_strings` does typed columns (raw
    records, already strings, as they are)."""
    columns = {
        name: [_raw_value(record.get(name)) for record in records] for name in field_names(records)
    }
    if not columns:
        # Records without a field are still records: one row each, no columns (a frame
        # built from no columns would have no rows, and the records would vanish).
        return pl.DataFrame({"_": [None] * len(records)}).drop("_")
    try:
        return pl.DataFrame(columns, schema=dict.fromkeys(columns, pl.String))
    except UnicodeEncodeError as exc:  # JSON can spell a lone surrogate; UTF-8 cannot
        raise MalformedBatch(
            f"invalid JSON: a string holds a lone UTF-16 surrogate "
            f"(\\u{ord(exc.object[exc.start]):04x}), which has no UTF-8 form"
        ) from None


def _raw_value(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _located(parse: Callable[[], object], *, line: int | None) -> object:
    """Run a JSON parse, turning its failure into a MalformedBatch with a position."""
    try:
        return parse()
    except UnicodeDecodeError as exc:
        raise MalformedBatch(f"invalid UTF-8 at byte {exc.start}", line=line) from None
    except json.JSONDecodeError as exc:
        position = f"{exc.msg} (column {exc.colno})"
        raise MalformedBatch(f"invalid JSON: {position}", line=line or exc.lineno) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedBatch(f"invalid JSON: {exc}", line=line) from None


def _decode_csv(data: bytes) -> pl.DataFrame:
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, raise_if_empty=True)
    except Exception as exc:
        _raise_ragged_csv(data)
        raise MalformedBatch(f"invalid CSV: {_first_line(exc)}") from None
    # Polars pads short rows with nulls, so a ragged row leaves its last field null. Only
    # then (rare in clean data) re-read the rows in Python to tell it from an empty field.
    if frame.width and frame.get_column(frame.columns[-1]).null_count():
        _raise_ragged_csv(data)
    if any('"' in name for name in frame.columns):
        # Polars keeps the doubled quotes of a quoted header ("a""b" -> a""b); values are
        # unescaped right. The csv module reads the header line as written.
        text = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
        header = next(csv.reader(text), [])
        if len(header) == frame.width and len(set(header)) == frame.width:
            frame = frame.rename(dict(zip(frame.columns, header, strict=True)))
    return frame


def _raise_ragged_csv(data: bytes) -> None:
    """Raise MalformedBatch at the first row whose field count differs from the header's."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MalformedBatch(f"invalid UTF-8 at byte {exc.start}", line=line) from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        width = len(next(reader, []))
        end = reader.line_num
        for row in reader:
            if row and len(row) != width:
                raise MalformedBatch(
                    f"invalid CSV: expected {width} fields as in the header, found {len(row)}",
                    line=end + 1,
                )
            end = reader.line_num
    except csv.Error:
        return  # not locatable here: the caller reports the parser's own message


def _decode_parquet(data: bytes) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise MalformedBatch(f"invalid Parquet: {_first_line(exc)}") from None
    for name, dtype in frame.schema.items():
        if dtype.is_nested() and _holds_binary(dtype):
            # Polars panics (instead of raising) when asked to write such values as JSON.
            raise MalformedBatch(
                f"unsupported Parquet column {name!r}: binary values inside {dtype} "
                "have no JSON text form"
            )
    try:
        return to_raw_strings(frame)
    except Exception as exc:
        raise MalformedBatch(f"unsupported Parquet data: {_first_line(exc)}") from None


def _holds_binary(dtype: pl.DataType | DataTypeClass) -> bool:
    if isinstance(dtype, pl.List | pl.Array):
        return _holds_binary(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_holds_binary(field.dtype) for field in dtype.fields)
    return dtype == pl.Binary


def to_raw_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Turn a typed frame (e.g. from Parquet) into the raw all-string shape of bronze."""
    if all(dtype == pl.String for dtype in frame.schema.values()):
        return frame  # raw already (landing files the writers made): nothing to evaluate
    return frame.with_columns(
        _raw_string(name, dtype).alias(name) for name, dtype in frame.schema.items()
    )


def _raw_string(name: str, dtype: pl.DataType) -> pl.Expr:
    column = pl.col(name)
    if dtype == pl.String:
        return column
    if isinstance(dtype, pl.Datetime):
        fmt = "%Y-%m-%dT%H:%M:%S%.f" + ("%:z" if dtype.time_zone else "")
        return column.dt.to_string(fmt)
    if isinstance(dtype, pl.Duration):
        return column.dt.to_string("iso")
    if isinstance(dtype, pl.Struct):
        return pl.when(column.is_null()).then(None).otherwise(column.struct.json_encode())
    if isinstance(dtype, pl.List | pl.Array):
        # json_encode works on structs only: wrap, encode, then strip the wrapper.
        wrapped = pl.struct(column.alias("v")).struct.json_encode()
        encoded = wrapped.str.strip_prefix('{"v":').str.strip_suffix("}")
        return pl.when(column.is_null()).then(None).otherwise(encoded)
    if dtype == pl.Binary:
        return column.bin.encode("base64")
    return column.cast(pl.String)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "CONTENT_TYPES",
    "BatchDecodeError",
    "BatchFormat",
    "BatchTooLarge",
    "MalformedBatch",
    "RawRecord",
    "UnsupportedFormat",
    "decode_batch",
    "decode_for_landing",
    "decode_small",
    "field_names",
    "format_for_content_type",
    "format_for_filename",
    "gunzip",
    "json_kind",
    "json_object_error",
    "raw_frame",
    "raw_table",
    "read_batch_file",
    "to_raw_strings",
]
