"""``GET /v1/quality``: per-batch data-quality metrics (scope ``query``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from analytics.catalog import table_store
from analytics.quality import read_quality
from analytics.results import rows_json
from api.auth import scoped
from api.context import ApiContext, get_context

router = APIRouter(tags=["quality"])


@router.get(
    "/v1/quality",
    dependencies=[scoped("query")],  # type: ignore[list-item]
    responses={200: {"description": "Newest batches first: counts and failed expectations"}},
)
async def quality(
    source: str | None = Query(None, description="Only this source."),
    last: int = Query(20, ge=1, le=10_000, description="How many recent batches."),
    context: ApiContext = Depends(get_context),
) -> Response:
    """Rows in, passed, warned, dropped and quarantined per batch, and failures per rule."""
    frame = await run_in_threadpool(read_quality, table_store(context.settings), source, last)
    return Response(rows_json(frame.to_arrow()), media_type="application/json")
