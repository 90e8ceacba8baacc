"""Bringing an existing table's columns in line with a (changed) contract.

New contract fields become new, nullable columns. A type change is applied only
when it widens safely (every old value has an exact new one: int -> float,
int -> decimal, date -> timestamp, decimal to more digits); the table is then
rewritten once, cast, in a single commit that keeps its recorded positions.
Anything else stops the source with a message saying how to rebuild the table.
"""

from __future__ import annotations

import polars as pl
import structlog
from deltalake import CommitProperties, DeltaTable
from deltalake.schema import Field

from delta_processing.tables import (
    REFRESH_MARK,
    read_snapshot,
    reopen,
    sync_commit,
    to_arrow,
    write_synced,
)

log = structlog.get_logger(__name__)


class UnsafeTypeChange(RuntimeError):
    """The contract changes a column's type in a way existing values may not survive."""


def is_safe_widening(old: pl.DataType, new: pl.DataType) -> bool:
    """Whether every ``old`` value converts exactly to ``new``."""
    if old == new:
        return True
    if old == pl.Int64 and (new == pl.Float64 or isinstance(new, pl.Decimal)):
        return True
    if old == pl.Date and isinstance(new, pl.Datetime):
        return True
    if isinstance(old, pl.Decimal) and isinstance(new, pl.Decimal):
        old_scale, new_scale = old.scale or 0, new.scale or 0
        old_int = (old.precision or 38) - old_scale
        new_int = (new.precision or 38) - new_scale
        return new_scale >= old_scale and new_int >= old_int
    return False


def reconcile_columns(table: DeltaTable, wanted: pl.Schema, label: str) -> DeltaTable:
    """Add missing columns and apply safe widenings so ``table`` can hold ``wanted``."""
    current = read_snapshot(table).collect_schema()
    missing = [name for name in wanted if name not in current]
    if missing:
        arrow = to_arrow(pl.DataFrame(schema={n: wanted[n] for n in missing})).schema
        table.alter.add_columns([Field.from_arrow(field) for field in arrow])
        sync_commit(table, table.version())  # the change moved it to its commit
        log.info("schema.columns_added", table=label, columns=missing)
    changed = {n: t for n, t in wanted.items() if n in current and current[n] != t}
    if not changed:
        return table
    unsafe = [n for n, t in changed.items() if not is_safe_widening(current[n], t)]
    if unsafe:
        details = ", ".join(f"{n}: {current[n]} -> {changed[n]}" for n in unsafe)
        raise UnsafeTypeChange(
            f"{label}: the contract changes column types unsafely ({details}); "
            f"rebuild the table with `lakehouse refresh {label}`"
        )
    frame = (
        read_snapshot(table).collect().with_columns(pl.col(n).cast(t) for n, t in changed.items())
    )
    write_synced(
        table,
        to_arrow(frame),
        mode="overwrite",
        schema_mode="overwrite",
        commit_properties=CommitProperties(
            # Marked as a refresh: gold rebuilds with the wider types instead of
            # casting new values down into its old columns.
            custom_metadata={"lakehouse.widened": ", ".join(sorted(changed)), REFRESH_MARK: "widen"}
        ),
    )
    log.info("schema.columns_widened", table=label, columns=sorted(changed))
    return reopen(table)
