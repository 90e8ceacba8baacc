"""``POST /v1/ingest/{source}`` as a FastAPI route: its OpenAPI description, and a handler.

Requests to it are normally answered before FastAPI sees them, by the lean ASGI
endpoint of :mod:`api.ingest_endpoint` (see :class:`api.app.LakehouseApp`); the route
declared here documents the endpoint at ``/docs`` and answers exactly the same way
wherever the router is mounted without that dispatch. What accepting a batch takes
is in :mod:`api.ingestion`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from api.auth import authenticated
from api.context import ApiContext, get_context
from api.ingestion import REPLAYED_HEADER, ROUTE, IngestAccepted, IngestRequest, accept
from api.rate_limit import STATE_KEY, RateLimiter
from api.tokens import TokenRecord

router = APIRouter(tags=["ingest"])


@router.post(
    # ":path" lets encoded slashes reach the name check (400) instead of missing the route.
    ROUTE,
    status_code=202,
    response_model=IngestAccepted,
    responses={
        400: {"description": "Malformed body (the message names the line or record)"},
        401: {"description": "Missing or invalid bearer token"},
        403: {"description": "Token lacks ingest:<source>"},
        404: {"description": "Unknown source"},
        413: {"description": "Body larger than the configured limit"},
        409: {"description": "Idempotency-Key already used with another body"},
        415: {"description": "Unsupported Content-Type or Content-Encoding"},
        503: {"description": "Landing backlog or disk over its bound (Retry-After)"},
        507: {"description": "Landing zone out of space"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in (
                    "application/json",
                    "application/x-ndjson",
                    "text/csv",
                    "application/vnd.apache.parquet",
                )
            },
        }
    },
)
async def ingest(
    source: str,
    request: Request,
    response: Response,
    token: TokenRecord = Depends(authenticated),
    context: ApiContext = Depends(get_context),
) -> IngestAccepted:
    """Accept a batch of records for ``source`` (JSON, NDJSON, CSV or Parquet; gzip allowed).

    With ``Idempotency-Key`` (1-255 printable ASCII characters), a retry with the same
    key and body returns the first answer and lands nothing new (also across restarts
    and workers, for ``LAKEHOUSE_IDEMPOTENCY_WINDOW_S``); the same key with another body
    is ``409``.
    """
    call = IngestRequest(
        source=source,
        content_type=request.headers.get("content-type"),
        content_encoding=request.headers.get("content-encoding"),
        idempotency_key=request.headers.get("idempotency-key"),
        client=request.client.host if request.client else "unknown",
        correlation_id=getattr(request.state, "correlation_id", None),
        read_body=request.body,  # size capped by BodyLimitMiddleware
    )
    limiter = getattr(request.app.state, "rate_limiter", None)
    try:
        accepted = await accept(
            context, limiter if isinstance(limiter, RateLimiter) else None, token, call
        )
    finally:
        if call.rate_headers is not None:  # added to the answer by RateLimitHeadersMiddleware
            setattr(request.state, STATE_KEY, call.rate_headers)
    if call.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return accepted
