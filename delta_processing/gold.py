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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb
import polars as pl
import structlog
from deltalake import CommitProperties, DeltaTable

from config.contracts import (
    GoldSpec,
    LatestGold,
    SourceContract,
    SqlGold,
    WindowGold,
    parse_duration,
)
from delta_processing.coercions import SILVER_TIME, contract_dtypes
from delta_processing.crashpoints import CrashPoints
from delta_processing.retention import RETENTION_MARK, retention_horizon
from delta_processing.silver import SilverInserts
from delta_processing.tables import (
    REFRESH_MARK,
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
    marked_versions,
    merge,
    read_changes,
    read_snapshot,
    to_arrow,
    write_synced,
)

GOLD_APP_ID = "lakehouse/gold<-silver"
PRESENT = "_present"
# The partition column of window tables: the UTC date of ``window_start``.
WINDOW_DATE = "_window_date"
CHANGED_ROWS = ("insert", "update_postimage", "update_preimage", "delete")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GoldResult:
    """What one gold refresh consumed and wrote."""

    table: str
    silver_version: int
    groups_touched: int


def window_schema(spec: WindowGold, contract: SourceContract) -> pl.Schema:
    """Columns of a window table: group keys, ``window_start``, then one per aggregate."""
    dtypes = contract_dtypes(contract)
    value_type = dtypes[spec.value]
    columns: dict[str, pl.DataType] = {g: dtypes[g] for g in spec.group_by}
    columns["window_start"] = SILVER_TIME
    for aggregate in spec.aggregates:
        if aggregate == "count":
            columns[aggregate] = pl.Int64()
        elif aggregate == "sum" and isinstance(value_type, pl.Decimal):
            columns[aggregate] = pl.Decimal(38, value_type.scale or 0)  # room for the total
        elif aggregate in ("min", "max", "sum", "first", "last"):
            columns[aggregate] = value_type
        else:  # avg, stddev, percentiles
            columns[aggregate] = pl.Float64()
    return pl.Schema(columns)


def gold_partitions(spec: GoldSpec, contract: SourceContract) -> list[str]:
    """The partition columns a new gold table is created with (``partitioning.gold``):
    window tables (declared or SQL) by the date of their windows, latest tables never."""
    if isinstance(spec, WindowGold | SqlGold) and contract.partitioning.gold == "window_date":
        return [WINDOW_DATE]
    return []


def with_window_date(windows: pl.DataFrame, window: str = "window_start") -> pl.DataFrame:
    """``windows`` with their partition value, the UTC date of their ``window`` column."""
    return windows.with_columns(pl.col(window).dt.date().alias(WINDOW_DATE))


def _window_column(spec: WindowGold | SqlGold) -> str:
    return "window_start" if isinstance(spec, WindowGold) else spec.window_column


def window_date_prune(windows: pl.DataFrame) -> str:
    """A MERGE predicate on the target that keeps it to the partitions of ``windows``.

    Safe because ``window_start`` is part of a window table's key: a stored row with
    the key of one of ``windows`` is in that window's date partition.
    """
    return in_list(f't."{WINDOW_DATE}"', windows[WINDOW_DATE].unique().to_list())


def _aggregate(name: str, value: pl.Expr, order: list[str]) -> pl.Expr:
    if name == "count":
        return pl.len()
    if name in ("first", "last"):
        if len(order) == 1:  # one row per instant in a group: no sort needed
            position = pl.col(order[0]).arg_min() if name == "first" else pl.col(order[0]).arg_max()
            return value.get(position)
        ordered = value.sort_by(order)  # by event time, ties by key: deterministic
        return ordered.first() if name == "first" else ordered.last()
    if name.startswith("p") and name[1:].isdigit():
        return value.quantile(int(name[1:]) / 100, interpolation="linear")
    return {
        "min": value.min(),
        "max": value.max(),
        "avg": value.mean(),
        "sum": value.sum(),
        "stddev": value.std(),
    }[name]


def gold_inputs(contract: SourceContract) -> list[str]:
    """The silver columns gold reads from the change feed: keys, event time, groups, values.

    SQL gold tables only need the event time (to find the windows they recompute).
    """
    columns = [*contract.keys, contract.event_time]
    for spec in contract.gold:
        if isinstance(spec, WindowGold | LatestGold):
            columns += [*spec.group_by, spec.value]
    return list(dict.fromkeys(columns))


def instant_is_unique(group_by: list[str], contract: SourceContract) -> bool:
    """Whether a group holds at most one silver row per event time (keys within it)."""
    return set(contract.keys) <= {*group_by, contract.event_time}


# Aggregates a window's stored value and the new rows' value combine into the whole's.
_COMBINING = ("count", "sum", "min", "max", "avg")


def combinable(spec: WindowGold, contract: SourceContract) -> bool:
    """Whether a window's aggregates can take in new rows without rereading its old ones.

    ``avg`` needs ``count`` and ``sum`` beside it and a value that is never null (the
    count is of rows, the mean of values).
    """
    aggregates = set(spec.aggregates)
    if not aggregates <= set(_COMBINING):
        return False
    return "avg" not in aggregates or (
        {"count", "sum"} <= aggregates and spec.value in contract.required_fields
    )


def combine_windows(
    stored: pl.DataFrame,
    fresh: pl.DataFrame,
    spec: WindowGold,
    keys: list[str],
    schema: pl.Schema,
) -> pl.DataFrame:
    """Windows in both ``stored`` and ``fresh`` (the aggregates of only new rows), as one.

    Pure; valid when :func:`combinable` holds and ``fresh`` holds rows new to silver.
    """
    old = "\x01stored"
    joined = fresh.join(stored, on=keys, how="inner", suffix=old, nulls_equal=True)

    def combined(name: str) -> pl.Expr:
        new, before = pl.col(name), pl.col(f"{name}{old}")
        if name in ("count", "sum"):
            return new + before
        if name == "min":
            return pl.min_horizontal(new, before)
        if name == "max":
            return pl.max_horizontal(new, before)
        total = pl.col("sum") + pl.col(f"sum{old}")
        return total.cast(pl.Float64) / (pl.col("count") + pl.col(f"count{old}"))

    return joined.select(
        [pl.col(k) for k in keys] + [combined(name).alias(name) for name in spec.aggregates]
    ).select([pl.col(n).cast(t) for n, t in schema.items()])


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
    rows: pl.DataFrame, spec: WindowGold, contract: SourceContract, schema: pl.Schema
) -> pl.DataFrame:
    """Full aggregation of silver rows into windows (pure; the reference for gold)."""
    event_time = contract.event_time
    # Group columns are constant within a group: they cannot order its rows.
    order = [event_time, *[k for k in contract.keys if k not in (event_time, *spec.group_by)]]
    value = pl.col(spec.value)
    return (
        rows.group_by(
            [*spec.group_by, pl.col(event_time).dt.truncate(spec.every).alias("window_start")]
        )
        .agg(_aggregate(name, value, order).alias(name) for name in spec.aggregates)
        .select([pl.col(n).cast(t) for n, t in schema.items()])
        .sort([*spec.group_by, "window_start"])
    )


def latest_values(
    rows: pl.DataFrame, spec: LatestGold, event_time: str, schema: pl.Schema
) -> pl.DataFrame:
    """The row with the greatest event time per group (pure; the reference for gold).

    Rows sharing that instant (possible only when the keys reach beyond the group and
    the event time) resolve to the greatest value, so the result is deterministic.
    """
    newest = pl.col(event_time) == pl.col(event_time).max().over(spec.group_by)
    return (
        rows.filter(newest)
        .group_by(spec.group_by)
        .agg(pl.col(event_time).first(), pl.col(spec.value).max())
        .select([pl.col(n).cast(t) for n, t in schema.items()])
        .sort(spec.group_by)
    )


def latest_moves(
    stored: pl.DataFrame, changed: pl.DataFrame, spec: LatestGold, event_time: str
) -> pl.DataFrame:
    """The groups whose latest row ``changed`` replaces, with that row (pure).

    ``stored`` is the latest table's row of each group ``changed`` touches;
    ``changed`` holds silver's inserted and updated rows, the newest version of each
    key (silver updates keep the key, so a change at the stored instant is the newer
    version of the stored row). Valid when :func:`instant_is_unique` holds and no
    silver row of these groups was deleted.
    """
    newest = changed.filter(
        pl.col(event_time) == pl.col(event_time).max().over(spec.group_by)
    ).select([*spec.group_by, event_time, spec.value])
    at = f"{event_time}\x01stored"
    compared = newest.join(
        stored.select([*spec.group_by, pl.col(event_time).alias(at)]),
        on=spec.group_by,
        how="left",
        nulls_equal=True,
    )
    return compared.filter(pl.col(at).is_null() | (pl.col(event_time) >= pl.col(at))).drop(at)


def run_gold_sql(rows: pl.DataFrame, spec: SqlGold) -> pl.DataFrame:
    """Run a SQL gold query over silver ``rows`` (the table ``silver``) with DuckDB."""
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("silver", rows.to_arrow())
        try:
            result: pl.DataFrame = con.sql(spec.query).pl()
        except duckdb.Error as exc:
            raise GoldDefinitionError(f"gold {spec.name!r}: query failed: {exc}") from None
    finally:
        con.close()
    if spec.window_column not in result.columns:
        raise GoldDefinitionError(
            f"gold {spec.name!r}: the query must output the window column {spec.window_column!r}"
        )
    if WINDOW_DATE in result.columns:
        raise GoldDefinitionError(
            f"gold {spec.name!r}: {WINDOW_DATE!r} is the partition column gold adds itself; "
            "name the query's column otherwise"
        )
    return result.with_columns(pl.col(spec.window_column).cast(SILVER_TIME))


def gold_frame(rows: pl.DataFrame, spec: GoldSpec, contract: SourceContract) -> pl.DataFrame:
    """Compute one gold table from scratch out of silver rows, as a new table holds it
    (window tables with their partition column, where the contract partitions them)."""
    if isinstance(spec, LatestGold):
        return latest_values(rows, spec, contract.event_time, latest_schema(spec, contract))
    if isinstance(spec, WindowGold):
        windows = window_aggregates(rows, spec, contract, window_schema(spec, contract))
    else:
        windows = run_gold_sql(rows, spec)
    if not gold_partitions(spec, contract):
        return windows
    return with_window_date(windows, _window_column(spec))


class GoldDefinitionError(RuntimeError):
    """A declared gold table cannot be computed as declared (bad query or window)."""


def kept_past_horizon(
    rebuilt: pl.DataFrame,
    stored: pl.DataFrame,
    spec: GoldSpec,
    contract: SourceContract,
    horizon: datetime,
) -> pl.DataFrame:
    """``rebuilt`` with the ``stored`` gold rows that silver can no longer recompute.

    Silver may have lost its rows before ``horizon`` to retention. A window that starts
    before it keeps its stored aggregate, computed when its rows were all there (SQL
    gold: the stored rows of its window, declared windows: of its group and window);
    a rebuilt window only replaces it where none is stored. A latest value recorded
    before the horizon is kept for a group with no row left in silver. Kept rows take
    the rebuilt table's columns and layout (a column the old table lacked is null). A
    stored table that no longer fits the definition keeps nothing (logged).
    """
    stored = stored.drop(WINDOW_DATE, strict=False)
    try:
        fresh = rebuilt  # what stays of the rebuilt rows
        if isinstance(spec, LatestGold):
            past = stored.filter(_instant(stored, contract.event_time) < horizon).join(
                rebuilt, on=spec.group_by, how="anti", nulls_equal=True
            )
        else:
            window = _window_column(spec)
            past = stored.filter(_instant(stored, window) < horizon)
            keys = [*spec.group_by, window] if isinstance(spec, WindowGold) else [window]
            fresh = rebuilt.join(past.select(keys).unique(), on=keys, how="anti", nulls_equal=True)
            if WINDOW_DATE in rebuilt.columns:
                past = with_window_date(past, window)
        if past.is_empty():
            return rebuilt
        shaped = past.select(
            pl.col(name).cast(dtype) if name in past.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in rebuilt.schema.items()
        )
        return pl.concat([fresh, shaped])
    except (pl.exceptions.PolarsError, KeyError) as exc:
        # The stored table no longer fits the definition (a column added to group_by,
        # a window column renamed, a type it cannot take): nothing can be told apart.
        log.warning("gold.nothing_kept_past_horizon", table=spec.name, error=str(exc))
        return rebuilt


def _instant(frame: pl.DataFrame, column: str) -> pl.Expr:
    """``column`` as a UTC instant to compare with a horizon (a date is its midnight)."""
    dtype = frame.schema[column]
    expr = pl.col(column)
    if dtype == pl.Date:
        return expr.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        return expr.dt.replace_time_zone("UTC")
    return expr


def rebuild_gold(
    store: TableStore, contract: SourceContract, spec: GoldSpec, silver: DeltaTable
) -> GoldResult:
    """Recompute a gold table in full from ``silver`` and replace it in one commit.

    Gold outlives silver here as in the incremental refresh: what it derived from rows
    that retention has since expired from silver is kept (:func:`kept_past_horizon`).
    """
    version = silver.version()
    rows = gold_frame(read_snapshot(silver).collect(), spec, contract)
    gold = store.open("gold", spec.name)
    horizon = retention_horizon(silver)
    if horizon is not None and gold is not None:
        rows = kept_past_horizon(rows, read_snapshot(gold).collect(), spec, contract, horizon)
    write_synced(
        gold if gold is not None else store.uri("gold", spec.name),
        to_arrow(rows),
        mode="overwrite",
        schema_mode="overwrite",
        # A list, even empty: None would keep the old table's partitioning, which the
        # rebuilt rows may not have (a contract back to "none").
        partition_by=gold_partitions(spec, contract),
        commit_properties=commit_marker(GOLD_APP_ID, version, **{REFRESH_MARK: "full"}),
        storage_options=store.options,
    )
    log.info("gold.rebuilt", table=spec.name, rows=rows.height, silver_version=version)
    return GoldResult(spec.name, version, rows.height)


class GoldRefresher:
    """Brings the gold tables of a source up to the current silver version."""

    def __init__(self, store: TableStore, crash_points: CrashPoints) -> None:
        self._store = store
        self._crash = crash_points
        self._layout_warned: set[str] = set()  # tables whose kept layout was logged

    def refresh(
        self,
        contract: SourceContract,
        inserted: Sequence[SilverInserts] = (),
        *,
        silver_version: int | None = None,
    ) -> list[GoldResult]:
        """Refresh every gold table declared by ``contract``; skip those already current.

        ``inserted``: silver commits whose appended rows the caller still holds; when
        they are every silver version a gold table has to consume, gold takes them
        instead of reading the change feed (on a backlog that read cost as much as the
        gold work itself). ``silver_version``: bring gold up to that silver version
        (silver may be further already, see :mod:`delta_processing.gold_behind`);
        ``None``: the latest.
        """
        silver = self._store.open("silver", contract.name, version=silver_version)
        if silver is None:
            return []
        silver_version = silver.version()
        results = []
        # Gold tables usually agree on where they stand: read each history and change
        # set once.
        history: dict[int | None, tuple[dict[str, set[int]], list[str]]] = {}
        changes_since: dict[int | None, pl.DataFrame] = {}
        for spec in contract.gold:
            done = consumed_version(self._store.open("gold", spec.name), GOLD_APP_ID)
            if done is not None and done >= silver_version:
                continue
            if done not in history:
                # Rebuilds, retention deletes and the requests behind the rows since `done`.
                commits = commits_after(silver, done) if done is not None else []
                history[done] = (
                    marked_versions(commits, REFRESH_MARK, RETENTION_MARK),
                    correlation_ids_in(commits),
                )
            marks, correlation_ids = history[done]
            if marks.get(REFRESH_MARK):
                # Silver was rebuilt: its change feed across the rewrite is not a diff.
                results.append(rebuild_gold(self._store, contract, spec, silver))
                self._crash.reached("after_gold_commit")
                continue
            if done not in changes_since:
                expired = marks.get(RETENTION_MARK, set())
                columns = gold_inputs(contract)
                held = _held_changes(silver, inserted, done, columns)
                changes_since[done] = (
                    held if held is not None else _silver_changes(silver, done, expired, columns)
                )
            changes = changes_since[done]
            if isinstance(spec, SqlGold):
                result = self._refresh_sql(contract, spec, silver, changes, correlation_ids)
            else:
                result = self._refresh_one(contract, spec, silver, changes, correlation_ids)
            results.append(result)
            log.info("gold.refreshed", **result.__dict__, correlation_ids=correlation_ids)
        return results

    def _refresh_one(
        self,
        contract: SourceContract,
        spec: WindowGold | LatestGold,
        silver: DeltaTable,
        changes: pl.DataFrame,
        correlation_ids: list[str],
    ) -> GoldResult:
        """Upsert the windows (or groups) ``changes`` touched, recomputed from silver."""
        silver_version = silver.version()
        marker = commit_marker(GOLD_APP_ID, silver_version, **correlation_metadata(correlation_ids))
        prune = None
        if isinstance(spec, WindowGold):
            schema = window_schema(spec, contract)
            keys = [*spec.group_by, "window_start"]
            gold = self._window_table(contract, spec, schema)
            upserts = self._window_upserts(contract, spec, silver, gold, changes, schema)
            if WINDOW_DATE in self._partitions(contract, spec, gold):
                upserts = with_window_date(upserts)
                prune = None if upserts.is_empty() else window_date_prune(upserts)
        else:
            schema = latest_schema(spec, contract)
            keys = list(spec.group_by)
            gold = ensure_table(self._store, "gold", spec.name, schema, cdf=False)
            upserts = self._latest_upserts(contract, spec, silver, gold, changes, schema)
        if upserts.is_empty():
            append(gold, upserts.drop(PRESENT), marker)
        else:
            _apply_upserts(gold, upserts, keys, marker, prune)
        self._crash.reached("after_gold_commit")
        return GoldResult(spec.name, silver_version, upserts.height)

    def _window_table(
        self, contract: SourceContract, spec: WindowGold, schema: pl.Schema
    ) -> DeltaTable:
        """The window table, created with the contract's partitioning if new."""
        gold = self._store.open("gold", spec.name)
        if gold is not None:
            return gold
        wanted = self._partitions(contract, spec, None)
        if wanted:
            schema = pl.Schema({**schema, WINDOW_DATE: pl.Date()})
        return ensure_table(self._store, "gold", spec.name, schema, cdf=False, partition_by=wanted)

    def _partitions(
        self, contract: SourceContract, spec: WindowGold | SqlGold, gold: DeltaTable | None
    ) -> list[str]:
        """The layout to write ``gold`` in: the contract's for a new table; an existing one
        keeps its own (logged once; ``lakehouse refresh`` rebuilds it in the new one)."""
        wanted = gold_partitions(spec, contract)
        if gold is None:
            return wanted
        current = list(gold.metadata().partition_columns)
        if current != wanted and spec.name not in self._layout_warned:
            self._layout_warned.add(spec.name)
            log.warning(
                "gold.partitioning_kept",
                table=spec.name,
                table_partitions=current,
                contract_partitions=wanted,
                hint=f"lakehouse refresh gold/{spec.name}",
            )
        return current

    def _window_upserts(
        self,
        contract: SourceContract,
        spec: WindowGold,
        silver: DeltaTable,
        gold: DeltaTable,
        changes: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """Touched windows with their new aggregates; ``_present`` false where now empty.

        A window that only gained new rows needs no silver read: if gold has no row for
        it, silver had none at the version gold records, so its rows are exactly the new
        ones; if gold has one and the aggregates combine (:func:`combinable`), the stored
        and the new aggregates are combined. Every other touched window (updated or
        deleted rows, aggregates such as ``last`` or percentiles) is recomputed from silver.
        """
        keys = [*spec.group_by, "window_start"]
        windowed = changes.with_columns(
            pl.col(contract.event_time).dt.truncate(spec.every).alias("window_start")
        )
        if windowed.is_empty():
            return pl.DataFrame(schema=schema).with_columns(pl.lit(True).alias(PRESENT))
        inserted = pl.col("_change_type") == "insert"
        if windowed.select(inserted.all()).item():  # new rows only (appends, a backlog)
            disturbed, grown = windowed.select(keys).clear(), windowed
        else:
            disturbed = windowed.filter(~inserted).select(keys).unique()
            grown = windowed.filter(inserted).join(disturbed, on=keys, how="anti", nulls_equal=True)
        fresh = window_aggregates(grown, spec, contract, schema)
        stored = _stored_windows(gold, fresh.select(keys), schema)
        new_windows = fresh.join(stored, on=keys, how="anti", nulls_equal=True)
        if combinable(spec, contract):
            parts = [new_windows, combine_windows(stored, fresh, spec, keys, schema)]
            recompute = disturbed
        else:
            parts = [new_windows]
            recompute = pl.concat([disturbed, stored.select(keys)])
        parts = [part.with_columns(pl.lit(True).alias(PRESENT)) for part in parts]
        if not recompute.is_empty():
            parts.append(self._windows_recomputed(contract, spec, silver, recompute, schema))
        return pl.concat(parts)

    def _windows_recomputed(
        self,
        contract: SourceContract,
        spec: WindowGold,
        silver: DeltaTable,
        touched: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """The ``touched`` windows recomputed from silver; ``_present`` false if now empty."""
        event_time = contract.event_time
        low = touched["window_start"].min()
        high = touched["window_start"].max() + parse_duration(spec.every)  # type: ignore[operator]
        rows = (
            read_snapshot(silver)
            .filter((pl.col(event_time) >= low) & (pl.col(event_time) < high))
            .select(list(dict.fromkeys([*spec.group_by, *contract.keys, event_time, spec.value])))
            .join(touched.lazy(), how="semi", on=spec.group_by)
            .collect()
        )
        fresh = window_aggregates(rows, spec, contract, schema)
        return _mark_presence(touched, fresh, [*spec.group_by, "window_start"], schema)

    def _refresh_sql(
        self,
        contract: SourceContract,
        spec: SqlGold,
        silver: DeltaTable,
        changes: pl.DataFrame,
        correlation_ids: list[str],
    ) -> GoldResult:
        """Recompute the windows ``changes`` touched and replace them."""
        silver_version = silver.version()
        gold = self._store.open("gold", spec.name)
        window = pl.col(contract.event_time).dt.truncate(spec.every)
        touched = changes.select(window.alias("w")).unique()["w"]
        rows = (
            read_snapshot(silver)
            .filter(window.is_in(touched.implode()))
            .collect()
            .drop("_arrival", strict=False)
        )
        result = run_gold_sql(rows, spec)
        strays = result.filter(~pl.col(spec.window_column).is_in(touched.implode()))
        if not strays.is_empty():
            raise GoldDefinitionError(
                f"gold {spec.name!r}: {spec.window_column!r} must be the start of the "
                f"{spec.every} event-time window (e.g. date_trunc of {contract.event_time!r}); "
                f"got {strays[spec.window_column][0]}"
            )
        marker = commit_marker(GOLD_APP_ID, silver_version, **correlation_metadata(correlation_ids))
        partitions = self._partitions(contract, spec, gold)
        if WINDOW_DATE in partitions:
            result = with_window_date(result, spec.window_column)
        if gold is None or touched.is_empty():
            append(
                gold if gold is not None else self._store.uri("gold", spec.name),
                result,
                marker,
                partition_by=partitions,
                storage_options=self._store.options,
            )
        else:
            windows = touched.to_list()
            predicate = in_list(f'"{spec.window_column}"', windows)
            if WINDOW_DATE in partitions:  # only the touched days' files are rewritten
                predicate += " AND " + in_list(f'"{WINDOW_DATE}"', (w.date() for w in windows))
            write_synced(
                gold,
                to_arrow(result),
                mode="overwrite",
                predicate=predicate,
                commit_properties=marker,
            )
        self._crash.reached("after_gold_commit")
        return GoldResult(spec.name, silver_version, touched.len())

    def _latest_upserts(
        self,
        contract: SourceContract,
        spec: LatestGold,
        silver: DeltaTable,
        gold: DeltaTable,
        changes: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """Groups whose latest row may have changed, with their new latest row.

        When a group holds one row per instant, the new latest row is the newer of the
        stored one and the changed ones: only deleted groups are recomputed from silver.
        Otherwise every touched group is.
        """
        group_by = list(spec.group_by)
        touched = changes.select(group_by).unique()
        if touched.is_empty() or not instant_is_unique(group_by, contract):
            return self._latest_recomputed(contract, spec, silver, touched, schema)
        change_type = pl.col("_change_type")
        # A delete, or an update that can move a row to another instant (the event time
        # is not a key), may take a group's latest row away: those groups are recomputed.
        lost = change_type == "delete"
        if contract.event_time not in contract.keys:
            lost = lost | (change_type == "update_preimage")
        deleted = changes.filter(lost).select(group_by).unique()
        event_time = pl.col(contract.event_time)
        live = changes.filter(
            change_type.is_in(["insert", "update_postimage"])
            # Only each group's newest changed instant can move its latest row.
            & (event_time == event_time.max().over(group_by))
        ).select(
            list(dict.fromkeys([*group_by, *contract.keys, contract.event_time, spec.value]))
            + (["_commit_version"] if "_commit_version" in changes.columns else [])
        )
        if "_commit_version" in live.columns and live["_commit_version"].n_unique() > 1:
            # A key changed in two commits: its later version. (One commit has one per key.)
            live = live.sort("_commit_version").unique(subset=contract.keys, keep="last")
        live = live.join(deleted, on=group_by, how="anti", nulls_equal=True)
        stored = (
            read_snapshot(gold)
            .join(live.select(group_by).unique().lazy(), on=group_by, how="semi", nulls_equal=True)
            .collect()
        )
        moved = latest_moves(stored, live, spec, contract.event_time).select(
            [pl.col(n).cast(t) for n, t in schema.items()] + [pl.lit(True).alias(PRESENT)]
        )
        if deleted.is_empty():
            return moved
        recomputed = self._latest_recomputed(contract, spec, silver, deleted, schema)
        return pl.concat([moved, recomputed])

    def _latest_recomputed(
        self,
        contract: SourceContract,
        spec: LatestGold,
        silver: DeltaTable,
        touched: pl.DataFrame,
        schema: pl.Schema,
    ) -> pl.DataFrame:
        """The latest row of each ``touched`` group, recomputed from silver."""
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


def _stored_windows(gold: DeltaTable, windows: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """The rows ``gold`` holds for ``windows`` (group keys and ``window_start``)."""
    if windows.is_empty():
        return pl.DataFrame(schema=schema)
    low, high = windows["window_start"].min(), windows["window_start"].max()
    return (
        read_snapshot(gold)
        .filter(pl.col("window_start").is_between(low, high))
        .join(windows.lazy(), on=windows.columns, how="semi", nulls_equal=True)
        .select([pl.col(n).cast(t) for n, t in schema.items()])
        .collect()
    )


def narrowed(inserted: SilverInserts, contract: SourceContract) -> SilverInserts:
    """``inserted`` with only the columns gold reads (what is worth holding for it)."""
    columns = [c for c in gold_inputs(contract) if c in inserted.rows.columns]
    return SilverInserts(inserted.version, inserted.rows.select(columns), inserted.table_id)


def _held_changes(
    silver: DeltaTable, inserted: Sequence[SilverInserts], done: int | None, columns: list[str]
) -> pl.DataFrame | None:
    """What :func:`_silver_changes` would read after version ``done``, made from rows
    held in memory: only if every one of those versions is a held append (any other
    commit, a merge, a rebuild, a retention delete, leaves ``None``: read the feed)."""
    if done is None or not inserted:
        return None
    table_id = str(silver.metadata().id)  # a UUID, whatever the stub says
    held = {entry.version: entry.rows for entry in inserted if entry.table_id == table_id}
    wanted = range(done + 1, silver.version() + 1)
    if not wanted or any(version not in held for version in wanted):
        return None
    shape = [*dict.fromkeys(columns), "_change_type", "_commit_version"]
    return pl.concat(
        as_inserts(held[version], silver, version, 0).select(shape) for version in wanted
    )


def _silver_changes(
    silver: DeltaTable, done: int | None, expired: set[int], columns: list[str]
) -> pl.DataFrame:
    """``columns`` of the silver rows changed since version ``done`` (all of silver when
    never consumed), with the change feed's ``_change_type`` and ``_commit_version``.

    Deletes made by retention (versions ``expired``) are skipped: gold keeps what
    silver lets age out.
    """
    if done is None:
        snapshot = read_snapshot(silver).select(columns).collect()
        return snapshot.with_columns(pl.lit("insert").alias("_change_type"))
    changes = (
        read_changes(silver, done + 1, silver.version(), columns)
        .filter(pl.col("_change_type").is_in(CHANGED_ROWS))
        .drop("_commit_timestamp")
    )
    if expired:
        changes = changes.filter(~pl.col("_commit_version").is_in(sorted(expired)))
    return changes


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
    gold: DeltaTable,
    upserts: pl.DataFrame,
    keys: list[str],
    marker: CommitProperties,
    prune: str | None = None,
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
        prune=prune,
    )
