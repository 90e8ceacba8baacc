"""Full refresh of silver or gold tables, and backfill of a bronze time range.

Both rebuild from the upstream layer and write in single commits that record
(or keep) the upstream position, so the incremental pipeline carries on from
where the rebuild ends. They must not race the processor: callers hold the
processor lock (:class:`~delta_processing.processor.ProcessorLock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl
import structlog
from deltalake import CommitProperties, DeltaTable

from config.contracts import SourceContract
from delta_processing.column_names import EVENT_DATE
from delta_processing.gold import rebuild_gold
from delta_processing.quality import QUALITY_LAYER, QUALITY_TABLE, quality_app_id, quality_row
from delta_processing.retention import retention_horizon
from delta_processing.silver import (
    QUARANTINE_APP_ID,
    SILVER_APP_ID,
    build_batch,
    consumed_by_sinks,
    latest_per_key,
    merge_prune,
    quarantine_rows,
    replaces_predicate,
    silver_partitions,
    silver_schema,
)
from delta_processing.tables import (
    CDF_CONFIGURATION,
    REFRESH_MARK,
    Layer,
    TableStore,
    append,
    commit_marker,
    merge,
    read_changes,
    read_snapshot,
    reopen,
    table_columns,
    to_arrow,
    write_synced,
)

log = structlog.get_logger(__name__)


class RefreshRefused(RuntimeError):
    """The table cannot be rebuilt: protected, unknown, or not rebuildable."""


@dataclass(frozen=True)
class RefreshResult:
    """What a rebuild wrote."""

    table: str
    rows: int
    upstream_version: int


def all_bronze_rows(bronze: DeltaTable, version: int) -> pl.DataFrame:
    """Every bronze row up to ``version``, shaped like change-feed inserts.

    The change feed from version 0 is exact but needs the whole history, which log
    cleanup and vacuum remove; then the snapshot is read instead, with each row's
    commit stood in for by its (per-commit) ingestion time, in order.
    """
    try:
        return read_changes(bronze, 0, version).filter(pl.col("_change_type") == "insert")
    except Exception as exc:
        log.info("refresh.bronze_from_snapshot", reason=str(exc).splitlines()[0])
    try:
        snapshot = reopen(bronze, version)
    except Exception:  # that version's log is gone too: the newest is the closest
        snapshot = bronze
    rows = read_snapshot(snapshot).collect()
    return rows.with_columns(
        pl.col("_ingested_at").rank("dense").cast(pl.Int64).alias("_commit_version"),
        pl.lit("insert").alias("_change_type"),
        pl.col("_ingested_at").alias("_commit_timestamp"),
    )


def refresh(store: TableStore, contract: SourceContract, table: str) -> RefreshResult:
    """Rebuild ``silver`` or a gold table of ``contract`` from its upstream, in full."""
    if table in contract.protected:
        raise RefreshRefused(
            f"{table!r} of source {contract.name!r} is protected by its contract; "
            "remove it from `protected` to allow a rebuild"
        )
    if table == "silver":
        return _refresh_silver(store, contract)
    spec = next((g for g in contract.gold if g.name == table), None)
    if spec is None:
        raise RefreshRefused(f"source {contract.name!r} has no table {table!r}")
    silver = store.open("silver", contract.name)
    if silver is None:
        raise RefreshRefused(f"silver/{contract.name} does not exist yet")
    result = rebuild_gold(store, contract, spec, silver)
    return RefreshResult(f"gold/{spec.name}", result.groups_touched, result.silver_version)


def _refresh_silver(store: TableStore, contract: SourceContract) -> RefreshResult:
    source = contract.name
    bronze = store.open("bronze", source)
    if bronze is None:
        raise RefreshRefused(f"bronze/{source} does not exist yet")
    end = bronze.version()
    changes = all_bronze_rows(bronze, end)
    horizon = retention_horizon(bronze)
    if horizon is not None:  # rows before it may be gone: those of silver are kept
        changes = changes.filter(pl.col("_ingested_at") >= horizon)
    batch = build_batch(changes, contract)
    append(
        store.uri(QUALITY_LAYER, QUALITY_TABLE),
        quality_row(contract, end, batch.quality(contract, 0)),
        commit_marker(quality_app_id(source), end),
        storage_options=store.options,
    )
    rebuilt: list[tuple[Layer, str, pl.DataFrame]] = [
        ("quarantine", QUARANTINE_APP_ID, quarantine_rows(batch.quarantined)),
        ("silver", SILVER_APP_ID, batch.silver_rows(silver_schema(contract), 0)),
    ]
    if horizon is not None:
        rebuilt = [
            (layer, app_id, _with_rows_before(store, layer, contract, rows, horizon))
            for layer, app_id, rows in rebuilt
        ]
    for layer, app_id, rows in rebuilt:
        # By URI (the table may not exist yet): deltalake loads it just as `open` would.
        write_synced(
            store.uri(layer, source),
            to_arrow(rows),
            mode="overwrite",
            schema_mode="overwrite",
            # Silver's layout is the contract's (a list, even empty: None would keep the
            # old one); quarantine is never partitioned.
            partition_by=silver_partitions(contract) if layer == "silver" else None,
            configuration=CDF_CONFIGURATION if layer == "silver" else None,
            commit_properties=commit_marker(app_id, end, **{REFRESH_MARK: "full"}),
            storage_options=store.options,
        )
    rows_written = batch.passed.height
    log.info("refresh.silver", source=source, rows=rows_written, bronze_version=end)
    return RefreshResult(f"silver/{source}", rows_written, end)


def _with_rows_before(
    store: TableStore,
    layer: Layer,
    contract: SourceContract,
    rebuilt: pl.DataFrame,
    horizon: datetime,
) -> pl.DataFrame:
    """``rebuilt`` with the stored rows of ``layer`` that came from bronze rows ingested
    before bronze's retention ``horizon``, which bronze may no longer hold.

    Silver keeps one row per key, the winner as the incremental pipeline picks it: the
    greater sequence (contracts with one), else the later arrival, which is always the
    rebuilt row's (ingested after the horizon). Kept rows cannot be judged again (their
    raw form is gone): they keep their values, cast to the rebuilt columns' types (a
    type they cannot take refuses the refresh); silver keeps only the rebuilt columns
    (plus, with evolution ``add``, columns only the kept rows have), so its appends go
    on as before; quarantine, which takes new columns as they come, keeps them all.
    """
    stored = store.open(layer, contract.name)
    if stored is None:
        return rebuilt
    past = read_snapshot(stored).filter(pl.col("_ingested_at") < horizon).collect()
    if layer == "silver":
        past = _kept_winners(past, rebuilt, contract)
        if EVENT_DATE in rebuilt.columns and EVENT_DATE not in past.columns:
            past = past.with_columns(pl.col(contract.event_time).dt.date().alias(EVENT_DATE))
        if contract.evolution != "add":
            past = past.select([c for c in past.columns if c in rebuilt.columns])
    if past.is_empty():
        return rebuilt
    try:
        past = past.with_columns(
            pl.col(name).cast(rebuilt.schema[name]) for name in past.columns if name in rebuilt
        )
    except pl.exceptions.PolarsError as exc:
        raise RefreshRefused(
            f"{layer}/{contract.name}: its rows from before bronze's retention horizon "
            f"({horizon.isoformat()}) cannot take the contract's column types: {exc}"
        ) from exc
    log.info("refresh.kept_before_horizon", table=f"{layer}/{contract.name}", rows=past.height)
    if layer == "silver":
        rebuilt = rebuilt.join(
            past.select(contract.keys), on=contract.keys, how="anti", nulls_equal=True
        )
    return pl.concat([rebuilt, past], how="diagonal")


def _kept_winners(
    past: pl.DataFrame, rebuilt: pl.DataFrame, contract: SourceContract
) -> pl.DataFrame:
    """The stored pre-horizon silver rows that stay their key's winner against
    ``rebuilt``: keys it lacks, and (by sequence) keys whose rebuilt copy is older."""
    keys, seq = contract.keys, contract.sequence
    if seq is None:
        return past.join(rebuilt.select(keys), on=keys, how="anti", nulls_equal=True)
    rival, matched = f"{seq}\x01rebuilt", "\x01matched"  # names no field can take
    against = rebuilt.select([*keys, pl.col(seq).alias(rival), pl.lit(True).alias(matched)])
    joined = past.join(against, on=keys, how="left", nulls_equal=True)
    wins = pl.col(matched).is_null() | (pl.col(seq) > pl.col(rival)).fill_null(False)
    return joined.filter(wins).drop(rival, matched)


def backfill(
    store: TableStore, contract: SourceContract, start: datetime, end: datetime
) -> RefreshResult:
    """Re-judge the bronze rows ingested in ``[start, end)`` against the current contract.

    Passing rows are upserted into silver (replacing their earlier copies); the
    quarantine rows of that range are replaced by the new rejects in one commit.
    Only bronze versions silver has already consumed are touched, so the
    incremental pipeline never sees a row twice. A range reaching before bronze's
    retention horizon starts at the horizon (bronze may no longer hold older rows).
    """
    source = contract.name
    bronze = store.open("bronze", source)
    silver = store.open("silver", source)
    if bronze is None or silver is None:
        raise RefreshRefused(f"source {source!r} has no bronze and silver tables yet")
    # Only versions every sink has consumed: a batch one sink is still missing is
    # the processor's to finish (it redoes it with its original bounds).
    quarantine = store.open("quarantine", source)
    quality = store.open(QUALITY_LAYER, QUALITY_TABLE)
    sinks = list(consumed_by_sinks(silver, quarantine, quality, source).values())
    if any(v is None for v in sinks):
        raise RefreshRefused(f"silver/{source} has not consumed bronze in every sink yet")
    consumed = min(v for v in sinks if v is not None)
    horizon = retention_horizon(bronze)
    if horizon is not None and start < horizon:
        # Bronze may have lost the rows before it: their silver and quarantine rows
        # are left as they are, not replaced by nothing.
        log.info("backfill.starts_at_horizon", requested=str(start), horizon=str(horizon))
        start = horizon
    every = all_bronze_rows(bronze, consumed)
    in_range = pl.col("_ingested_at").is_between(start, end, closed="left")
    changes = every.filter(in_range)
    batch = build_batch(changes, contract)
    note = CommitProperties(custom_metadata={"lakehouse.backfill": f"{start}..{end}"})
    schema = silver_schema(contract)
    rows = batch.silver_rows(schema, 0)
    # Everything is judged before anything is written: a `fail` expectation stops the
    # backfill with no table touched.
    keys = contract.keys
    stale = _stale_from_range(silver, contract, changes, rows)
    earlier = _not_quarantined(every.filter(pl.col("_ingested_at") < start), quarantine, start)
    winners = _winners(stale, rows, earlier, contract, schema)
    upserts = _backfill_source(rows, stale, winners, keys)
    if not upserts.is_empty():
        replaces = replaces_predicate(contract, inclusive=True)
        stored = set(table_columns(silver))
        columns = {c: f's."{c}"' for c in upserts.columns if c in stored}
        merge(
            silver,
            upserts,
            keys,
            lambda m: (
                m.when_matched_update(
                    updates=columns, predicate=f"s.{_ACTION} = 'upsert' AND ({replaces})"
                )
                .when_matched_update(updates=columns, predicate=f"s.{_ACTION} = 'replace'")
                .when_matched_delete(predicate=f"s.{_ACTION} = 'delete'")
                .when_not_matched_insert(updates=columns, predicate=f"s.{_ACTION} <> 'delete'")
            ),
            note,
            prune=merge_prune(contract, upserts),
        )
    if quarantine is not None:
        window = (
            f"_ingested_at >= '{start.isoformat()}' AND _ingested_at < '{end.isoformat()}' "
            f"AND _bronze_version <= {consumed}"
        )
        write_synced(
            quarantine,
            to_arrow(quarantine_rows(batch.quarantined)),
            mode="overwrite",
            predicate=window,
            schema_mode="merge",
            commit_properties=note,
        )
    log.info(
        "backfill.done",
        source=source,
        rows=changes.height,
        start=str(start),
        end=str(end),
        removed_from_silver=stale.height - winners.height,
        replaced=winners.height,
    )
    return RefreshResult(f"silver/{source}", rows.height, consumed)


# Source column of a backfill MERGE: what its row does to silver.
_ACTION = "_backfill_action"


def _stale_from_range(
    silver: DeltaTable, contract: SourceContract, changes: pl.DataFrame, passed: pl.DataFrame
) -> pl.DataFrame:
    """The stored silver rows that came from the re-judged bronze rows (``changes``) and
    that the re-judgment does not make again (``passed``): the contract now rejects them
    (or an earlier copy of their key is what passes), so they must not stay as they are."""
    if changes.is_empty():
        return passed.clear()
    files = changes.get_column("_batch_id").unique().implode()
    stored = read_snapshot(silver).filter(pl.col("_batch_id").is_in(files)).collect()
    same = [*contract.keys, "_arrival"]
    return stored.join(passed.select(same), on=same, how="anti", nulls_equal=True)


def _not_quarantined(
    rows: pl.DataFrame, quarantine: DeltaTable | None, before: datetime
) -> pl.DataFrame:
    """``rows`` (bronze, ingested before ``before``) less those in quarantine: a copy
    the pipeline rejected then is the quarantine's, even if it would pass now."""
    if quarantine is None or rows.is_empty():
        return rows
    held = (
        read_snapshot(quarantine)
        .filter(pl.col("_ingested_at") < before)
        .select("_batch_id", "_row")
        .collect()
    )
    return rows.join(held, on=["_batch_id", "_row"], how="anti", nulls_equal=True)


def _winners(
    stale: pl.DataFrame,
    passed: pl.DataFrame,
    earlier: pl.DataFrame,
    contract: SourceContract,
    schema: pl.Schema,
) -> pl.DataFrame:
    """For each key of a stale row, its winning copy among those that pass the contract
    now: the re-judged range's and the earlier bronze rows the quarantine does not hold
    (rows after the range are left to their own judgment)."""
    keys = contract.keys
    if stale.is_empty():
        return pl.DataFrame(schema=schema)
    judged = [passed]
    if not earlier.is_empty():
        judged.append(build_batch(earlier, contract).silver_rows(schema, 0))
    candidates = pl.concat(judged, how="diagonal_relaxed").join(
        stale.select(keys), on=keys, how="semi", nulls_equal=True
    )
    return latest_per_key(candidates, contract)


def _backfill_source(
    passed: pl.DataFrame, stale: pl.DataFrame, winners: pl.DataFrame, keys: list[str]
) -> pl.DataFrame:
    """The backfill MERGE's source: the passing rows of keys without a stale row
    (upserted as the pipeline would), the winners that replace stale rows, and the
    stale rows no copy replaces, to delete."""
    upserted = passed.join(stale.select(keys), on=keys, how="anti", nulls_equal=True)
    gone = stale.join(winners.select(keys), on=keys, how="anti", nulls_equal=True)
    shaped = [c for c in passed.columns if c in gone.columns]
    return pl.concat(
        [
            upserted.with_columns(pl.lit("upsert").alias(_ACTION)),
            winners.with_columns(pl.lit("replace").alias(_ACTION)),
            gone.select(shaped).with_columns(pl.lit("delete").alias(_ACTION)),
        ],
        how="diagonal_relaxed",
    )
