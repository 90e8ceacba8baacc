"""Source contracts: what a source's records must look like once they reach silver.

A contract is one TOML file per source (``config/sources/<name>.toml`` for the
built-ins, plus an optional operator directory). It names the typed fields, the
key that de-duplicates silver, the event-time column, and the gold tables
derived from the source.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SOURCE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
FIELD_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
BUILTIN_CONTRACTS_DIR = Path(__file__).parent / "sources"

FieldType = Literal["string", "int", "float", "bool", "timestamp", "date", "decimal", "json"]
SEQUENCE_TYPES = frozenset({"int", "float", "timestamp", "date", "decimal", "string"})


class ContractError(ValueError):
    """A contract file is unreadable or breaks a rule; the message names file and field."""


def is_valid_source_name(name: str) -> bool:
    """Source names become directory names: lowercase identifiers only, no path tricks."""
    return bool(SOURCE_NAME_RE.fullmatch(name))


_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d)$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """Parse ``"15m"``, ``"1h"``, ``"1d"`` style durations."""
    match = _DURATION_RE.fullmatch(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: expected a positive <n>s|m|h|d such as '1h'")
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    """One typed column of the silver table.

    ``decimal`` fields need ``precision`` (1-38) and take ``scale`` (default 0);
    values are rounded to the scale (half to even). ``json`` fields hold JSON text.
    """

    name: str = Field(pattern=FIELD_NAME_RE.pattern)
    type: FieldType
    required: bool = False
    precision: int | None = Field(None, ge=1, le=38)
    scale: int | None = Field(None, ge=0, le=38)

    @model_validator(mode="after")
    def _decimal_shape(self) -> FieldSpec:
        if self.type == "decimal":
            if self.precision is None:
                raise ValueError(f"decimal field {self.name!r} needs a precision (1-38)")
            if (self.scale or 0) > self.precision:
                raise ValueError(f"decimal field {self.name!r}: scale exceeds precision")
        elif self.precision is not None or self.scale is not None:
            raise ValueError(f"field {self.name!r}: precision/scale apply to decimals only")
        return self


AGGREGATES = ("count", "min", "max", "avg", "sum", "first", "last", "stddev")
_PERCENTILE = re.compile(r"^p(\d{1,2})$")
DEFAULT_AGGREGATES = ("count", "min", "max", "avg", "sum")


class WindowGold(_Strict):
    """Time-window aggregates of one value per group.

    ``aggregates`` from count, min, max, avg, sum, first, last (by event time),
    stddev (sample) and percentiles ``p1``..``p99``; each becomes a column of that name.
    """

    name: str = Field(pattern=SOURCE_NAME_RE.pattern)
    kind: Literal["window"]
    every: str
    group_by: list[str] = Field(min_length=1)
    value: str
    aggregates: list[str] = Field(default_factory=lambda: list(DEFAULT_AGGREGATES), min_length=1)

    @field_validator("every")
    @classmethod
    def _valid_every(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("aggregates")
    @classmethod
    def _valid_aggregates(cls, values: list[str]) -> list[str]:
        for value in values:
            match = _PERCENTILE.fullmatch(value)
            if value not in AGGREGATES and not (match and 0 < int(match.group(1)) < 100):
                raise ValueError(
                    f"unknown aggregate {value!r}: use {', '.join(AGGREGATES)} or p1..p99"
                )
        if len(set(values)) != len(values):
            raise ValueError("aggregates must be unique")
        return values


class SqlGold(_Strict):
    """A gold table defined by a DuckDB SQL query over the source's silver rows.

    The query reads the table ``silver`` and must output ``window_column``: the
    start of the ``every``-long event-time window each row belongs to (e.g.
    ``date_trunc('day', ts) AS day`` with ``every = "1d"``). Only the windows
    touched by changed silver rows are recomputed and replaced.
    """

    name: str = Field(pattern=SOURCE_NAME_RE.pattern)
    kind: Literal["sql"]
    query: str = Field(min_length=1)
    window_column: str = Field(pattern=FIELD_NAME_RE.pattern)
    every: str

    @field_validator("every")
    @classmethod
    def _valid_every(cls, value: str) -> str:
        parse_duration(value)
        return value


class LatestGold(_Strict):
    """The latest value (by event time) per group."""

    name: str = Field(pattern=SOURCE_NAME_RE.pattern)
    kind: Literal["latest"]
    group_by: list[str] = Field(min_length=1)
    value: str


GoldSpec = Annotated[WindowGold | LatestGold | SqlGold, Field(discriminator="kind")]

EvolutionMode = Literal["add", "rescue", "fail", "freeze"]


class Partitioning(BaseModel):
    """How each layer's table of a source is partitioned.

    ``ingest_date`` partitions bronze by the UTC date rows arrived (``_ingest_date``);
    ``event_date`` partitions silver by the UTC date of the event time
    (``_event_date``), which also prunes silver MERGEs when the event time is part
    of the key. ``window_date`` (the default) partitions every window gold table by the
    UTC date of its windows (``_window_date``): a MERGE rewrites whole files, and
    without partitions a window table is one file that every micro-batch rewrites in
    full, so its cost would grow with the table's age. An existing gold table keeps
    the layout it was created with (``lakehouse refresh gold/NAME`` rebuilds it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bronze: Literal["none", "ingest_date"] = "none"
    silver: Literal["none", "event_date"] = "none"
    gold: Literal["none", "window_date"] = "window_date"


ExpectationKind = Literal["not_null", "range", "regex", "allowed", "unique", "predicate"]
ExpectationAction = Literal["warn", "drop", "quarantine", "fail"]


class Expectation(_Strict):
    """A data-quality rule on typed silver rows, and what to do with rows that break it.

    ``warn`` keeps and counts them, ``drop`` removes and counts them, ``quarantine``
    sends them to ``quarantine/<source>`` with the expectation's name, ``fail``
    rejects the whole batch (nothing is committed; it is retried until the contract
    or the data is fixed). Nulls pass every kind but ``not_null``.
    """

    name: str = Field(pattern=FIELD_NAME_RE.pattern)
    kind: ExpectationKind
    action: ExpectationAction = "quarantine"
    column: str | None = None
    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    values: list[str | int | float | bool] | None = None
    predicate: str | None = Field(
        None, description="Polars SQL expression over the typed fields, true when the row passes."
    )

    @model_validator(mode="after")
    def _shape(self) -> Expectation:
        needs = {
            "not_null": ("column",),
            "range": ("column",),
            "regex": ("column", "pattern"),
            "allowed": ("column", "values"),
            "unique": ("column",),
            "predicate": ("predicate",),
        }[self.kind]
        for attribute in needs:
            if getattr(self, attribute) is None:
                raise ValueError(f"expectation {self.name!r} ({self.kind}) needs {attribute!r}")
        if self.kind == "range" and self.min is None and self.max is None:
            raise ValueError(f"range expectation {self.name!r} needs min and/or max")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"expectation {self.name!r}: invalid regex: {exc}") from None
        return self

    def describe(self) -> str:
        """A readable statement of the rule, used in quarantine reasons."""
        match self.kind:
            case "not_null":
                return f"{self.column} is not null"
            case "range":
                low = "-inf" if self.min is None else f"{self.min:g}"
                high = "inf" if self.max is None else f"{self.max:g}"
                return f"{self.column} in [{low}, {high}]"
            case "regex":
                return f"{self.column} matches /{self.pattern}/"
            case "allowed":
                return f"{self.column} in {self.values}"
            case "unique":
                return f"{self.column} unique within the batch"
            case _:
                return str(self.predicate)


class SourceContract(_Strict):
    """The declared shape of one source, applied when bronze rows are promoted to silver."""

    name: str = Field(pattern=SOURCE_NAME_RE.pattern)
    description: str = ""
    fields: list[FieldSpec] = Field(min_length=1)
    keys: list[str] = Field(min_length=1)
    event_time: str
    sequence: str | None = Field(
        None,
        description="Field deciding which version of a key wins (greatest; ties: latest arrival).",
    )
    evolution: EvolutionMode = Field(
        "rescue",
        description="Undeclared fields: add as columns, rescue into _rescued_data, fail the "
        "batch into quarantine, or freeze (drop and count).",
    )
    gold: list[GoldSpec] = Field(default_factory=list)
    expectations: list[Expectation] = Field(default_factory=list)
    partitioning: Partitioning = Field(default_factory=Partitioning)
    protected: list[str] = Field(
        default_factory=list,
        description='Tables `lakehouse refresh` must never rebuild: "silver" and/or gold names.',
    )

    @model_validator(mode="after")
    def _consistent(self) -> SourceContract:
        types = {f.name: f.type for f in self.fields}
        if len(types) != len(self.fields):
            raise ValueError("field names must be unique")
        for key in self.keys:
            if key not in types:
                raise ValueError(f"key column {key!r} is not a declared field")
        if types.get(self.event_time) != "timestamp":
            raise ValueError(f"event_time {self.event_time!r} must be a declared timestamp field")
        required = set(self.required_fields)
        if self.event_time not in required:
            raise ValueError(f"event_time {self.event_time!r} must be required (or a key)")
        if self.sequence is not None:
            if types.get(self.sequence) not in SEQUENCE_TYPES:
                raise ValueError(
                    f"sequence {self.sequence!r} must be a declared field of type "
                    f"{', '.join(sorted(SEQUENCE_TYPES))}"
                )
            if self.sequence not in required:
                raise ValueError(f"sequence {self.sequence!r} must be required")
        exp_names = [e.name for e in self.expectations]
        if len(set(exp_names)) != len(exp_names):
            raise ValueError("expectation names must be unique")
        for expectation in self.expectations:
            if expectation.column is not None and expectation.column not in types:
                raise ValueError(
                    f"expectation {expectation.name!r} uses undeclared field {expectation.column!r}"
                )
        names = [g.name for g in self.gold]
        if len(set(names)) != len(names):
            raise ValueError("gold table names must be unique")
        for table in self.protected:
            if table != "silver" and table not in names:
                raise ValueError(f"protected table {table!r} is neither 'silver' nor a gold table")
        for spec in self.gold:
            if isinstance(spec, SqlGold):
                continue  # checked when the query first runs
            for column in [*spec.group_by, spec.value]:
                if column not in types:
                    raise ValueError(f"gold {spec.name!r} uses undeclared field {column!r}")
            if isinstance(spec, LatestGold) and {self.event_time, spec.value} & set(spec.group_by):
                raise ValueError(
                    f"gold {spec.name!r}: a latest-value table cannot group by its event time "
                    "or its value"
                )
            for column in spec.group_by:
                # Null groups would never match a MERGE key: gold would silently drop them.
                if column not in required:
                    raise ValueError(
                        f"gold {spec.name!r} groups by {column!r}, which must be required"
                    )
            if types[spec.value] not in ("int", "float", "decimal"):
                raise ValueError(f"gold {spec.name!r} value {spec.value!r} must be numeric")
        return self

    @property
    def field_types(self) -> dict[str, FieldType]:
        """Field name to declared type, in declaration order."""
        return {f.name: f.type for f in self.fields}

    @property
    def field_specs(self) -> dict[str, FieldSpec]:
        """Field name to its full declaration."""
        return {f.name: f for f in self.fields}

    @property
    def required_fields(self) -> list[str]:
        """Fields that must be present and valid (keys are always required)."""
        return [f.name for f in self.fields if f.required or f.name in self.keys]


def load_contract_file(path: Path) -> SourceContract:
    """Read and validate one contract file.

    Raises :class:`ContractError` with one ``<file>:<line>: <problem>`` line per problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ContractError(f"{path}: cannot read contract: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = found.group(1) if found else text.count("\n") + 1  # "at end of document"
        where = f"{path}:{line}"
        raise ContractError(f"{where}: invalid TOML: {exc}") from None
    try:
        contract = SourceContract.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            line = locate(text, loc, message)
            where = f"{path}:{line}" if line else str(path)
            field = ".".join(str(p) for p in loc)
            problems.append(f"{where}: {field + ': ' if field else ''}{message}")
        raise ContractError("\n".join(problems)) from None
    if contract.name != path.stem:
        line = locate(text, ("name",), "")
        raise ContractError(
            f"{path}:{line}: contract name {contract.name!r} must match the file name"
        )
    return contract


_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z_]+)\s*\]\]?\s*(#.*)?$")
_QUOTED = re.compile(r"'([^']+)'")


def locate(text: str, loc: tuple[str | int, ...], message: str) -> int | None:
    """Best line number (1-based) in a contract's TOML text for a validation error.

    ``loc`` is pydantic's error location (``("fields", 2, "type")``); errors of the
    whole contract carry no location, so the first quoted name in the message
    (``key column 'nope' ...``) is looked up instead.
    """
    lines = text.splitlines()

    def key_line(start: int, end: int, key: str) -> int | None:
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number in range(start, end):
            if pattern.match(lines[number]):
                return number + 1
        return None

    headers = [(n, m.group(1)) for n, line in enumerate(lines) if (m := _HEADER.match(line))]
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
        starts = [n for n, name in headers if name == loc[0]]
        if loc[1] < len(starts):
            start = starts[loc[1]]
            end = next((n for n, _ in headers if n > start), len(lines))
            found = key_line(start + 1, end, str(loc[2])) if len(loc) > 2 else None
            return found or start + 1
    if len(loc) == 1 and isinstance(loc[0], str):
        top_end = headers[0][0] if headers else len(lines)
        return key_line(0, top_end, loc[0])
    quoted = _QUOTED.search(message)
    if quoted:
        needle = re.compile(rf"[\"']{re.escape(quoted.group(1))}[\"']")
        for number, line in enumerate(lines, start=1):
            if needle.search(line):
                return number
    return None


def validate_contract_files(paths: list[Path]) -> list[str]:
    """Every problem of every contract file, one ``<file>:<line>: <problem>`` line each."""
    problems: list[str] = []
    loaded: dict[str, SourceContract] = {}
    for path in paths:
        try:
            contract = load_contract_file(path)
        except ContractError as exc:
            problems.extend(str(exc).splitlines())
            continue
        loaded[contract.name] = contract  # a later directory overrides a built-in
    try:
        check_gold_names(loaded.values())
    except ContractError as exc:
        problems.append(str(exc))
    return problems


def contract_files(extra_dir: Path | None) -> list[Path]:
    """The built-in contract files, then those of ``extra_dir``."""
    files = sorted(BUILTIN_CONTRACTS_DIR.glob("*.toml"))
    if extra_dir is not None and extra_dir.is_dir():
        files += sorted(extra_dir.glob("*.toml"))
    return files


@dataclass(frozen=True)
class ContractRegistry(Mapping[str, SourceContract]):
    """All known sources by name. Unknown sources are rejected by the writers (404)."""

    contracts: Mapping[str, SourceContract]

    def __getitem__(self, name: str) -> SourceContract:
        return self.contracts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.contracts))

    def __len__(self) -> int:
        return len(self.contracts)


def load_contracts(extra_dir: Path | None = None) -> ContractRegistry:
    """Load the built-in contracts, then those in ``extra_dir`` (same name replaces built-in)."""
    if extra_dir is not None and not extra_dir.is_dir():
        raise ContractError(f"{extra_dir}: contracts directory does not exist")
    contracts: dict[str, SourceContract] = {}
    for path in contract_files(extra_dir):
        contract = load_contract_file(path)
        contracts[contract.name] = contract
    check_gold_names(contracts.values())
    return ContractRegistry(contracts)


def check_gold_names(contracts: Iterable[SourceContract]) -> None:
    """Gold tables share one namespace (``gold/<name>``): two sources may not both claim one."""
    owner: dict[str, str] = {}
    for contract in contracts:
        for spec in contract.gold:
            if spec.name in owner:
                raise ContractError(
                    f"gold table {spec.name!r} is declared by both {owner[spec.name]!r} and "
                    f"{contract.name!r}; gold names must be unique across sources"
                )
            owner[spec.name] = contract.name
