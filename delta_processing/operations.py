"""On-demand operations on one table (optimize, vacuum, refresh), never racing the pipeline.

What ``lakehouse optimize|vacuum|refresh`` do for one table, as functions that
return what they did instead of printing it, for callers that are not the CLI
(the admin API). Where they run is an :class:`OperationRunner`:

* :class:`ProcessorRunner` hands them to the processor of the same process
  (``lakehouse up``), which runs them between micro-batches under its lock;
* :class:`LockedRunner` takes the processor lock itself (``lakehouse api`` with
  no processor in the process), and raises :class:`OperationConflict` at once
  if a processor elsewhere holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from deltalake.exceptions import DeltaError

from config.contracts import ContractRegistry, SourceContract
from delta_processing.housekeeping import downstream_floor
from delta_processing.maintenance import CompactionResult, MaintenancePolicy, compact, vacuum
from delta_processing.processor import (
    Processor,
    ProcessorLock,
    ProcessorLockedError,
    ProcessorStopped,
)
from delta_processing.refresh import RefreshResult, refresh
from delta_processing.tables import Layer, TableStore, as_pyarrow

T = TypeVar("T")


class OperationConflict(RuntimeError):
    """The processor lock is held (a running processor, or another operation)."""


class OperationRefused(ValueError):
    """The operation cannot apply to its target (malformed target, unknown column)."""


class UnknownTarget(OperationRefused):
    """The target names no table (or no declared source or gold table)."""


class RetentionBelowMinimum(OperationRefused):
    """The configured vacuum retention is shorter than the table's own minimum."""


@contextmanager
def processor_lock(data_dir: Path, operation: str) -> Iterator[None]:
    """Hold the processor lock of ``data_dir`` for ``operation`` (a processor started
    meanwhile waits for it); :class:`OperationConflict` if it is taken."""
    lock = ProcessorLock(data_dir, role=f"operation {operation}")
    try:
        lock.acquire()
    except ProcessorLockedError as exc:
        raise OperationConflict(
            f"{exc} (stop the processor, or let its own housekeeping do this)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def locked(data_dir: Path, work: Callable[[], T]) -> T:
    """Run ``work`` while holding the processor lock of ``data_dir``."""
    with processor_lock(data_dir, "of the admin API"):
        return work()


class OperationRunner(Protocol):
    """Runs one operation where it cannot race the pipeline's commits; returns its result."""

    def __call__(self, work: Callable[[], T], /) -> T: ...


@dataclass(frozen=True)
class LockedRunner:
    """Takes the processor lock for each operation (no processor runs in this process)."""

    data_dir: Path

    def __call__(self, work: Callable[[], T], /) -> T:
        """Run ``work`` under the lock; :class:`OperationConflict` if a processor holds it."""
        return locked(self.data_dir, work)


@dataclass(frozen=True)
class ProcessorRunner:
    """Hands each operation to the processor running in this process, and waits for it."""

    processor: Processor

    def __call__(self, work: Callable[[], T], /) -> T:
        """Run ``work`` in the processor's thread between micro-batches."""
        try:
            return self.processor.submit(work).result()
        except ProcessorStopped as exc:
            raise OperationConflict(str(exc)) from None


@dataclass(frozen=True)
class OptimizeOutcome:
    """What optimizing one table did: the compaction and the table before and after."""

    table: str
    compaction: CompactionResult
    version_before: int
    version_after: int
    files_before: int
    files_after: int


@dataclass(frozen=True)
class VacuumOutcome:
    """Files a vacuum deleted (or, in a dry run, would delete) from one table."""

    table: str
    dry_run: bool
    files: list[str]
    retention_hours: float | None
    version_before: int
    version_after: int


@dataclass(frozen=True)
class RefreshOutcome:
    """What a full rebuild wrote, and the rebuilt table's new version."""

    result: RefreshResult
    version: int | None


def _file_count(store: TableStore, layer: Layer, name: str) -> tuple[int, int]:
    table = store.open(layer, name)
    if table is None:
        return -1, 0
    return table.version(), as_pyarrow(table.get_add_actions(flatten=True)).num_rows


def optimize_table(
    store: TableStore,
    layer: Layer,
    name: str,
    policy: MaintenancePolicy,
    zorder: list[str] | None = None,
) -> OptimizeOutcome:
    """Compact ``layer/name`` (Z-ordered by ``zorder`` if given), as ``lakehouse optimize``."""
    table = store.open(layer, name)
    if table is None:
        raise UnknownTarget(f"no table {layer}/{name}")
    columns = {f.name for f in table.schema().fields}
    unknown = [c for c in zorder or [] if c not in columns]
    if unknown:
        raise OperationRefused(f"{layer}/{name} has no column(s) {', '.join(unknown)}")
    version_before, files_before = _file_count(store, layer, name)
    result = compact(table, policy, zorder=zorder or None)
    version_after, files_after = _file_count(store, layer, name)
    return OptimizeOutcome(
        f"{layer}/{name}", result, version_before, version_after, files_before, files_after
    )


def vacuum_table(
    store: TableStore,
    contracts: ContractRegistry,
    layer: Layer,
    name: str,
    policy: MaintenancePolicy,
    *,
    dry_run: bool,
) -> VacuumOutcome:
    """Vacuum ``layer/name`` with ``policy``'s retention, keeping what downstream still needs.

    Never goes below the table's own minimum (``delta.deletedFileRetentionDuration``):
    :class:`RetentionBelowMinimum` instead.
    """
    table = store.open(layer, name)
    if table is None:
        raise UnknownTarget(f"no table {layer}/{name}")
    version_before = table.version()
    floor = downstream_floor(store, contracts, layer, name)
    try:
        files = vacuum(table, policy, dry_run=dry_run, keep_from_version=floor)
    except DeltaError as exc:
        if "retention" not in str(exc).lower():
            raise
        raise RetentionBelowMinimum(
            f"{layer}/{name}: the configured vacuum retention is below the table's minimum "
            f"(delta.deletedFileRetentionDuration); the processor's housekeeping aligns it "
            f"with the settings. deltalake: {str(exc).splitlines()[0]}"
        ) from None
    after = store.open(layer, name)
    retention = policy.vacuum_retention
    return VacuumOutcome(
        table=f"{layer}/{name}",
        dry_run=dry_run,
        files=files,
        retention_hours=None if retention is None else retention.total_seconds() / 3600,
        version_before=version_before,
        version_after=version_before if after is None else after.version(),
    )


def refresh_plan(contracts: ContractRegistry, target: str) -> tuple[SourceContract, str]:
    """The contract and table a refresh target names: ``silver/<source>`` or ``gold/<table>``."""
    layer, _, name = target.partition("/")
    if layer == "silver" and name in contracts:
        return contracts[name], "silver"
    if layer == "gold":
        owner = next((c for c in contracts.values() if any(g.name == name for g in c.gold)), None)
        if owner is None:
            raise UnknownTarget(f"no declared gold table {name!r}")
        return owner, name
    if layer == "silver":
        raise UnknownTarget(f"no declared source {name!r}")
    raise OperationRefused(f"cannot refresh {target!r}: use silver/<source> or gold/<table>")


def refresh_target(store: TableStore, contracts: ContractRegistry, target: str) -> RefreshOutcome:
    """Rebuild ``silver/<source>`` or ``gold/<table>`` in full, as ``lakehouse refresh``.

    Raises :class:`~delta_processing.refresh.RefreshRefused` for protected tables
    or a missing upstream.
    """
    contract, table = refresh_plan(contracts, target)
    result = refresh(store, contract, table)
    layer, _, name = result.table.partition("/")
    rebuilt = store.open("silver" if layer == "silver" else "gold", name)
    return RefreshOutcome(result, None if rebuilt is None else rebuilt.version())
