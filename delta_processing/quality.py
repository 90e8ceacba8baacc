"""Quality metrics: one row per silver batch in the Delta table ``_meta/quality``.

Each row counts what happened to the batch's records (in, passed to silver,
warned, dropped, quarantined) and how many broke each expectation (the
contract's own type and presence rules appear as ``_contract``). Rows are
written exactly once per batch: the table records, per source, the last bronze
version whose metrics it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from config.contracts import SourceContract
from delta_processing.tables import Layer

QUALITY_LAYER: Layer = "_meta"
QUALITY_TABLE = "quality"
CONTRACT_CHECK = "_contract"
EVOLUTION_CHECK = "_evolution"  # "failed" counts rows carrying undeclared fields

EXPECTATION_RESULT = pl.Struct({"name": pl.String, "action": pl.String, "failed": pl.Int64})
QUALITY_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "bronze_version": pl.Int64(),
        "evaluated_at": pl.Datetime("us", "UTC"),
        "rows_in": pl.Int64(),
        "rows_passed": pl.Int64(),
        "rows_warned": pl.Int64(),
        "rows_dropped": pl.Int64(),
        "rows_quarantined": pl.Int64(),
        "expectations": pl.List(EXPECTATION_RESULT),
    }
)


def quality_app_id(source: str) -> str:
    """Application-transaction id of ``source``'s rows in the shared quality table."""
    return f"lakehouse/quality<-bronze/{source}"


@dataclass(frozen=True)
class BatchQuality:
    """The counts of one silver batch."""

    rows_in: int
    rows_passed: int
    rows_warned: int
    rows_dropped: int
    rows_quarantined: int
    contract_failures: int
    expectation_failures: dict[str, int]
    evolution_mode: str = "rescue"
    evolution_rows: int = 0  # rows that carried fields the contract does not declare


def quality_row(
    contract: SourceContract, bronze_version: int, quality: BatchQuality
) -> pl.DataFrame:
    """The ``_meta/quality`` row of one batch (pure)."""
    results = [
        {"name": CONTRACT_CHECK, "action": "quarantine", "failed": quality.contract_failures},
        {
            "name": EVOLUTION_CHECK,
            "action": quality.evolution_mode,
            "failed": quality.evolution_rows,
        },
    ]
    results += [
        {"name": e.name, "action": e.action, "failed": quality.expectation_failures.get(e.name, 0)}
        for e in contract.expectations
    ]
    return pl.DataFrame(
        [
            {
                "source": contract.name,
                "bronze_version": bronze_version,
                "evaluated_at": datetime.now(UTC),
                "rows_in": quality.rows_in,
                "rows_passed": quality.rows_passed,
                "rows_warned": quality.rows_warned,
                "rows_dropped": quality.rows_dropped,
                "rows_quarantined": quality.rows_quarantined,
                "expectations": results,
            }
        ],
        schema=QUALITY_SCHEMA,
    )
