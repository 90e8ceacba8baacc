"""``GET /v1/tables…``: the catalog: schema, version, files, rows, history (scope ``query``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from deltalake import DeltaTable
from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from analytics.catalog import (
    CatalogError,
    HistoryEntry,
    InvalidTableName,
    TableDetails,
    UnknownLayer,
    describe_table,
    describe_tables,
    open_table,
    table_history,
    table_store,
)
from api.auth import scoped
from api.context import ApiContext, get_context
from api.errors import ApiError

router = APIRouter(tags=["tables"], dependencies=[scoped("query")])  # type: ignore[list-item]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed table name"},
    404: {"description": "Unknown layer or table"},
}


def catalog_error(exc: CatalogError, layer: str, name: str) -> ApiError:
    """The API error of a table reference that names nothing."""
    if isinstance(exc, UnknownLayer):
        return ApiError(404, "unknown_layer", str(exc), layer=layer)
    if isinstance(exc, InvalidTableName):
        return ApiError(400, "invalid_table_name", str(exc), table=name)
    return ApiError(404, "unknown_table", str(exc), layer=layer, table=name)


async def opened(context: ApiContext, layer: str, name: str) -> DeltaTable:
    """The table ``layer/name`` at its latest version, or the API error saying why not."""
    store = table_store(context.settings)
    try:
        _, table = await run_in_threadpool(open_table, store, layer, name)
    except CatalogError as exc:
        raise catalog_error(exc, layer, name) from None
    return table


def summary(details: TableDetails) -> dict[str, Any]:
    """One table's catalog entry without its column list (``column_count`` instead)."""
    entry = asdict(details)
    entry["column_count"] = len(entry.pop("columns"))
    return entry


@router.get("/v1/tables")
async def list_tables(context: ApiContext = Depends(get_context)) -> list[dict[str, Any]]:
    """Every table: layer, name, version, files, bytes, rows, last commit and freshness."""
    details = await run_in_threadpool(describe_tables, table_store(context.settings))
    return [summary(d) for d in details]


@router.get("/v1/tables/{layer}/{name}", responses=NOT_FOUND)
async def get_table(
    layer: str, name: str, context: ApiContext = Depends(get_context)
) -> TableDetails:
    """One table in full: its schema, partitioning, files, bytes, rows and freshness."""
    table = await opened(context, layer, name)
    return await run_in_threadpool(describe_table, table, layer, name)


@router.get("/v1/tables/{layer}/{name}/history", responses=NOT_FOUND)
async def get_history(
    layer: str,
    name: str,
    limit: int = Query(20, ge=1, le=10_000, description="How many recent commits."),
    context: ApiContext = Depends(get_context),
) -> list[HistoryEntry]:
    """The newest commits: version, time, operation, its metrics and our commit metadata."""
    table = await opened(context, layer, name)
    return await run_in_threadpool(table_history, table, limit)
