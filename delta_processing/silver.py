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
from delta_processing.coercions import apply_contract, contract_dtypes
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
    "_arrival": pl.Int64(),
}
# Arrival order of bronze rows: among equal sequence values, the later arrival wins.
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
    return pl.Schema({**contract_dtypes(contract), **SILVER_LINEAGE})


def with_arrival(rows: pl.DataFrame) -> pl.DataFrame:
    """Add ``_arrival``: a total, monotonic order of bronze rows (commit, file, row)."""
    ordered = rows.sort(ARRIVAL_ORDER)
    rank = pl.int_range(pl.len(), dtype=pl.Int64).over("_commit_version")
    return ordered.with_columns(
        ((pl.col("_commit_version").cast(pl.Int64) * 2**32) + rank).alias("_arrival")
    )


def winner_order(contract: SourceContract) -> list[str]:
    """Columns that rank versions of one key: the sequence (if any), then arrival."""
    return [contract.sequence, "_arrival"] if contract.sequence else ["_arrival"]


def latest_per_key(typed: pl.DataFrame, contract: SourceContract) -> pl.DataFrame:
    """Keep the winning row of every key (greatest sequence; ties: latest arrival)."""
    return typed.sort(winner_order(contract)).unique(
        subset=contract.keys, keep="last", maintain_order=True
    )


def replaces_predicate(contract: SourceContract) -> str:
    """MERGE condition under which the source row ``s`` replaces the stored ``t``."""
    later = 's."_arrival" > t."_arrival"'
    if contract.sequence is None:
        return later
    seq = contract.sequence
    return f'(s."{seq}" > t."{seq}") OR (s."{seq}" = t."{seq}" AND {later})'


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
        typed, rejected = apply_contract(with_arrival(changes), contract)
        quarantined = upserted = 0
        if quarantine_done <= bronze_version:
            fresh = rejected.filter(pl.col("_commit_version") >= quarantine_done)
            quarantined = fresh.height
            self._write_quarantine(source, fresh, bronze_version)
        if silver_done <= bronze_version:
            fresh = typed.filter(pl.col("_commit_version") >= silver_done)
            rows = latest_per_key(fresh, contract).select(
                [pl.col(n).cast(t) for n, t in schema.items()]
            )
            upserted = rows.height
            self._merge_silver(silver, rows, contract, bronze_version)
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
        self,
        silver: DeltaTable,
        rows: pl.DataFrame,
        contract: SourceContract,
        bronze_version: int,
    ) -> None:
        marker = commit_marker(SILVER_APP_ID, bronze_version)
        if rows.is_empty():
            append(silver, rows, marker)
        else:
            (
                silver.merge(
                    to_arrow(rows),
                    predicate=key_predicate(contract.keys),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=marker,
                )
                .when_matched_update_all(predicate=replaces_predicate(contract))
                .when_not_matched_insert_all()
                .execute()
            )
            sync_latest_commit(silver)
        self._crash.reached("after_silver_commit")


def _next_version(consumed: int | None) -> int:
    """First bronze version not yet consumed (bronze versions start at 0)."""
    return 0 if consumed is None else consumed + 1
