"""Expectations: data-quality rules evaluated on typed rows before they reach silver.

Pure Polars; no I/O. Each expectation becomes a boolean "passes" expression;
:func:`evaluate` splits a batch by the actions of the expectations it breaks
and counts every failure, so nothing is dropped without a number to show for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl

from config.contracts import ContractError, Expectation, SourceContract
from delta_processing.coercions import contract_dtypes

REASON_COLUMN = "_reason"
# Working columns: a control character no raw field name can contain (bronze strips them).
WORK = "\x01"
QUARANTINE_FLAG = f"{WORK}quarantine"
DROP_FLAG = f"{WORK}drop"
WARN_FLAG = f"{WORK}warn"


class ExpectationFailed(RuntimeError):
    """A ``fail`` expectation was broken: the whole batch is rejected, nothing committed."""


@dataclass
class ExpectationOutcome:
    """How one batch fared against the expectations of its source."""

    kept: pl.DataFrame
    quarantined: pl.DataFrame
    # Per row: _commit_version, one "broken" flag per expectation name, __warn, __drop.
    checks: pl.DataFrame = field(default_factory=pl.DataFrame)

    def counts(self, since_version: int) -> tuple[dict[str, int], int, int]:
        """``(failed per expectation, warned, dropped)`` over rows from ``since_version``."""
        if self.checks.is_empty():
            return {}, 0, 0
        rows = self.checks.filter(pl.col("_commit_version") >= since_version)
        names = [c for c in rows.columns if c not in ("_commit_version", WARN_FLAG, DROP_FLAG)]
        failed = {name: int(rows[name].sum()) for name in names}
        return failed, int(rows[WARN_FLAG].sum()), int(rows[DROP_FLAG].sum())


def passes(expectation: Expectation, schema: pl.Schema) -> pl.Expr:
    """True where a row satisfies ``expectation`` (nulls pass all kinds but not_null)."""
    if expectation.kind == "predicate":
        assert expectation.predicate is not None
        return pl.sql_expr(expectation.predicate).fill_null(True)
    assert expectation.column is not None
    column = pl.col(expectation.column)
    match expectation.kind:
        case "not_null":
            return column.is_not_null()
        case "range":
            check = pl.lit(True)
            if expectation.min is not None:
                check = check & (column >= expectation.min)
            if expectation.max is not None:
                check = check & (column <= expectation.max)
            return check.fill_null(True)
        case "regex":
            assert expectation.pattern is not None
            return column.cast(pl.String).str.contains(expectation.pattern).fill_null(True)
        case "allowed":
            dtype = schema[expectation.column]
            allowed = pl.Series(expectation.values, strict=False).cast(dtype, strict=False)
            return column.is_in(allowed.implode()).fill_null(True) | column.is_null()
        case _:  # unique within the batch
            return column.is_null() | ~column.is_duplicated()


def check_expectations(contract: SourceContract, schema: pl.Schema) -> None:
    """Raise :class:`ContractError` if an expectation cannot run on typed rows."""
    empty = pl.DataFrame(schema=schema)
    for expectation in contract.expectations:
        try:
            empty.select(passes(expectation, schema))
        except Exception as exc:
            raise ContractError(
                f"source {contract.name!r}: expectation {expectation.name!r} cannot run: "
                f"{str(exc).splitlines()[0]}"
            ) from None


def check_contracts(contracts: Iterable[SourceContract]) -> None:
    """Raise :class:`ContractError` if an expectation of any contract cannot run."""
    for contract in contracts:
        check_expectations(contract, pl.Schema(contract_dtypes(contract)))


def evaluate(rows: pl.DataFrame, contract: SourceContract) -> ExpectationOutcome:
    """Apply the expectations of ``contract`` to typed ``rows``.

    Raises :class:`ExpectationFailed` if a ``fail`` expectation is broken.
    """
    expectations = contract.expectations
    if not expectations or rows.is_empty():
        return ExpectationOutcome(kept=rows, quarantined=rows.clear())
    flags = [f"{WORK}pass_{i}" for i in range(len(expectations))]
    schema = rows.schema
    checked = rows
    errors: dict[str, pl.Series] = {}  # per rule that erred: the error of each row, or null
    for expectation, flag in zip(expectations, flags, strict=True):
        rule = passes(expectation, schema)
        try:
            checked = checked.with_columns(rule.alias(flag))
        except Exception:
            # The rule cannot run on some rows (a CAST in a predicate, say): judge row by
            # row, failing just those, instead of stopping the source forever.
            verdicts, messages = _row_by_row(rows, rule)
            errors[expectation.name] = messages
            checked = checked.with_columns(verdicts.alias(flag))
    failed = {
        e.name: int(checked.height - checked[flag].sum())
        for e, flag in zip(expectations, flags, strict=True)
    }
    for expectation in expectations:
        if expectation.action == "fail" and failed[expectation.name]:
            raise ExpectationFailed(
                f"source {contract.name!r}: expectation {expectation.name!r} "
                f"({expectation.describe()}) failed for {failed[expectation.name]} row(s); "
                "the batch is rejected and will be retried once the contract or data is fixed"
            )

    def broken(action: str) -> pl.Expr:
        selected = [
            ~pl.col(f) for e, f in zip(expectations, flags, strict=True) if e.action == action
        ]
        return pl.any_horizontal(selected) if selected else pl.lit(False)

    def reason(e: Expectation) -> pl.Expr:
        failed_text = pl.lit(f"expectation {e.name} failed: {e.describe()}")
        if e.name not in errors:
            return failed_text
        erred = pl.lit(f"expectation {e.name} could not be evaluated: ") + pl.lit(errors[e.name])
        return pl.when(pl.lit(errors[e.name]).is_not_null()).then(erred).otherwise(failed_text)

    reasons = pl.concat_str(
        [
            pl.when(~pl.col(flag)).then(reason(e))
            for e, flag in zip(expectations, flags, strict=True)
            if e.action == "quarantine"
        ]
        or [pl.lit(None, dtype=pl.String)],
        separator="; ",
        ignore_nulls=True,
    )
    to_quarantine = broken("quarantine")
    to_drop = broken("drop") & ~to_quarantine
    marked = checked.with_columns(
        to_quarantine.alias(QUARANTINE_FLAG),
        to_drop.alias(DROP_FLAG),
        (broken("warn") & ~to_quarantine & ~to_drop).alias(WARN_FLAG),
        reasons.alias(REASON_COLUMN),
    )
    helper_columns = [*flags, QUARANTINE_FLAG, DROP_FLAG, WARN_FLAG]
    checks = marked.select(
        pl.col("_commit_version"),
        *[(~pl.col(f)).alias(e.name) for e, f in zip(expectations, flags, strict=True)],
        pl.col(WARN_FLAG),
        pl.col(DROP_FLAG),
    )
    return ExpectationOutcome(
        kept=marked.filter(~pl.col(QUARANTINE_FLAG) & ~pl.col(DROP_FLAG)).drop(
            [*helper_columns, REASON_COLUMN]
        ),
        quarantined=marked.filter(pl.col(QUARANTINE_FLAG)).drop(helper_columns),
        checks=checks,
    )


def _row_by_row(rows: pl.DataFrame, rule: pl.Expr) -> tuple[pl.Series, pl.Series]:
    """Evaluate ``rule`` one row at a time: (passes, error message or null) per row."""
    verdicts: list[bool] = []
    messages: list[str | None] = []
    for index in range(rows.height):
        try:
            verdict = rows.slice(index, 1).select(rule).item()
        except Exception as exc:
            verdicts.append(False)
            messages.append(str(exc).splitlines()[0])
            continue
        verdicts.append(verdict is not False)
        messages.append(None)
    return pl.Series(verdicts, dtype=pl.Boolean), pl.Series(messages, dtype=pl.String)
