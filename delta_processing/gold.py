"""Gold: business tables derived from silver, maintained incrementally.

Invariant protected here: after every gold commit, the gold table equals a
full recomputation from the silver version it records (application
transaction ``lakehouse/gold<-silver``).

Window tables recompute only the windows touched by silver's change data feed
since the recorded version (late rows included), reading silver *at the
version being recorded*, and upsert them (deleting windows that became empty).
Latest-value tables upsert the newest changed row per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import structlog
from deltalake import CommitProperties, DeltaTable

from config.contracts import GoldSpec, LatestGold, SourceContract, WindowGold, parse_duration
from delta_processing.coercions import SILVER_TIME, contract_dtypes
from delta_processing.crashpoints import CrashPoints
from delta_processing.tables import (
    TableStore,
    append,
    commit_marker,
    consumed_version,
    ensure_table,
    merge,
    read_changes,
    read_snapshot,
)

GOLD_APP_ID = "lakehouse/gold<-silver"
PRESENT = "_present"
CHANGED_ROWS = ("insert", "update_postimage", "update_preimage", "delete")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GoldResult:
    """What one gold refresh consumed and wrote."""

    table: str
    silver_version: int
    groups_touched: int


def window_schema(spec: WindowGold, contract: SourceContract) -> pl.Schema:
    """Columns of a window table: group keys, ``window_start``, then the aggregates."""
    dtypes = contract_dtypes(contract)
    value_type = dtypes[spec.value]
    groups = {g: dtypes[g] for g in spec.group_by}
    return pl.Schema(
        {
            **groups,
            "window_start": SILVER_TIME,
            "count": pl.Int64(),
            "min": value_type,
            "max": value_type,
            "avg": pl.Float64(),
            "sum": value_type,
        }
    )


def latest_schema(spec: LatestGold, contract: SourceContract) -> pl.Schema:
    """Columns of a latest-value table: group keys, event time, value."""
    dtypes = contract_dtypes(contract)
    return pl.Schema(
        {
            **{g: dtypes[g] for g in spec.group_by},
            contract.event_time: SILVER_TIME,
            spec.value: dtypes[spec.value],
        }
    )


def window_aggregates(
    rows: pl.DataFrame, spec: WindowGold, event_time: str, schema: pl.Schema
) -> pl.DataFrame:
    """Full aggregation of silver rows into windows (pure; the reference for gold)."""
    value = pl.col(spec.value)
    return (
        rows.group_by(
            [*spec.group_by, pl.col(event_time).dt.truncate(spec.every).alias("window_start")]
        )
        .agg(
            pl.len().alias("count"),
            value.min().alias("min"),
            value.max().alias("max"),
            value.mean().alias("avg"),
            value.sum().alias("sum"),
        )
        .select([pl.col(n).cast(t) for n, t in schema.items()])
        .sort([*spec.group_by, "window_start"])
    )


def latest_values(
    rows: pl.DataFrame, spec: LatestGold, event_time: str, schema: pl.Schema
) -> pl.DataFrame:
    """The row with the greatest event time per group (pure; the reference for gold)."""
    return (
        rows.sort(event_time)
        .group_by(spec.group_by, maintain_order=True)
        .last()
        .select([pl.col(n).cast(t) for n, t in schema.items()])
        .sort(spec.group_by)
    )


def gold_frame(rows: pl.DataFrame, spec: GoldSpec, contract: SourceContract) -> pl.DataFrame:
    """Compute one gold table from scratch out of silver rows."""
    if isinstance(spec, WindowGold):
        return window_aggregates(rows, spec, contract.event_time, window_schema(spec, contract))
    return latest_values(rows, spec, contract.event_time, latest_schema(spec, contract))


class GoldRefresher:
    """Brings the gold tables of a source up to the current silver version."""

    def __init__(self, store: TableStore, crash_points: CrashPoints) -> None:
        self._store = store
        self._crash = crash_points

    def refresh(self, contract: SourceContract) -> list[GoldResult]:
        """Refresh every gold table declared by ``contract``; skip those already current."""
        silver = self._store.open("silver", contract.name)
        if silver is None:
            return []
        results = []
        for spec in contract.gold:
            result = self._refresh_one(contract, spec, silver)
            if result is not None:
                results.append(result)
        return results

    def _refresh_one(
        self, contract: SourceContract, spec: GoldSpec, silver: DeltaTable
    ) -> GoldResult | None:
        silver_version = silver.version()
        if isinstance(spec, WindowGold):
            schema = window_schema(spec, contract)
            keys = [*spec.group_by, "window_start"]
        else:
            schema = latest_schema(spec, contract)
            keys = list(spec.group_by)
        gold = ensure_table(self._store, "gold", spec.name, schema, cdf=False)
        done = consumed_version(gold, GOLD_APP_ID)
        if done is not None and done >= silver_version:
            return None
        if done is None:
            changes = (
                read_snapshot(silver).collect().with_columns(pl.lit("insert").alias("_change_type"))
            )
        else:
            changes = read_changes(silver, done + 1, silver_version).filter(
                pl.col("_change_type").is_in(CHANGED_ROWS)
            )
        marker = commit_marker(GOLD_APP_ID, silver_version)
        if isinstance(spec, WindowGold):
            upserts = self._window_upserts(contract, spec, silver, changes, schema)
        else:
            upserts = self._latest_upserts(contract, spec, silver, changes, schema)
        if upserts.is_empty():
            append(gold, upserts.drop(PRESENT), marker)
        else:
            _apply_upserts(gold, upserts, keys, marker)
        self._crash.reached("after_gold_commit")
        result = GoldResult(spec.name, silver_version, upserts.height)
        log.info("gold.refreshed", **result.__dict__)
        return result

    def _window_upserts(
        self,
        contract: SourceContract,
        spec: WindowGold,
        silver: DeltaTable,
        changes: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """Touched windows, recomputed from silver; ``_present`` false where now empty."""
        event_time = contract.event_time
        touched = changes.select(
            *spec.group_by, pl.col(event_time).dt.truncate(spec.every).alias("window_start")
        ).unique()
        if touched.is_empty():
            return pl.DataFrame(schema=schema).with_columns(pl.lit(True).alias(PRESENT))
        low = touched["window_start"].min()
        high = touched["window_start"].max() + parse_duration(spec.every)  # type: ignore[operator]
        rows = (
            read_snapshot(silver)
            .filter((pl.col(event_time) >= low) & (pl.col(event_time) < high))
            .select([*spec.group_by, event_time, spec.value])
            .join(touched.lazy(), how="semi", on=spec.group_by)
            .collect()
        )
        fresh = window_aggregates(rows, spec, event_time, schema)
        return _mark_presence(touched, fresh, [*spec.group_by, "window_start"], schema)

    def _latest_upserts(
        self,
        contract: SourceContract,
        spec: LatestGold,
        silver: DeltaTable,
        changes: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """Groups whose latest row may have changed, recomputed from silver."""
        touched = changes.select(spec.group_by).unique()
        if touched.is_empty():
            return pl.DataFrame(schema=schema).with_columns(pl.lit(True).alias(PRESENT))
        rows = (
            read_snapshot(silver)
            .select([*spec.group_by, contract.event_time, spec.value])
            .join(touched.lazy(), how="semi", on=spec.group_by)
            .collect()
        )
        fresh = latest_values(rows, spec, contract.event_time, schema)
        return _mark_presence(touched, fresh, list(spec.group_by), schema)


def _mark_presence(
    touched: pl.DataFrame, fresh: pl.DataFrame, keys: list[str], schema: pl.Schema
) -> pl.DataFrame:
    """Every touched key with its recomputed row, ``_present`` false if it has none now."""
    marked = fresh.with_columns(pl.lit(True).alias(PRESENT))
    joined = touched.join(marked, on=keys, how="left", nulls_equal=True)
    return joined.select(
        [pl.col(n).cast(t) for n, t in schema.items()] + [pl.col(PRESENT).fill_null(False)]
    )


def _apply_upserts(
    gold: DeltaTable, upserts: pl.DataFrame, keys: list[str], marker: CommitProperties
) -> None:
    updates = {name: f's."{name}"' for name in upserts.columns if name != PRESENT}
    merge(
        gold,
        upserts,
        keys,
        lambda m: (
            m.when_matched_update(updates=updates, predicate=f's."{PRESENT}"')
            .when_matched_delete(predicate=f'NOT s."{PRESENT}"')
            .when_not_matched_insert(updates=updates, predicate=f's."{PRESENT}"')
        ),
        marker,
    )
