"""``POST /v1/query``: read-only DuckDB SQL over the lakehouse views (scope ``query``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from analytics.catalog import table_store
from analytics.query import (
    QueryError,
    QueryLimits,
    QueryTimeout,
    run_query,
)
from analytics.results import (
    MEDIA_TYPES,
    ResultFormat,
    UnencodableResult,
    UnsupportedResultFormat,
    columns_json,
    encode_result,
    format_for_accept,
    rows_json,
)
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
    format: ResultFormat | None = Field(
        None, description="Result format; overrides the Accept header (default: JSON)."
    )


@router.post(
    "/v1/query",
    dependencies=[scoped("query")],  # type: ignore[list-item]
    responses={
        200: {
            "description": 'JSON: {"columns": [{"name", "type"}], "rows": [{...}], '
            '"row_count": n}; or CSV, an Arrow IPC stream or Parquet, as the Accept header '
            "or the format field asks",
            "content": {media: {} for media in MEDIA_TYPES.values()},
        },
        400: {"description": "Not a single SELECT, SQL error, or too many rows"},
        406: {"description": "The Accept header names no format results come in"},
        504: {"description": "Query exceeded the time limit"},
    },
)
async def query(
    body: QueryRequest,
    context: ApiContext = Depends(get_context),
    accept: str | None = Header(None),
) -> Response:
    """Run ``sql`` over the ``<layer>.<table>`` views; rows as JSON, CSV, Arrow or Parquet."""
    try:
        fmt = body.format or format_for_accept(accept)
    except UnsupportedResultFormat as exc:
        raise ApiError(406, "not_acceptable", str(exc)) from None
    settings = context.settings
    limits = QueryLimits.from_settings(settings, body.max_rows)
    try:
        table = await run_in_threadpool(run_query, table_store(settings), body.sql, limits)
    except QueryTimeout as exc:
        raise ApiError(504, "query_timeout", str(exc)) from None
    except QueryError as exc:
        raise ApiError(400, "query_error", str(exc)) from None
    headers = {"X-Row-Count": str(table.num_rows)}
    if fmt != "json":
        try:
            content = await run_in_threadpool(encode_result, table, fmt)
        except UnencodableResult as exc:
            raise ApiError(422, "unencodable_result", str(exc)) from None
        return Response(content, media_type=MEDIA_TYPES[fmt], headers=headers)
    payload = (
        f'{{"columns":{columns_json(table)},"rows":{rows_json(table)},'
        f'"row_count":{table.num_rows}}}'
    )
    return Response(payload, media_type="application/json", headers=headers)
