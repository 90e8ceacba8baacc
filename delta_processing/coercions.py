"""Coercions: raw (string) bronze values to the types a source contract declares.

Pure Polars expressions, no I/O. Every value either converts or yields a
reason naming the field and the offending raw value; nothing is silently
turned into null.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import polars as pl

from config.contracts import FieldSpec, FieldType, SourceContract
from delta_processing.column_names import PLATFORM_COLUMNS

SILVER_TIME = pl.Datetime("us", "UTC")
REASON_COLUMN = "_reason"

SILVER_DTYPES: dict[FieldType, pl.DataType] = {
    "string": pl.String(),
    "int": pl.Int64(),
    "float": pl.Float64(),
    "bool": pl.Boolean(),
    "timestamp": SILVER_TIME,
    "date": pl.Date(),
    "json": pl.String(),
}


def silver_dtype(spec: FieldSpec) -> pl.DataType:
    """The Polars (and so Delta) type a contract field is stored as in silver."""
    if spec.type == "decimal":
        assert spec.precision is not None  # enforced by the contract model
        return pl.Decimal(spec.precision, spec.scale or 0)
    return SILVER_DTYPES[spec.type]


def contract_dtypes(contract: SourceContract) -> dict[str, pl.DataType]:
    """Every contract field with its silver type, in declaration order."""
    return {spec.name: silver_dtype(spec) for spec in contract.fields}


# Accepted spellings of timestamps, tried in order. Offsets are converted to UTC;
# values without an offset are taken as UTC.
_ZONED_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M%z",
)
_NAIVE_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
)
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


# The spelling nearly every writer sends (UTC with ``Z``), parsed as it is: about 7x
# cheaper than the general zoned parse, which first rewrites ``Z`` into ``+00:00`` with a
# regex. Every value it accepts, the general spellings accept with the same instant
# (a property test holds them to it), so it changes speed only.
_ZULU_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"


def timestamp_candidates(raw: pl.Expr) -> list[pl.Expr]:
    """The accepted timestamp spellings, in order of preference, each as a parse of ``raw``."""
    zulu = raw.str.to_datetime(_ZULU_FORMAT, strict=False, time_unit="us", time_zone="UTC")
    return [zulu, *general_timestamp_candidates(raw)]


def general_timestamp_candidates(raw: pl.Expr) -> list[pl.Expr]:
    """:func:`timestamp_candidates` without the fast path for the common spelling."""
    text = raw.str.strip_chars()
    zoned = text.str.replace(r"[zZ]$", "+00:00")
    epoch_ms = (
        pl.when(text.str.contains(_NUMBER))
        .then((text.cast(pl.Float64, strict=False) * 1000).round(0).cast(pl.Int64, strict=False))
        .otherwise(None)
    )
    return (
        [
            zoned.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
            for fmt in _ZONED_FORMATS
        ]
        + [
            text.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
            for fmt in _NAIVE_FORMATS
        ]
        + [epoch_ms.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")]
    )


def parse_timestamp(raw: pl.Expr) -> pl.Expr:
    """ISO-8601 (with or without offset; ``Z`` allowed) or epoch milliseconds, to UTC."""
    return pl.coalesce(timestamp_candidates(raw))


def parse_float(raw: pl.Expr) -> pl.Expr:
    """Finite decimal numbers only: NaN and infinities are not readings."""
    value = raw.str.strip_chars().cast(pl.Float64, strict=False)
    return pl.when(value.is_finite()).then(value).otherwise(None)


def parse_int(raw: pl.Expr) -> pl.Expr:
    """Integers, also when spelled as an integral float (``"3.0"``)."""
    text = raw.str.strip_chars()
    as_float = text.cast(pl.Float64, strict=False)
    integral = pl.when(as_float.is_finite() & (as_float == as_float.round(0))).then(as_float)
    return pl.coalesce([text.cast(pl.Int64, strict=False), integral.cast(pl.Int64, strict=False)])


def parse_bool(raw: pl.Expr) -> pl.Expr:
    """``true/false``, ``1/0``, ``yes/no`` in any case."""
    text = raw.str.strip_chars().str.to_lowercase()
    return (
        pl.when(text.is_in(["true", "1", "yes"]))
        .then(True)
        .when(text.is_in(["false", "0", "no"]))
        .then(False)
        .otherwise(None)
    )


def date_candidates(raw: pl.Expr) -> list[pl.Expr]:
    """``YYYY-MM-DD`` first, then the UTC date of each accepted timestamp spelling."""
    text = raw.str.strip_chars()
    return [
        text.str.to_date("%Y-%m-%d", strict=False),
        *(candidate.dt.date() for candidate in timestamp_candidates(raw)),
    ]


def parse_date(raw: pl.Expr) -> pl.Expr:
    """``YYYY-MM-DD``, or the UTC date of any accepted timestamp."""
    return pl.coalesce(date_candidates(raw))


def parse_decimal(raw: pl.Expr, precision: int, scale: int) -> pl.Expr:
    """Decimal numbers rounded to ``scale``; too many integer digits do not parse."""
    return raw.str.strip_chars().cast(pl.Decimal(precision, scale), strict=False)


def _as_json_text(text: str) -> str | None:
    # Bronze keeps JSON strings unquoted: text that is not JSON is a JSON string.
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    except RecursionError:
        return None  # too deeply nested: "cannot parse", quarantined
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None  # NaN/Infinity have no JSON form


def parse_json(raw: pl.Expr) -> pl.Expr:
    """Canonical JSON text of a value (objects, arrays, scalars)."""
    return raw.map_elements(_as_json_text, return_dtype=pl.String, skip_nulls=True)


_PARSERS: dict[FieldType, Callable[[pl.Expr], pl.Expr]] = {
    "string": lambda raw: raw,
    "int": parse_int,
    "float": parse_float,
    "bool": parse_bool,
    "timestamp": parse_timestamp,
    "date": parse_date,
    "json": parse_json,
}


def _parse(spec: FieldSpec, raw: pl.Expr) -> pl.Expr:
    if spec.type == "decimal":
        assert spec.precision is not None
        return parse_decimal(raw, spec.precision, spec.scale or 0)
    return _PARSERS[spec.type](raw)


# Suffix of the typed copy of a raw column while both exist. Raw names cannot contain
# control characters (bronze replaces them), so this can never shadow a field.
TYPED = "\x01typed"


def raw_column(name: str, columns: list[str]) -> pl.Expr:
    """The raw bronze column of contract field ``name`` (Delta names are case-insensitive)."""
    by_lower = {c.lower(): c for c in columns}
    found = by_lower.get(name.lower())
    return pl.col(found) if found is not None else pl.lit(None, dtype=pl.String)


# Types whose parse tries several spellings: see first_parse.
_CANDIDATES: dict[FieldType, Callable[[pl.Expr], list[pl.Expr]]] = {
    "timestamp": timestamp_candidates,
    "date": date_candidates,
}


def with_typed_columns(rows: pl.DataFrame, contract: SourceContract, suffix: str) -> pl.DataFrame:
    """``rows`` plus each contract field converted to its type, named ``<field><suffix>``.

    Each field is parsed by its type's parser (``_parse``), except that fields with several
    accepted spellings are parsed by :func:`first_parse`, which reads a batch of one
    spelling in one pass, to the same values.
    """
    columns = rows.columns
    present = {c.lower() for c in columns}
    # An absent field is a null literal, which the expression path broadcasts to every row.
    cascaded = [s for s in contract.fields if s.type in _CANDIDATES and s.name.lower() in present]
    out = rows.with_columns(
        _parse(spec, raw_column(spec.name, columns))
        .cast(silver_dtype(spec))
        .alias(f"{spec.name}{suffix}")
        for spec in contract.fields
        if spec not in cascaded
    )
    return out.with_columns(
        first_parse(
            rows.select(raw_column(spec.name, columns).alias(spec.name)),
            _CANDIDATES[spec.type](pl.col(spec.name)),
            silver_dtype(spec),
        ).alias(f"{spec.name}{suffix}")
        for spec in cascaded
    )


def first_parse(raw: pl.DataFrame, candidates: list[pl.Expr], dtype: pl.DataType) -> pl.Series:
    """Per row, the first candidate parse that is not null: ``pl.coalesce(candidates)``.

    ``pl.coalesce`` evaluates every candidate on every row (seven passes for a
    timestamp); here each candidate only sees the rows all earlier ones left null, so a
    batch whose values share one spelling costs one pass. ``raw`` holds the one column
    the candidates read.
    """
    result = raw.select(candidates[0].cast(dtype)).to_series()
    present = raw.to_series().is_not_null()
    for candidate in candidates[1:]:
        pending = (result.is_null() & present).arg_true()
        if pending.is_empty():
            break
        parsed = raw[pending].select(candidate.cast(dtype)).to_series()
        hit = parsed.is_not_null()
        if hit.any():
            result = result.scatter(pending.filter(hit), parsed.filter(hit))
    return result


def violation_reasons(contract: SourceContract, columns: list[str]) -> pl.Expr:
    """``_reason``: why a row breaks the contract (``;``-joined), or null if it does not.

    Must be evaluated on a frame that holds both raw columns and the typed ones
    (named ``<field>`` + :data:`TYPED`).
    """
    required = set(contract.required_fields)
    reasons = []
    for name, ftype in contract.field_types.items():
        raw = raw_column(name, columns)
        typed = pl.col(f"{name}{TYPED}")
        if name in required:
            reasons.append(
                pl.when(raw.is_null()).then(pl.lit(f"{name}: required field is missing"))
            )
        reasons.append(
            pl.when(raw.is_not_null() & typed.is_null()).then(
                pl.format("{}: cannot parse {} as {}", pl.lit(name), _quoted(raw), pl.lit(ftype))
            )
        )
    joined = pl.concat_str(reasons, separator="; ", ignore_nulls=True)
    return pl.when(joined.str.len_chars() > 0).then(joined).otherwise(None).alias(REASON_COLUMN)


def _quoted(raw: pl.Expr) -> pl.Expr:
    shown = pl.when(raw.str.len_chars() > 80).then(raw.str.slice(0, 77) + "...").otherwise(raw)
    return pl.concat_str([pl.lit("'"), shown, pl.lit("'")])


def apply_contract(
    bronze_rows: pl.DataFrame, contract: SourceContract
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw bronze rows into ``(typed, rejected)``.

    ``typed`` has the contract's columns with their declared types, the platform
    columns (lineage, change feed, ``_arrival``) and ``_raw``, a struct of the raw
    record (for expectations that quarantine the row later). ``rejected`` keeps
    every raw column plus ``_reason``.
    """
    columns = bronze_rows.columns
    platform = [c for c in columns if c.lower() in PLATFORM_COLUMNS]
    raw_fields = [c for c in columns if c not in platform]
    checked = with_typed_columns(bronze_rows, contract, TYPED).with_columns(
        violation_reasons(contract, columns)
    )
    ok = pl.col(REASON_COLUMN).is_null()
    rejected = checked.filter(~ok).select([*columns, REASON_COLUMN])
    raw = [pl.struct(raw_fields).alias("_raw")] if raw_fields else []
    typed = checked.filter(ok).select(
        [pl.col(f"{name}{TYPED}").alias(name) for name in contract.field_types]
        + [pl.col(c) for c in platform]
        + raw
    )
    return typed, rejected
