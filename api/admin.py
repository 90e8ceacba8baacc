"""``POST /v1/admin/…``: on-demand maintenance and rebuilds (scope ``admin``).

Operations never race the pipeline's own commits. Under ``lakehouse up`` the
processor of the same process runs them between micro-batches; an API with no
processor in its process (``lakehouse api``) takes the processor lock for each,
like the CLI's ``lakehouse optimize|vacuum|refresh``, and answers ``409`` while
a processor elsewhere (``lakehouse process``) holds it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from deltalake.exceptions import CommitFailedError, DeltaError
from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from analytics.catalog import CatalogError, check_table_ref, table_store
from api.auth import scoped
from api.context import ApiContext, get_context
from api.errors import ApiError
from api.tables import catalog_error, opened
from delta_processing.maintenance import MaintenancePolicy, policy_for
from delta_processing.operations import (
    OperationConflict,
    OperationRefused,
    RetentionBelowMinimum,
    UnknownTarget,
    optimize_table,
    refresh_plan,
    refresh_target,
    vacuum_table,
)
from delta_processing.refresh import RefreshRefused
from delta_processing.tables import Layer, TableStore

router = APIRouter(tags=["admin"], dependencies=[scoped("admin")])  # type: ignore[list-item]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed table reference or unknown column"},
    404: {"description": "Unknown layer, table or refresh target"},
    409: {"description": "A processor holds the lock, or the table refuses the operation"},
}


def _checked(layer: str, name: str) -> Layer:
    try:
        return check_table_ref(layer, name)
    except CatalogError as exc:
        raise catalog_error(exc, layer, name) from None


async def _maintenance_target(
    context: ApiContext, layer: str, name: str
) -> tuple[Layer, TableStore, MaintenancePolicy]:
    """The checked table reference (404 before any waiting), its store and the policy."""
    checked = _checked(layer, name)
    await opened(context, layer, name)
    return checked, table_store(context.settings), policy_for(context.settings)


def operation_error(exc: Exception) -> ApiError:
    """The API error of a failed operation (``exc`` from :mod:`delta_processing.operations`)."""
    if isinstance(exc, OperationConflict):
        return ApiError(409, "processor_busy", str(exc), headers={"Retry-After": "30"})
    if isinstance(exc, RetentionBelowMinimum):
        return ApiError(409, "retention_below_table_minimum", str(exc))
    if isinstance(exc, RefreshRefused):
        return ApiError(409, "refresh_refused", str(exc))
    if isinstance(exc, UnknownTarget):
        return ApiError(404, "unknown_table", str(exc))
    if isinstance(exc, CommitFailedError):  # a concurrent writer won, retries exhausted
        return ApiError(409, "commit_conflict", str(exc), headers={"Retry-After": "30"})
    if isinstance(exc, DeltaError):  # the table refused it (e.g. z-order by a partition)
        return ApiError(409, "operation_failed", str(exc).splitlines()[0])
    return ApiError(400, "invalid_operation", str(exc))


@router.post("/v1/admin/tables/{layer}/{name}/optimize", responses=ERRORS)
async def optimize(
    layer: str,
    name: str,
    zorder: list[str] | None = Query(None, description="Z-order by these columns."),
    context: ApiContext = Depends(get_context),
) -> dict[str, Any]:
    """Compact the table's small files (Z-order them by ``zorder`` if given)."""
    checked, store, policy = await _maintenance_target(context, layer, name)
    try:
        outcome = await run_in_threadpool(
            context.operations, lambda: optimize_table(store, checked, name, policy, zorder)
        )
    except (OperationConflict, OperationRefused, DeltaError) as exc:
        raise operation_error(exc) from None
    context.metrics.admin_operations.labels("optimize").inc()
    body = asdict(outcome)
    body["compaction"]["zorder"] = list(outcome.compaction.zorder)
    return body


@router.post("/v1/admin/tables/{layer}/{name}/vacuum", responses=ERRORS)
async def vacuum(
    layer: str,
    name: str,
    dry_run: bool = Query(False, description="Only list the files that would be deleted."),
    context: ApiContext = Depends(get_context),
) -> dict[str, Any]:
    """Delete files no longer in the table and older than the configured vacuum retention.

    The retention is ``LAKEHOUSE_VACUUM_RETENTION_DAYS`` and never below the
    table's own minimum; versions a downstream stage has still to read are kept.
    """
    checked, store, policy = await _maintenance_target(context, layer, name)
    try:
        outcome = await run_in_threadpool(
            context.operations,
            lambda: vacuum_table(store, context.contracts, checked, name, policy, dry_run=dry_run),
        )
    except (OperationConflict, OperationRefused, DeltaError) as exc:
        raise operation_error(exc) from None
    if not dry_run:
        context.metrics.admin_operations.labels("vacuum").inc()
    return asdict(outcome)


@router.post("/v1/admin/refresh/{target:path}", responses=ERRORS)
async def refresh(target: str, context: ApiContext = Depends(get_context)) -> dict[str, Any]:
    """Rebuild ``silver/<source>`` or ``gold/<table>`` in full from its upstream.

    The same as ``lakehouse refresh``: refused (409) for tables the contract protects.
    """
    try:
        refresh_plan(context.contracts, target)  # 400/404 before taking the lock
    except OperationRefused as exc:
        raise operation_error(exc) from None
    settings = context.settings
    store = table_store(settings)
    try:
        outcome = await run_in_threadpool(
            context.operations, lambda: refresh_target(store, context.contracts, target)
        )
    except (OperationConflict, OperationRefused, RefreshRefused, DeltaError) as exc:
        raise operation_error(exc) from None
    context.metrics.admin_operations.labels("refresh").inc()
    return {**asdict(outcome.result), "version": outcome.version}
