"""``POST /v1/ingest/{source}``: the HTTP writer of the landing zone.

A ``202`` is sent only after the batch's landing file is durable (see
:mod:`landing_zone.writer`); any failure before that answers an error and
leaves nothing visible, so a client that got no ``202`` may safely retry.
"""

from __future__ import annotations

import errno
from functools import partial

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.auth import authenticated, require_scope
from api.context import ApiContext, get_context
from api.errors import ApiError
from api.tokens import TokenRecord
from config.contracts import is_valid_source_name
from landing_zone.formats import (
    BatchTooLarge,
    MalformedBatch,
    UnsupportedFormat,
    decode_batch,
    format_for_content_type,
    gunzip,
)
from landing_zone.writer import LandingWriteError

router = APIRouter(tags=["ingest"])


class IngestAccepted(BaseModel):
    """The batch is durable in the landing zone and will reach silver and gold."""

    batch_id: str
    source: str
    records: int


def _decoded_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    raise ApiError(
        415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}; use gzip"
    )


@router.post(
    # ":path" lets encoded slashes reach the name check (400) instead of missing the route.
    "/v1/ingest/{source:path}",
    status_code=202,
    response_model=IngestAccepted,
    responses={
        400: {"description": "Malformed body (the message names the line or record)"},
        401: {"description": "Missing or invalid bearer token"},
        403: {"description": "Token lacks ingest:<source>"},
        404: {"description": "Unknown source"},
        413: {"description": "Body larger than the configured limit"},
        415: {"description": "Unsupported Content-Type or Content-Encoding"},
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
    token: TokenRecord = Depends(authenticated),
    context: ApiContext = Depends(get_context),
) -> IngestAccepted:
    """Accept a batch of records for ``source`` (JSON, NDJSON, CSV or Parquet; gzip allowed)."""
    if not is_valid_source_name(source):
        raise ApiError(
            400,
            "invalid_source_name",
            "source names are 1-63 lowercase letters, digits or '_', starting with a letter",
        )
    require_scope(token, f"ingest:{source}")
    if source not in context.contracts and not context.settings.auto_create_sources:
        raise ApiError(
            404,
            "unknown_source",
            f"unknown source {source!r} (declare a contract, or set "
            "LAKEHOUSE_AUTO_CREATE_SOURCES=true to land undeclared sources in bronze)",
            source=source,
        )
    limit = context.settings.max_body_bytes
    try:
        fmt = format_for_content_type(request.headers.get("content-type"))
        raw_body = await request.body()  # size capped by BodyLimitMiddleware
        body = _decoded_body(raw_body, request.headers.get("content-encoding", ""), limit)
        frame = await run_in_threadpool(decode_batch, body, fmt)
    except UnsupportedFormat as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None
    except BatchTooLarge as exc:
        raise ApiError(413, "body_too_large", str(exc)) from None
    except MalformedBatch as exc:
        raise ApiError(400, "malformed_body", str(exc), line=exc.line, record=exc.record) from None
    if frame.height == 0:
        raise ApiError(400, "empty_batch", "the body holds no records")
    try:
        receipt = await run_in_threadpool(
            partial(
                context.writer.write_frame,
                source,
                frame,
                correlation_id=getattr(request.state, "correlation_id", None),
            )
        )
    except LandingWriteError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(
                507,
                "insufficient_storage",
                "landing zone is out of space; retry later",
                headers={"Retry-After": "30"},
            ) from None
        raise ApiError(
            503,
            "landing_unavailable",
            "landing zone is not writable; retry later",
            headers={"Retry-After": "5"},
        ) from None
    context.metrics.ingested_batches.labels(source).inc()
    context.metrics.ingested_records.labels(source).inc(receipt.records)
    context.metrics.ingested_bytes.labels(source).inc(len(raw_body))
    return IngestAccepted(batch_id=receipt.batch_id, source=source, records=receipt.records)
