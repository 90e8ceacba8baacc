"""Retention: rows older than a per-layer age are deleted (then reclaimed by vacuum).

Bronze ages by ingestion time, silver by event time, quarantine by quarantine
time, gold by window start (or event time). A layer without a retention keeps
everything, which is the default for every layer.

Gold outlives silver: its refresh skips silver commits made by retention (they
carry ``lakehouse.retention`` in their commit metadata), so expiring old silver
rows never shrinks gold's aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from deltalake import CommitProperties, DeltaTable

from config.contracts import LatestGold, SourceContract, SqlGold, WindowGold
from config.settings import Settings
from delta_processing.tables import Layer, TableStore, sync_commit

RETENTION_MARK = "lakehouse.retention"

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


def expire(table: DeltaTable, column: str, cutoff: datetime) -> int:
    """Delete rows with ``column`` before ``cutoff``; the commit is marked as retention."""
    metrics = table.delete(
        f"\"{column}\" < '{cutoff.isoformat()}'",
        commit_properties=CommitProperties(custom_metadata={RETENTION_MARK: cutoff.isoformat()}),
    )
    deleted = int(metrics.get("num_deleted_rows", 0) or 0)
    if deleted:
        sync_commit(table, table.version())  # the delete moved it to its commit
        log.info("retention.expired", table=table.table_uri, column=column, rows=deleted)
    return deleted
