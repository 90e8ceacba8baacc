"""Housekeeping across the whole lakehouse: which tables to maintain, and how far back
each table's downstream readers still need its history.

A table's change feed is read by the next stage from the version that stage
recorded. Log cleanup and vacuum must keep everything from there on, or a
lagging stage (a source stopped by a ``fail`` expectation, say) could never
catch up. :func:`downstream_floor` finds that version.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from config.contracts import ContractRegistry
from delta_processing.gold import GOLD_APP_ID
from delta_processing.maintenance import MaintenancePolicy, MaintenanceReport, maintain, vacuum
from delta_processing.quality import QUALITY_LAYER, QUALITY_TABLE
from delta_processing.silver import consumed_by_sinks
from delta_processing.tables import LAYERS, Layer, TableStore, consumed_version

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class VacuumResult:
    """Files removed (or, in a dry run, removable) from one table."""

    table: str
    files: list[str]


def all_tables(store: TableStore) -> Iterator[tuple[Layer, str]]:
    """Every Delta table of the lakehouse as ``(layer, name)``."""
    for layer in LAYERS:
        for name in store.list(layer):
            yield layer, name


def downstream_floor(
    store: TableStore, contracts: ContractRegistry, layer: Layer, name: str
) -> int | None:
    """First version of ``layer/name`` a downstream stage has still to read, if any."""
    readers: list[int | None] = []
    if layer == "bronze" and name in contracts:
        readers = list(
            consumed_by_sinks(
                store.open("silver", name),
                store.open("quarantine", name),
                store.open(QUALITY_LAYER, QUALITY_TABLE),
                name,
            ).values()
        )
    elif layer == "silver" and name in contracts:
        readers = [
            consumed_version(store.open("gold", spec.name), GOLD_APP_ID)
            for spec in contracts[name].gold
        ]
    if not readers:
        return None
    return min(-1 if v is None else v for v in readers) + 1


def maintain_all(
    store: TableStore, contracts: ContractRegistry, policy: MaintenancePolicy
) -> list[MaintenanceReport]:
    """Compact, checkpoint and clean the log of every table; one failure skips one table."""
    reports = []
    for layer, name in all_tables(store):
        try:
            floor = downstream_floor(store, contracts, layer, name)
            report = maintain(store, layer, name, policy, keep_from_version=floor)
        except Exception:
            log.exception("housekeeping.maintain_failed", table=f"{layer}/{name}")
            continue
        if report is not None:
            reports.append(report)
    return reports


def vacuum_tables(
    store: TableStore,
    contracts: ContractRegistry,
    policy: MaintenancePolicy,
    tables: list[tuple[Layer, str]],
    *,
    dry_run: bool,
) -> list[VacuumResult]:
    """Vacuum ``tables``, keeping every version a downstream stage still needs."""
    results = []
    for layer, name in tables:
        table = store.open(layer, name)
        if table is None:
            continue
        floor = downstream_floor(store, contracts, layer, name)
        files = vacuum(table, policy, dry_run=dry_run, keep_from_version=floor)
        results.append(VacuumResult(f"{layer}/{name}", files))
    return results
