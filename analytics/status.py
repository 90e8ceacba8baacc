"""The lakehouse at a glance, for the status page: pipeline, tables, ingestion rate, problems.

Everything here is read from Delta logs and file statistics (no table scans),
except the few newest rows of the quality and dead-letter tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from deltalake import DeltaTable

from analytics.catalog import TableDetails, describe_tables, history_entry
from analytics.quality import read_quality
from config.contracts import ContractRegistry
from delta_processing.tables import TableStore, read_snapshot
from landing_zone.layout import DEAD_LETTERS

# Commits of the last hour read per bronze table at most (one per micro-batch).
MAX_COMMITS_PER_TABLE = 5000
# Metrics that count the rows a commit added, as deltalake and Spark name them.
ADDED_ROWS_METRICS = ("num_added_rows", "numOutputRows", "num_output_rows")
DEAD_LETTER_FIELDS = ("origin", "topic", "error", "received_at", "_ingested_at")


@dataclass(frozen=True)
class PipelineSource:
    """One source and the tables it flows through (``None``: not created yet)."""

    source: str
    declared: bool
    bronze: str | None
    silver: str | None
    quarantine: str | None
    gold: list[str]


@dataclass(frozen=True)
class RateBucket:
    """Rows committed to bronze in one minute (``minute`` is its start, UTC)."""

    minute: datetime
    rows: int
    commits: int


@dataclass(frozen=True)
class LakehouseStatus:
    """What ``GET /v1/status`` answers and the status page draws."""

    generated_at: datetime
    tables: list[TableDetails]
    pipeline: list[PipelineSource]
    ingestion: list[RateBucket]
    ingestion_window_minutes: int
    quality_failures: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    dead_letter_count: int | None
    warnings: list[str] = field(default_factory=list)


def pipeline(contracts: ContractRegistry, tables: list[TableDetails]) -> list[PipelineSource]:
    """Sources -> bronze -> silver -> gold, from the contracts and the tables that exist."""
    present = {(t.layer, t.name) for t in tables}

    def ref(layer: str, name: str) -> str | None:
        return f"{layer}/{name}" if (layer, name) in present else None

    sources = [
        PipelineSource(
            source=name,
            declared=True,
            bronze=ref("bronze", name),
            silver=ref("silver", name),
            quarantine=ref("quarantine", name),
            gold=[f"gold/{g.name}" for g in contract.gold if ("gold", g.name) in present],
        )
        for name, contract in contracts.items()
    ]
    sources += [  # undeclared sources landed with LAKEHOUSE_AUTO_CREATE_SOURCES
        PipelineSource(t.name, False, f"bronze/{t.name}", ref("silver", t.name), None, [])
        for t in tables
        if t.layer == "bronze" and t.name not in contracts
    ]
    return sources


def added_rows(metrics: dict[str, Any]) -> int:
    """Rows a commit added, from its operation metrics (0 when it reports none)."""
    for key in ADDED_ROWS_METRICS:
        value = metrics.get(key)
        if isinstance(value, int | float | str) and str(value).isdigit():
            return int(value)
    return 0


def ingestion_rate(
    store: TableStore, tables: list[TableDetails], now: datetime, minutes: int = 60
) -> list[RateBucket]:
    """Rows appended to bronze per minute over the last ``minutes`` (oldest first, all minutes).

    Read from the bronze tables' commit history: each ``WRITE`` commit's added rows
    count in the minute of its timestamp. Maintenance commits add no data.
    """
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    rows = [0] * minutes
    commits = [0] * minutes
    for details in tables:
        if details.layer != "bronze":
            continue
        table = store.open("bronze", details.name)
        if table is None:
            continue
        for commit in _commits_since(table, start):
            if commit.operation != "WRITE" or commit.timestamp is None:
                continue
            index = int((commit.timestamp - start).total_seconds() // 60)
            if 0 <= index < minutes:
                rows[index] += added_rows(commit.metrics)
                commits[index] += 1
    return [RateBucket(start + timedelta(minutes=i), rows[i], commits[i]) for i in range(minutes)]


def _commits_since(table: DeltaTable, start: datetime) -> list[Any]:
    """History entries newer than ``start``, reading the log backwards in growing steps."""
    limit = 64
    while True:
        entries = [history_entry(c) for c in table.history(limit)]
        oldest = entries[-1].timestamp if entries else None
        exhausted = len(entries) < limit or limit >= MAX_COMMITS_PER_TABLE
        if exhausted or oldest is None or oldest < start:
            return [e for e in entries if e.timestamp is not None and e.timestamp >= start]
        limit = min(limit * 4, MAX_COMMITS_PER_TABLE)


def quality_failures(
    data_dir: TableStore | Path, last: int = 200, keep: int = 20
) -> list[dict[str, Any]]:
    """Recent quality batches that warned, dropped or quarantined rows (newest first)."""
    frame = read_quality(data_dir, None, last)
    failures = []
    for row in frame.iter_rows(named=True):
        failed = [e for e in row["expectations"] or [] if e["failed"]]
        if not failed and not (row["rows_dropped"] or row["rows_quarantined"]):
            continue
        failures.append(
            {
                "source": row["source"],
                "bronze_version": row["bronze_version"],
                "evaluated_at": row["evaluated_at"],
                "rows_in": row["rows_in"],
                "rows_warned": row["rows_warned"],
                "rows_dropped": row["rows_dropped"],
                "rows_quarantined": row["rows_quarantined"],
                "failed": [
                    {"name": e["name"], "action": e["action"], "rows": e["failed"]} for e in failed
                ],
            }
        )
        if len(failures) == keep:
            break
    return failures


def dead_letters(store: TableStore, keep: int = 20) -> list[dict[str, Any]]:
    """The newest dead letters, without their payloads (values as text)."""
    table = store.open("quarantine", DEAD_LETTERS)
    if table is None:
        return []
    columns = [f.name for f in table.schema().fields]
    wanted = [c for c in DEAD_LETTER_FIELDS if c in columns]
    if not wanted:
        return []
    order = "_ingested_at" if "_ingested_at" in wanted else wanted[-1]
    newest = (
        read_snapshot(table)
        .select(wanted)
        .sort(order, descending=True, nulls_last=True)
        .head(keep)
        .collect()
    )
    return newest.with_columns(pl.all().cast(pl.String)).to_dicts()


def lakehouse_status(
    store: TableStore,
    contracts: ContractRegistry,
    *,
    now: datetime | None = None,
    minutes: int = 60,
) -> LakehouseStatus:
    """Everything the status page shows, at ``now``."""
    now = now or datetime.now(UTC)
    tables = describe_tables(store, now=now)
    warnings = []
    try:
        failures = quality_failures(store)  # _meta lives with the tables (maybe remote)
    except Exception as exc:  # the page still shows the rest
        failures = []
        warnings.append(f"quality metrics unreadable: {str(exc).splitlines()[0]}")
    try:
        letters = dead_letters(store)
    except Exception as exc:
        letters = []
        warnings.append(f"dead letters unreadable: {str(exc).splitlines()[0]}")
    return LakehouseStatus(
        generated_at=now,
        tables=tables,
        pipeline=pipeline(contracts, tables),
        ingestion=ingestion_rate(store, tables, now, minutes),
        ingestion_window_minutes=minutes,
        quality_failures=failures,
        dead_letters=letters,
        dead_letter_count=next(
            (t.row_count for t in tables if (t.layer, t.name) == ("quarantine", DEAD_LETTERS)), 0
        ),
        warnings=warnings,
    )
