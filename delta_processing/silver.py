"""Silver: bronze rows typed against the source contract, de-duplicated by key.

Invariants protected here:

* every bronze row reaches exactly one of ``silver/<source>`` (typed, merged
  by key so a re-sent record never makes a second row) or
  ``quarantine/<source>`` (raw, with ``_reason``);
* each of those two tables records, in its own commit, the last bronze version
  it consumed, so after a crash each resumes exactly where it stopped even if
  one committed and the other did not. A batch with nothing to quarantine makes
  no empty quarantine commit: the quality commit, which comes first, records the
  quarantine's position instead (see :func:`consumed_by_sinks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl
import structlog
from deltalake import DeltaTable

from config.contracts import SourceContract
from delta_processing.bronze import AppendedRows
from delta_processing.coercions import apply_contract, contract_dtypes
from delta_processing.column_names import CHANGE_FEED_COLUMNS, EVENT_DATE
from delta_processing.crashpoints import CrashPoints
from delta_processing.evolution import RESCUED_COLUMN, EvolutionOutcome, apply_evolution
from delta_processing.expectations import ExpectationOutcome, evaluate
from delta_processing.quality import (
    QUALITY_LAYER,
    QUALITY_TABLE,
    BatchQuality,
    quality_app_id,
    quality_row,
)
from delta_processing.schema_changes import reconcile_columns
from delta_processing.tables import (
    TableStore,
    append,
    as_inserts,
    commit_marker,
    commits_after,
    consumed_version,
    correlation_ids_in,
    correlation_metadata,
    ensure_table,
    in_list,
    merge,
    read_changes,
    read_snapshot,
    table_columns,
)

SILVER_APP_ID = "lakehouse/silver<-bronze"
QUARANTINE_APP_ID = "lakehouse/quarantine<-bronze"


def quarantine_skip_app_id(source: str) -> str:
    """Application-transaction id, in the quality table, of the bronze version up to
    which ``source``'s quarantine is complete without a commit of its own."""
    return f"{QUARANTINE_APP_ID}/{source}"


def consumed_by_sinks(
    silver: DeltaTable | None,
    quarantine: DeltaTable | None,
    quality: DeltaTable | None,
    source: str,
) -> dict[str, int | None]:
    """The last bronze version each sink of ``source`` consumed (``None``: none yet).

    The quarantine's is the later of its own marker and the one quality commits carry
    for batches that had nothing to quarantine (those commit no empty quarantine: one
    commit fewer per batch, and one log entry fewer for every later commit to list).
    """
    own = consumed_version(quarantine, QUARANTINE_APP_ID)
    skipped = consumed_version(quality, quarantine_skip_app_id(source))
    return {
        "quality": consumed_version(quality, quality_app_id(source)),
        "quarantine": max((v for v in (own, skipped) if v is not None), default=None),
        "silver": consumed_version(silver, SILVER_APP_ID),
    }


SILVER_LINEAGE: dict[str, pl.DataType] = {
    "_source": pl.String(),
    "_batch_id": pl.String(),
    "_ingested_at": pl.Datetime("us", "UTC"),
    "_arrival": pl.Int64(),
}
# Arrival order of bronze rows: among equal sequence values, the later arrival wins.
# Within a bronze commit: the files' arrival order, then the row's position in its file.
ARRIVAL_ORDER = ["_commit_version", "_file_order", "_landing_file", "_row"]
_ORDERED_ARRIVAL = ["_commit_version", "_file_order", "_row"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SilverResult:
    """What one silver promotion consumed and produced."""

    source: str
    bronze_version: int
    rows_in: int
    upserted: int
    quarantined: int


@dataclass(frozen=True)
class SilverInserts:
    """The rows one silver commit appended (a batch of new keys only), still in memory.

    Gold takes them instead of reading that commit back through the change feed (see
    ``GoldRefresher.refresh``), as silver takes bronze's rows (:class:`AppendedRows`).
    """

    version: int  # the silver commit that appended ``rows``
    rows: pl.DataFrame
    table_id: str  # the silver table's id: a table re-created later reuses versions


@dataclass(frozen=True)
class Promotion:
    """A silver promotion: its figures, and its rows when it only appended new keys."""

    result: SilverResult
    inserted: SilverInserts | None


def silver_schema(contract: SourceContract) -> pl.Schema:
    """Columns of ``silver/<source>``: the contract's typed fields, then lineage."""
    rescued = {RESCUED_COLUMN: pl.String()} if contract.evolution == "rescue" else {}
    dated = {EVENT_DATE: pl.Date()} if contract.partitioning.silver == "event_date" else {}
    return pl.Schema({**contract_dtypes(contract), **rescued, **SILVER_LINEAGE, **dated})


def silver_partitions(contract: SourceContract) -> list[str]:
    """Partition columns of ``silver/<source>``."""
    return [EVENT_DATE] if contract.partitioning.silver == "event_date" else []


def with_arrival(rows: pl.DataFrame) -> pl.DataFrame:
    """Add ``_arrival``: a total, monotonic order of bronze rows (commit, file, row)."""
    if "_file_order" not in rows.columns:  # bronze written before files were ordered
        rows = rows.with_columns(pl.lit(None, dtype=pl.Int64).alias("_file_order"))
    # Files have distinct orders within a commit; the file name only ranks rows of bronze
    # written before files were ordered, and sorting by it (a string) is the slow part.
    order = ARRIVAL_ORDER if rows["_file_order"].null_count() else _ORDERED_ARRIVAL
    # Rows bronze hands over from memory are in arrival order already (one commit, its
    # files in order, each file's rows in order): checking is ~8x cheaper than sorting.
    ordered = rows if _in_order(rows, order) else rows.sort(order, nulls_last=False)
    rank = pl.int_range(pl.len(), dtype=pl.Int64).over("_commit_version")
    return ordered.with_columns(
        ((pl.col("_commit_version").cast(pl.Int64) * 2**32) + rank).alias("_arrival")
    )


def _in_order(rows: pl.DataFrame, order: list[str]) -> bool:
    """Whether ``rows`` are sorted by the integer columns ``order`` (no nulls in them)."""
    if rows.height < 2:
        return True
    if order != _ORDERED_ARRIVAL:  # ranked by file name too: just sort
        return False
    if rows.select(pl.any_horizontal(pl.col(order).is_null().any())).item():
        return False
    later: pl.Expr = pl.col(order[-1]).diff() > 0
    for name in reversed(order[:-1]):  # lexicographic: an earlier column decides first
        step = pl.col(name).diff()
        later = (step > 0) | ((step == 0) & later)
    return bool(rows.select(later.slice(1).all()).item())


def winner_order(contract: SourceContract) -> list[str]:
    """Columns that rank versions of one key: the sequence (if any), then arrival."""
    return [contract.sequence, "_arrival"] if contract.sequence else ["_arrival"]


def latest_per_key(typed: pl.DataFrame, contract: SourceContract) -> pl.DataFrame:
    """Keep the winning row of every key (greatest sequence; ties: latest arrival)."""
    if not typed.select(pl.struct(contract.keys).is_duplicated().any()).item():
        return typed  # every row is its key's only version: skip sorting the wide frame
    return typed.sort(winner_order(contract)).unique(
        subset=contract.keys, keep="last", maintain_order=True
    )


def replaces_predicate(contract: SourceContract, *, inclusive: bool = False) -> str:
    """MERGE condition under which the source row ``s`` replaces the stored ``t``.

    ``inclusive`` lets a row replace its own earlier copy (same arrival): backfills.
    """
    later = f's."_arrival" {">=" if inclusive else ">"} t."_arrival"'
    if contract.sequence is None:
        return later
    seq = contract.sequence
    return f'(s."{seq}" > t."{seq}") OR (s."{seq}" = t."{seq}" AND {later})'


def merge_prune(contract: SourceContract, rows: pl.DataFrame) -> str | None:
    """Restrict a silver MERGE to the stored rows that can share a key with ``rows``,
    when that is safe: those within their event-time range (file statistics skip the
    other files; silver's appends keep them in arrival order, for most sources close to
    event-time order) and, partitioned, on their event dates.

    Safe only if the event time is part of the key: a key's row then never moves to
    another instant, so its stored copy is within the range and on one of the dates.
    """
    event_time = contract.event_time
    if event_time not in contract.keys or rows.is_empty():
        return None
    low, high = rows[event_time].min(), rows[event_time].max()
    clauses = []
    if isinstance(low, datetime) and isinstance(high, datetime):
        clauses.append(f"t.\"{event_time}\" BETWEEN '{low.isoformat()}' AND '{high.isoformat()}'")
    if silver_partitions(contract):
        clauses.append(in_list(f't."{EVENT_DATE}"', rows[EVENT_DATE].unique().to_list()))
    return " AND ".join(clauses) or None


def stores_any_key(silver: DeltaTable, rows: pl.DataFrame, contract: SourceContract) -> bool:
    """Whether ``silver`` already holds a row under any key of ``rows``.

    When none does, the batch is pure inserts and a plain append commits exactly what
    the MERGE would, without the MERGE's scan and rewrite of the target. The probe reads
    only key columns, narrowed (when the event time is a key) to the batch's event-time
    range and dates, which file statistics and partitions prune: new data arriving in
    time order reads next to nothing.
    """
    keys = contract.keys
    stored = read_snapshot(silver)
    schema = stored.collect_schema()
    if contract.event_time in keys:
        event_time = pl.col(contract.event_time)
        low, high = rows[contract.event_time].min(), rows[contract.event_time].max()
        stored = stored.filter(event_time.is_between(low, high))
        if silver_partitions(contract):
            stored = stored.filter(pl.col(EVENT_DATE).is_in(rows[EVENT_DATE].unique().implode()))
    # The stored side first: usually empty (data arriving in time order), and then the
    # batch's keys are never hashed (~30 ms for 250k rows).
    candidates = stored.select(keys).collect()
    if candidates.is_empty():
        return False
    probe = rows.select(pl.col(k).cast(schema[k]) for k in keys)
    return not candidates.join(probe, on=keys, how="semi").head(1).is_empty()


@dataclass(frozen=True)
class SilverBatch:
    """One batch of bronze rows judged against a contract, ready for the three sinks."""

    changes: pl.DataFrame  # the bronze rows (change feed inserts)
    rejected: pl.DataFrame  # broke the contract's types or presence rules (raw form)
    evolution: EvolutionOutcome
    expectations: ExpectationOutcome
    quarantined: pl.DataFrame  # everything bound for quarantine, raw, with _reason
    passed: pl.DataFrame  # winners per key, bound for silver

    @staticmethod
    def since(frame: pl.DataFrame, version: int) -> pl.DataFrame:
        """Rows of bronze versions ``version`` and later."""
        return frame.filter(pl.col("_commit_version") >= version)

    def silver_rows(self, schema: pl.Schema, since: int) -> pl.DataFrame:
        """The passed rows from ``since`` on, shaped as silver (plus added columns)."""
        added = [c for c in self.evolution.added_columns if c not in schema]
        return self.since(self.passed, since).select(
            [pl.col(n).cast(t) for n, t in schema.items()] + [pl.col(c) for c in added]
        )

    def quality(self, contract: SourceContract, since: int) -> BatchQuality:
        """The quality counts of the rows from bronze version ``since`` on."""
        failed, warned, dropped = self.expectations.counts(since)
        return BatchQuality(
            rows_in=self.since(self.changes, since).height,
            rows_passed=self.since(self.expectations.kept, since).height,
            rows_warned=warned,
            rows_dropped=dropped,
            rows_quarantined=self.since(self.quarantined, since).height,
            contract_failures=self.since(self.rejected, since).height,
            expectation_failures=failed,
            evolution_mode=contract.evolution,
            evolution_rows=self.evolution.affected_since(since),
        )


def build_batch(changes: pl.DataFrame, contract: SourceContract) -> SilverBatch:
    """Type, evolve, check and de-duplicate bronze rows (pure).

    Raises :class:`~delta_processing.expectations.ExpectationFailed` on a broken
    ``fail`` expectation, before anything is written.
    """
    typed, rejected = apply_contract(with_arrival(changes), contract)
    evolved = apply_evolution(typed, contract)
    # Expectations judge each key's winning version: a retried record is not a
    # uniqueness violation, and superseded versions never reach silver anyway.
    outcome = evaluate(latest_per_key(evolved.rows, contract), contract)
    quarantined = pl.concat(
        [rejected, _unpack_raw(evolved.rejected), _unpack_raw(outcome.quarantined)],
        how="diagonal_relaxed",
    )
    passed = outcome.kept
    if silver_partitions(contract):
        passed = passed.with_columns(pl.col(contract.event_time).dt.date().alias(EVENT_DATE))
    return SilverBatch(changes, rejected, evolved, outcome, quarantined, passed)


def _bronze_inserts(
    bronze: DeltaTable,
    start: int,
    end: int,
    appended: AppendedRows | None,
    commits: list[dict[str, Any]],
) -> pl.DataFrame:
    """The rows bronze versions ``start..end`` inserted: ``appended`` when it is exactly
    that one version (``promote`` loads ``bronze`` at it: its schema is the one to shape
    the rows to), else read back through the change feed."""
    if (
        appended is not None
        and start == end == appended.version
        # A column the table lacks is never expected; the change feed is the truth then.
        and set(appended.rows.columns) <= set(table_columns(bronze))
    ):
        committed = [int(c["timestamp"]) for c in commits if int(c["version"]) == end]
        if committed:
            return as_inserts(appended.rows, bronze, end, committed[0])
    return read_changes(bronze, start, end).filter(pl.col("_change_type") == "insert")


class SilverPromoter:
    """Promotes new bronze versions of a source into silver and quarantine."""

    def __init__(self, store: TableStore, crash_points: CrashPoints) -> None:
        self._store = store
        self._crash = crash_points

    def promote(
        self, contract: SourceContract, appended: AppendedRows | None = None
    ) -> Promotion | None:
        """Consume the bronze versions not yet in silver, quarantine and quality.

        ``appended``: the rows of a bronze commit the caller still holds (see
        :class:`~delta_processing.bronze.AppendedRows`). Bronze is then read as of that
        commit (bronze may be further already, see :mod:`delta_processing.lookahead`),
        and the rows are used when that commit is exactly what is to be consumed;
        otherwise the change feed is read.

        Returns ``None`` when everything is up to date. Raises
        :class:`~delta_processing.expectations.ExpectationFailed` (nothing committed)
        when a ``fail`` expectation is broken.
        """
        source = contract.name
        # Bronze as of the handed commit: bronze may be ingesting further meanwhile (see
        # delta_processing.lookahead), and this promotion is to consume that commit.
        pinned = appended.version if appended is not None else None
        bronze = self._store.open("bronze", source, version=pinned)
        if bronze is None:
            return None
        schema = silver_schema(contract)
        silver = ensure_table(
            self._store,
            "silver",
            source,
            schema,
            cdf=True,
            partition_by=silver_partitions(contract),
        )
        silver = reconcile_columns(silver, schema, f"silver/{source}")
        # Kept to append through: the store reuses them, so the appends below leave the
        # next promotion's `open` nothing to read.
        quality_table = self._store.open(QUALITY_LAYER, QUALITY_TABLE)
        quarantine = self._store.open("quarantine", source)
        consumed = consumed_by_sinks(silver, quarantine, quality_table, source)
        start, end = batch_bounds(consumed, bronze.version())
        if start > end:
            return None
        consumed_commits = [c for c in commits_after(bronze, start - 1) if int(c["version"]) <= end]
        changes = _bronze_inserts(bronze, start, end, appended, consumed_commits)
        batch = build_batch(changes, contract)  # raises before any commit on `fail`
        fresh: pl.DataFrame | None = None  # rejects the quarantine does not hold yet
        if _next_version(consumed["quarantine"]) <= end:
            fresh = batch.since(batch.quarantined, _next_version(consumed["quarantine"]))
        if _next_version(consumed["quality"]) <= end:
            quality = batch.quality(contract, _next_version(consumed["quality"]))
            # Nothing to quarantine (and the table exists for readers): the quality
            # commit records the quarantine's position instead of an empty commit.
            recorded = fresh is not None and fresh.is_empty() and quarantine is not None
            self._write_quality(quality_table, contract, end, quality, quarantine_done=recorded)
            if recorded:
                fresh = None
        if fresh is not None:
            self._write_quarantine(quarantine, source, fresh, end)
        upserted = 0
        inserted = None
        correlation_ids = correlation_ids_in(consumed_commits)
        if _next_version(consumed["silver"]) <= end:
            rows = batch.silver_rows(schema, _next_version(consumed["silver"]))
            upserted = rows.height
            inserted = self._merge_silver(silver, rows, contract, end, correlation_ids)
        to_quarantine = batch.quarantined
        result = SilverResult(source, end, changes.height, upserted, to_quarantine.height)
        log.info("silver.promoted", **result.__dict__, correlation_ids=correlation_ids)
        return Promotion(result, inserted)

    def _write_quality(
        self,
        table: DeltaTable | None,
        contract: SourceContract,
        end: int,
        quality: BatchQuality,
        *,
        quarantine_done: bool = False,
    ) -> None:
        """Append the batch's quality row through ``table`` (by URI only to create it);
        ``quarantine_done``: also record the quarantine complete up to ``end``."""
        skipped = {quarantine_skip_app_id(contract.name): end} if quarantine_done else None
        append(
            table if table is not None else self._store.uri(QUALITY_LAYER, QUALITY_TABLE),
            quality_row(contract, end, quality),
            commit_marker(quality_app_id(contract.name), end, skipped),
            storage_options=self._store.options,
        )
        self._crash.reached("after_quality_commit")

    def _write_quarantine(
        self,
        table: DeltaTable | None,
        source: str,
        rejected: pl.DataFrame,
        bronze_version: int,
    ) -> None:
        """Append the batch's rejects through ``table`` (by URI only to create it)."""
        append(
            table if table is not None else self._store.uri("quarantine", source),
            quarantine_rows(rejected),
            commit_marker(QUARANTINE_APP_ID, bronze_version),
            evolve_schema=True,
            storage_options=self._store.options,
        )
        self._crash.reached("after_quarantine_commit")

    def _merge_silver(
        self,
        silver: DeltaTable,
        rows: pl.DataFrame,
        contract: SourceContract,
        bronze_version: int,
        correlation_ids: list[str],
    ) -> SilverInserts | None:
        """Upsert ``rows`` into silver; the rows it appended if no key was stored yet."""
        marker = commit_marker(
            SILVER_APP_ID, bronze_version, **correlation_metadata(correlation_ids)
        )
        evolve = contract.evolution == "add"
        if evolve:  # columns added by earlier batches but absent from this one
            missing = [c for c in table_columns(silver) if c not in rows.columns]
            rows = rows.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in missing)
        inserted = None
        if rows.is_empty() or not stores_any_key(silver, rows, contract):
            append(silver, rows, marker, evolve_schema=evolve)
            # The object is at its commit.
            inserted = SilverInserts(silver.version(), rows, str(silver.metadata().id))
        else:
            merge(
                silver,
                rows,
                contract.keys,
                lambda m: m.when_matched_update_all(
                    predicate=replaces_predicate(contract)
                ).when_not_matched_insert_all(),
                marker,
                evolve_schema=evolve,
                prune=merge_prune(contract, rows),
            )
        self._crash.reached("after_silver_commit")
        return inserted


def batch_bounds(consumed: dict[str, int | None], bronze_version: int) -> tuple[int, int]:
    """The bronze versions ``(start, end)`` the next batch covers, for every sink.

    Sinks (quality, quarantine, silver) commit one after another, so a crash can
    leave some a batch behind. That batch is then redone exactly as it was, ending
    at the version the leading sink recorded, so batch-level rules (uniqueness
    within the batch) judge the same rows for every sink.
    """
    start = min(_next_version(v) for v in consumed.values())
    recorded = [v for v in consumed.values() if v is not None]
    behind = recorded and any(v is None or v < max(recorded) for v in consumed.values())
    end = max(recorded) if behind else bronze_version
    return start, end


def quarantine_rows(rejected: pl.DataFrame) -> pl.DataFrame:
    """Rows bound for quarantine in the table's shape: raw fields, lineage, reason, when."""
    return rejected.with_columns(
        pl.col("_commit_version").cast(pl.Int64).alias("_bronze_version"),
        pl.lit(datetime.now(UTC)).dt.cast_time_unit("us").alias("_quarantined_at"),
    ).drop([*CHANGE_FEED_COLUMNS, "_arrival"], strict=False)


def _unpack_raw(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows that failed an expectation, back in their raw form for the quarantine."""
    keep = [c for c in rows.columns if c.startswith("_") and c != "_raw"]
    if "_raw" not in rows.columns:
        return rows.select(keep)
    return rows.select([*keep, "_raw"]).unnest("_raw")


def _next_version(consumed: int | None) -> int:
    """First bronze version not yet consumed (bronze versions start at 0)."""
    return 0 if consumed is None else consumed + 1
