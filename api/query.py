"""``POST /v1/query``: read-only DuckDB SQL over the lakehouse views (scope ``query``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from analytics.query import (
    QueryError,
    QueryLimits,
    QueryTimeout,
    run_query,
)
from analytics.results import columns_json, rows_json
from api.auth import scoped
from api.context import ApiContext, get_context
from api.errors import ApiError

router = APIRouter(tags=["query"])


class QueryRequest(BaseModel):
    """One read-only SELECT statement."""

    sql: str = Field(
        min_length=1, max_length=100_000, examples=["SELECT * FROM gold.readings_latest"]
    )
    max_rows: int | None = Field(None, ge=1, description="Lower the server's row limit.")


@router.post(
    "/v1/query",
    dependencies=[scoped("query")],  # type: ignore[list-item]
    responses={
        200: {"description": '{"columns": [{"name", "type"}], "rows": [{...}], "row_count": n}'},
        400: {"description": "Not a single SELECT, SQL error, or too many rows"},
        504: {"description": "Query exceeded the time limit"},
    },
)
async def query(body: QueryRequest, context: ApiContext = Depends(get_context)) -> Response:
    """Run ``sql`` over the ``<layer>.<table>`` views and return the rows as JSON objects."""
    settings = context.settings
    limits = QueryLimits.from_settings(settings, body.max_rows)
    try:
        table = await run_in_threadpool(run_query, settings.data_dir, body.sql, limits)
    except QueryTimeout as exc:
        raise ApiError(504, "query_timeout", str(exc)) from None
    except QueryError as exc:
        raise ApiError(400, "query_error", str(exc)) from None
    payload = (
        f'{{"columns":{columns_json(table)},"rows":{rows_json(table)},'
        f'"row_count":{table.num_rows}}}'
    )
    return Response(payload, media_type="application/json")
