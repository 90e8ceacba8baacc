"""Retention: rows older than a per-layer age are deleted (then reclaimed by vacuum).

Bronze ages by ingestion time, silver by event time, quarantine by quarantine
time, gold by window start (or event time). A layer without a retention keeps
everything, which is the default for every layer.

Gold outlives silver: its refresh skips silver commits made by retention (they
carry ``lakehouse.retention`` in their commit metadata), so expiring old silver
rows never shrinks gold's aggregates. Rebuilds keep that promise too: before rows
are deleted, the cutoff is recorded in the table's properties as its *retention
horizon* (:func:`retention_horizon`), and a rebuild from a table with a horizon keeps
what its own table derived from rows before it (``rebuild_gold``,
``delta_processing.refresh``) instead of recomputing it from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from deltalake import CommitProperties, DeltaTable

from config.contracts import LatestGold, SourceContract, SqlGold, WindowGold
from config.settings import Settings
from delta_processing.tables import Layer, TableStore, as_pyarrow, sync_commit

RETENTION_MARK = "lakehouse.retention"
# Table property: the latest cutoff retention deleted rows before (ISO 8601, UTC).
HORIZON_PROPERTY = "lakehouse.retention.horizon"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Days of data kept per layer; ``None`` keeps everything."""

    bronze_days: int | None = None
    silver_days: int | None = None
    quarantine_days: int | None = None
    gold_days: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The retention of each layer as configured (``LAKEHOUSE_RETENTION_*_DAYS``)."""
        return cls(
            bronze_days=settings.retention_bronze_days,
            silver_days=settings.retention_silver_days,
            quarantine_days=settings.retention_quarantine_days,
            gold_days=settings.retention_gold_days,
        )

    def days(self, layer: Layer) -> int | None:
        """The retention of ``layer`` (``_meta`` is never expired)."""
        return {
            "bronze": self.bronze_days,
            "silver": self.silver_days,
            "quarantine": self.quarantine_days,
            "gold": self.gold_days,
        }.get(layer)


@dataclass(frozen=True)
class RetentionResult:
    """Rows deleted from one table."""

    table: str
    cutoff: datetime
    rows_deleted: int


def retention_targets(contract: SourceContract) -> list[tuple[Layer, str, str]]:
    """``(layer, table, time column)`` of every table of ``contract`` that can age."""
    targets: list[tuple[Layer, str, str]] = [
        ("bronze", contract.name, "_ingested_at"),
        ("silver", contract.name, contract.event_time),
        ("quarantine", contract.name, "_quarantined_at"),
    ]
    for spec in contract.gold:
        if isinstance(spec, WindowGold):
            targets.append(("gold", spec.name, "window_start"))
        elif isinstance(spec, SqlGold):
            targets.append(("gold", spec.name, spec.window_column))
        elif isinstance(spec, LatestGold):
            targets.append(("gold", spec.name, contract.event_time))
    return targets


def apply_retention(
    store: TableStore, contracts: list[SourceContract], policy: RetentionPolicy, now: datetime
) -> list[RetentionResult]:
    """Delete expired rows from every table of ``contracts`` whose layer has a retention."""
    results = []
    for contract in contracts:
        for layer, name, column in retention_targets(contract):
            days = policy.days(layer)
            table = store.open(layer, name) if days is not None else None
            if table is None or days is None:
                continue
            cutoff = now - timedelta(days=days)
            deleted = expire(table, column, cutoff)
            if deleted:
                results.append(RetentionResult(f"{layer}/{name}", cutoff, deleted))
    return results


def retention_horizon(table: DeltaTable) -> datetime | None:
    """Before when ``table`` may have lost rows to retention (``None``: it never did).

    Rows of the retention column before the horizon may be gone; rows at or after it
    are all there. Recorded by :func:`expire` before it deletes anything.
    """
    value = table.metadata().configuration.get(HORIZON_PROPERTY)
    return datetime.fromisoformat(value) if value else None


def expire(table: DeltaTable, column: str, cutoff: datetime) -> int:
    """Delete rows with ``column`` before ``cutoff``; the commit is marked as retention.

    The cutoff becomes the table's :func:`retention_horizon` first (a commit of its
    own, only when rows may go and the horizon moves): a rebuild that meets a horizon
    recorded for rows a crash kept from being deleted keeps what derived from them,
    the safe side; a horizon recorded after the delete could be missing.
    """
    mark = CommitProperties(custom_metadata={RETENTION_MARK: cutoff.isoformat()})
    horizon = retention_horizon(table)
    if (horizon is None or horizon < cutoff) and _may_hold_before(table, column, cutoff):
        table.alter.set_table_properties(
            {HORIZON_PROPERTY: cutoff.isoformat()},
            raise_if_not_exists=False,  # our own property, not one of Delta's
            commit_properties=mark,
        )
        sync_commit(table, table.version())
    metrics = table.delete(f"\"{column}\" < '{cutoff.isoformat()}'", commit_properties=mark)
    deleted = int(metrics.get("num_deleted_rows", 0) or 0)
    if deleted:
        sync_commit(table, table.version())  # the delete moved it to its commit
        log.info("retention.expired", table=table.table_uri, column=column, rows=deleted)
    return deleted


def _may_hold_before(table: DeltaTable, column: str, cutoff: datetime) -> bool:
    """Whether a row of ``table`` may have ``column`` before ``cutoff``, judged by the
    file statistics in its log (no data file is read; no statistics: maybe)."""
    actions = as_pyarrow(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return False
    name = f"min.{column}"
    if name not in actions.column_names:
        return True
    lowest = actions.column(name)
    if lowest.null_count:
        return True
    try:
        return bool(pc.any(pc.less(lowest, pa.scalar(cutoff, lowest.type))).as_py())
    except (pa.ArrowException, TypeError, ValueError):  # a column of another type
        return True
