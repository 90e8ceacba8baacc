"""``POST /v1/ingest/{source}``: the HTTP writer of the landing zone.

A ``202`` is sent only after the batch's landing file is durable (see
:mod:`landing_zone.writer`); any failure before that answers an error and
leaves nothing visible, so a client that got no ``202`` may safely retry.

Small bodies (up to ``LAKEHOUSE_GROUP_COMMIT_MAX_BODY_BYTES``) are group-committed
(:mod:`landing_zone.group_commit`): several requests share one landing file and
its fsync; each learns the file's ``batch_id`` and its ``first_record`` in it.
With an ``Idempotency-Key`` (:mod:`landing_zone.idempotency`) a retry returns the
first answer and lands nothing; such a request is written alone, never grouped.
While the landing zone is over its back-pressure bounds
(:mod:`landing_zone.backpressure`) requests are refused with ``503``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial

import polars as pl
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import authenticated, require_scope
from api.context import ApiContext, get_context
from api.errors import ApiError
from api.rate_limit import enforce_ingest_rate
from api.tokens import TokenRecord
from config.contracts import is_valid_source_name
from landing_zone.formats import (
    SMALL_JSON_BYTES,
    BatchTooLarge,
    MalformedBatch,
    UnsupportedFormat,
    decode_batch,
    format_for_content_type,
    gunzip,
)
from landing_zone.idempotency import ReservationLost
from landing_zone.writer import LandingWriteError

router = APIRouter(tags=["ingest"])

IDEMPOTENCY_HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII


class IngestAccepted(BaseModel):
    """The batch is durable in the landing zone and will reach silver and gold."""

    batch_id: str = Field(description="The landing file holding the records.")
    source: str
    records: int
    first_record: int = Field(
        default=0,
        description="Position (0-based) of the first of these records in the landing file "
        "(a group-committed file holds several requests in arrival order).",
    )


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
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 printable ASCII characters",
        )
    await _check_backpressure(context)
    limit = context.settings.max_body_bytes
    try:
        fmt = format_for_content_type(request.headers.get("content-type"))
        raw_body = await request.body()  # size capped by BodyLimitMiddleware
        body = _decoded_body(raw_body, request.headers.get("content-encoding", ""), limit)
        if len(body) <= SMALL_JSON_BYTES:  # ~0.1 ms: cheaper inline than a thread hop
            frame = decode_batch(body, fmt)
        else:
            frame = await run_in_threadpool(decode_batch, body, fmt)
    except UnsupportedFormat as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None
    except BatchTooLarge as exc:
        raise ApiError(413, "body_too_large", str(exc)) from None
    except MalformedBatch as exc:
        raise ApiError(400, "malformed_body", str(exc), line=exc.line, record=exc.record) from None
    if frame.height == 0:
        raise ApiError(400, "empty_batch", "the body holds no records")
    correlation_id = getattr(request.state, "correlation_id", None)

    def charge() -> Awaitable[None]:
        return enforce_ingest_rate(request, token, source, rows=frame.height, nbytes=len(body))

    try:
        if idempotency_key is not None:
            # Charged only when it is written: a replay answers what was already paid for.
            accepted, replayed = await _idempotent_write(
                context, token, source, idempotency_key, fmt, body, frame, correlation_id, charge
            )
            if replayed:
                response.headers[REPLAYED_HEADER] = "true"
                return accepted
        else:
            await charge()
            accepted = await _write(context, source, frame, len(body), correlation_id)
    except LandingWriteError as exc:
        raise _write_error(exc) from None
    context.metrics.ingested_batches.labels(source).inc()
    context.metrics.ingested_records.labels(source).inc(accepted.records)
    context.metrics.ingested_bytes.labels(source).inc(len(raw_body))
    return accepted


async def _write(
    context: ApiContext, source: str, frame: pl.DataFrame, size: int, correlation_id: str | None
) -> IngestAccepted:
    """Land ``frame``: group-committed with other small bodies, or in a file of its own."""
    if context.group_commit is not None and size <= context.settings.group_commit_max_body_bytes:
        grouped = await context.group_commit.submit(source, frame, correlation_id, size)
        return IngestAccepted(
            batch_id=grouped.batch_id,
            source=source,
            records=grouped.records,
            first_record=grouped.first_record,
        )
    receipt = await run_in_threadpool(
        partial(context.writer.write_frame, source, frame, correlation_id=correlation_id)
    )
    return IngestAccepted(batch_id=receipt.batch_id, source=source, records=receipt.records)


def _write_error(exc: LandingWriteError) -> ApiError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(
            507,
            "insufficient_storage",
            "landing zone is out of space; retry later",
            headers={"Retry-After": "30"},
        )
    return ApiError(
        503,
        "landing_unavailable",
        "landing zone is not writable; retry later",
        headers={"Retry-After": "5"},
    )


async def _check_backpressure(context: ApiContext) -> None:
    """503 with Retry-After while the landing zone is over a configured bound.

    The measurement is cached (see :class:`landing_zone.backpressure.BackpressureGate`);
    only one request at a time re-measures, in a worker thread.
    """
    gate = context.backpressure
    if gate is None or not gate.enabled:
        return
    pressure = gate.cached() or gate.stale_but_busy()
    if pressure is None:
        try:
            pressure = await run_in_threadpool(gate.measure)
        except BaseException:
            gate.measurement_abandoned()  # cancelled before it ran: let another measure
            raise
    refusal = gate.refusal(pressure)
    if refusal is not None:
        raise ApiError(
            503,
            refusal.code,
            refusal.message,
            headers={"Retry-After": str(refusal.retry_after_s)},
        )


async def _idempotent_write(
    context: ApiContext,
    token: TokenRecord,
    source: str,
    key: str,
    fmt: str,
    body: bytes,
    frame: pl.DataFrame,
    correlation_id: str | None,
    charge: Callable[[], Awaitable[None]],
) -> tuple[IngestAccepted, bool]:
    """Write ``frame`` at most once per (token, source, key); ``(answer, replayed)``.

    A racing request with the same key waits for the one that reserved it and returns
    its answer; a reservation whose writer died is completed or taken over (see
    :mod:`landing_zone.idempotency`). Written alone (never group-committed).
    """
    store = context.idempotency
    if store is None:
        raise ApiError(503, "idempotency_unavailable", "idempotency keys are not available")
    digest = hashlib.sha256(fmt.encode() + b"\0" + body).hexdigest()
    principal = token.name
    deadline = time.monotonic() + 2 * store.lease_s
    delay = 0.002
    while True:
        outcome = await run_in_threadpool(
            store.reserve, principal, source, key, digest, frame.height
        )
        if outcome.status == "conflict":
            raise ApiError(
                409,
                "idempotency_key_reused",
                f"Idempotency-Key {key!r} was already used for a different request body "
                f"(batch {outcome.batch_id}); send new data under a new key",
                batch_id=outcome.batch_id,
            )
        answer = IngestAccepted(batch_id=outcome.batch_id, source=source, records=outcome.records)
        if outcome.status == "done":
            return answer, True
        if outcome.status == "pending":
            if time.monotonic() > deadline:
                raise ApiError(
                    503,
                    "idempotency_key_busy",
                    f"a request with Idempotency-Key {key!r} is still being written; retry",
                    headers={"Retry-After": "5"},
                )
            await asyncio.sleep(delay)  # the winner is writing: answer as it will
            delay = min(delay * 2, 0.05)
            continue
        guard = store.publish_guard(principal, source, key, outcome.owner)
        try:
            await charge()  # 429 releases the key: a later retry writes
            await run_in_threadpool(
                partial(
                    context.writer.write_frame,
                    source,
                    frame,
                    batch_id=outcome.batch_id,
                    correlation_id=correlation_id,
                    publish_guard=guard,
                )
            )
        except ReservationLost:
            continue  # taken over while we stalled: answer as the new owner does
        except BaseException:
            await run_in_threadpool(store.release, principal, source, key, outcome.owner)
            raise
        return answer, False
