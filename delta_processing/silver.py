"""Silver: bronze rows typed against the source contract, de-duplicated by key.

Invariants protected here:

* every bronze row reaches exactly one of ``silver/<source>`` (typed, merged
  by key so a re-sent record never makes a second row) or
  ``quarantine/<source>`` (raw, with ``_reason``);
* each of those two tables records, in its own commit, the last bronze version
  it consumed, so after a crash each resumes exactly where it stopped even if
  one committed and the other did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
import structlog
from deltalake import DeltaTable

from config.contracts import SourceContract
from delta_processing.coercions import SILVER_DTYPES, apply_contract
from delta_processing.column_names import CHANGE_FEED_COLUMNS
from delta_processing.crashpoints import CrashPoints
from delta_processing.tables import (
    TableStore,
    append,
    commit_marker,
    consumed_version,
    ensure_table,
    key_predicate,
    read_changes,
    sync_latest_commit,
    to_arrow,
)

SILVER_APP_ID = "lakehouse/silver<-bronze"
QUARANTINE_APP_ID = "lakehouse/quarantine<-bronze"
SILVER_LINEAGE: dict[str, pl.DataType] = {
    "_source": pl.String(),
    "_batch_id": pl.String(),
    "_ingested_at": pl.Datetime("us", "UTC"),
}
# Arrival order of bronze rows: later wins when the same key arrives twice.
ARRIVAL_ORDER = ["_commit_version", "_landing_file", "_row"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SilverResult:
    """What one silver promotion consumed and produced."""

    source: str
    bronze_version: int
    rows_in: int
    upserted: int
    quarantined: int


def silver_schema(contract: SourceContract) -> pl.Schema:
    """Columns of ``silver/<source>``: the contract's typed fields, then lineage."""
    fields = {name: SILVER_DTYPES[ftype] for name, ftype in contract.field_types.items()}
    return pl.Schema({**fields, **SILVER_LINEAGE})


def latest_per_key(typed: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Keep the last-arrived row of every key (deterministic: arrival order is total)."""
    return typed.sort(ARRIVAL_ORDER).unique(subset=keys, keep="last", maintain_order=True)


class SilverPromoter:
    """Promotes new bronze versions of a source into silver and quarantine."""

    def __init__(self, store: TableStore, crash_points: CrashPoints) -> None:
        self._store = store
        self._crash = crash_points

    def promote(self, contract: SourceContract) -> SilverResult | None:
        """Consume all bronze versions not yet in silver/quarantine; ``None`` if up to date."""
        source = contract.name
        bronze = self._store.open("bronze", source)
        if bronze is None:
            return None
        bronze_version = bronze.version()
        schema = silver_schema(contract)
        silver = ensure_table(self._store, "silver", source, schema, cdf=True)
        quarantine = self._store.open("quarantine", source)
        silver_done = _next_version(consumed_version(silver, SILVER_APP_ID))
        quarantine_done = _next_version(consumed_version(quarantine, QUARANTINE_APP_ID))
        start = min(silver_done, quarantine_done)
        if start > bronze_version:
            return None

        changes = read_changes(bronze, start, bronze_version).filter(
            pl.col("_change_type") == "insert"
        )
        typed, rejected = apply_contract(changes, contract)
        quarantined = upserted = 0
        if quarantine_done <= bronze_version:
            fresh = rejected.filter(pl.col("_commit_version") >= quarantine_done)
            quarantined = fresh.height
            self._write_quarantine(source, fresh, bronze_version)
        if silver_done <= bronze_version:
            fresh = typed.filter(pl.col("_commit_version") >= silver_done)
            rows = latest_per_key(fresh, contract.keys).select(
                [pl.col(n).cast(t) for n, t in schema.items()]
            )
            upserted = rows.height
            self._merge_silver(silver, rows, contract.keys, bronze_version)
        result = SilverResult(source, bronze_version, changes.height, upserted, quarantined)
        log.info("silver.promoted", **result.__dict__)
        return result

    def _write_quarantine(self, source: str, rejected: pl.DataFrame, bronze_version: int) -> None:
        rows = rejected.with_columns(
            pl.col("_commit_version").cast(pl.Int64).alias("_bronze_version"),
            pl.lit(datetime.now(UTC)).dt.cast_time_unit("us").alias("_quarantined_at"),
        ).drop(CHANGE_FEED_COLUMNS)
        append(
            self._store.uri("quarantine", source),
            rows,
            commit_marker(QUARANTINE_APP_ID, bronze_version),
            evolve_schema=True,
        )
        self._crash.reached("after_quarantine_commit")

    def _merge_silver(
        self, silver: DeltaTable, rows: pl.DataFrame, keys: list[str], bronze_version: int
    ) -> None:
        marker = commit_marker(SILVER_APP_ID, bronze_version)
        if rows.is_empty():
            append(silver, rows, marker)
        else:
            (
                silver.merge(
                    to_arrow(rows),
                    predicate=key_predicate(keys),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=marker,
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
            sync_latest_commit(silver)
        self._crash.reached("after_silver_commit")


def _next_version(consumed: int | None) -> int:
    """First bronze version not yet consumed (bronze versions start at 0)."""
    return 0 if consumed is None else consumed + 1
