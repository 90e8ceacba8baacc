"""``GET /v1/status``: the data behind the status page (scope ``query``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from analytics.catalog import table_store
from analytics.status import LakehouseStatus, lakehouse_status
from api.auth import scoped
from api.context import ApiContext, get_context

router = APIRouter(tags=["status"], dependencies=[scoped("query")])  # type: ignore[list-item]


@router.get("/v1/status")
async def status(
    minutes: int = Query(60, ge=1, le=24 * 60, description="Window of the ingestion rate."),
    context: ApiContext = Depends(get_context),
) -> LakehouseStatus:
    """Pipeline, every table's freshness and size, bronze rows per minute, recent problems."""
    settings = context.settings
    return await run_in_threadpool(
        lambda: lakehouse_status(table_store(settings), context.contracts, minutes=minutes)
    )
