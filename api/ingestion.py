"""What accepting one ``POST /v1/ingest/{source}`` takes, whichever way the request arrived.

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

Both the lean ASGI endpoint that serves ingestion (:mod:`api.ingest_endpoint`) and
the FastAPI route that documents it (:mod:`api.ingest`) call :func:`accept`, after
authenticating the caller; every refusal is an :class:`api.errors.ApiError`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeAlias

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import require_scope
from api.context import ApiContext
from api.errors import ApiError
from api.rate_limit import RateLimiter, charge_ingest, refuse_if_limited
from api.tokens import TokenRecord
from config.contracts import is_valid_source_name
from landing_zone.formats import (
    SMALL_JSON_BYTES,
    BatchFormat,
    BatchTooLarge,
    MalformedBatch,
    RawRecord,
    UnsupportedFormat,
    decode_for_landing,
    decode_small,
    format_for_content_type,
    gunzip,
    raw_table,
)
from landing_zone.idempotency import ReservationLost
from landing_zone.writer import LandingWriteError

ROUTE = "/v1/ingest/{source:path}"  # the route template (metrics and access log label)
REPLAYED_HEADER = "Idempotent-Replayed"
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII

# A decoded request body: a raw frame, a raw Arrow table (large NDJSON), or the raw
# records of a small one.
Batch: TypeAlias = pl.DataFrame | pa.Table | list[RawRecord]


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


@dataclass
class IngestRequest:
    """One ingest request as :func:`accept` needs it (header values as sent, or ``None``)."""

    source: str
    content_type: str | None
    content_encoding: str | None
    idempotency_key: str | None
    client: str
    correlation_id: str | None
    read_body: Callable[[], Awaitable[bytes]]  # the body as sent (its size already capped)
    # Set by accept(): the X-RateLimit-* headers every answer from the rate check on
    # carries, and whether the answer replays an earlier request's (Idempotent-Replayed).
    rate_headers: dict[str, str] | None = None
    replayed: bool = False


async def accept(
    context: ApiContext,
    limiter: RateLimiter | None,
    token: TokenRecord,
    request: IngestRequest,
) -> IngestAccepted:
    """Land the batch of ``request`` (``token`` is already authenticated) and say where.

    Raises :class:`ApiError` for every refusal, in this order: source name (400),
    scope (403), unknown source (404), Idempotency-Key (400), back-pressure (503),
    media type and encoding (415), body (400, 413), rate limit (429, 413), write (503, 507).
    """
    source = request.source
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
    key = request.idempotency_key
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 printable ASCII characters",
        )
    await _check_backpressure(context)
    limit = context.settings.max_body_bytes
    try:
        fmt = format_for_content_type(request.content_type)
        raw_body = await request.read_body()
        body = _decoded_body(raw_body, request.content_encoding or "", limit)
        batch = await _decoded(body, fmt)
    except UnsupportedFormat as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None
    except BatchTooLarge as exc:
        raise ApiError(413, "body_too_large", str(exc)) from None
    except MalformedBatch as exc:
        raise ApiError(400, "malformed_body", str(exc), line=exc.line, record=exc.record) from None
    rows = len(batch)
    if rows == 0:
        raise ApiError(400, "empty_batch", "the body holds no records")

    async def charge() -> None:
        decision = await charge_ingest(limiter, token, source, rows=rows, nbytes=len(body))
        if decision is not None:
            request.rate_headers = decision.headers
        refuse_if_limited(
            decision, token, source, rows=rows, nbytes=len(body), client=request.client
        )

    try:
        if key is not None:
            # Charged only when it is written: a replay answers what was already paid for.
            accepted, request.replayed = await _idempotent_write(
                context, token, request, key, fmt, body, batch, charge
            )
        else:
            await charge()
            accepted = await _write(context, source, batch, len(body), request.correlation_id)
    except LandingWriteError as exc:
        raise _write_error(exc) from None
    if not request.replayed:
        context.metrics.ingested_batches.labels(source).inc()
        context.metrics.ingested_records.labels(source).inc(accepted.records)
        context.metrics.ingested_bytes.labels(source).inc(len(raw_body))
    return accepted


async def _decoded(body: bytes, fmt: BatchFormat) -> Batch:
    """The records of ``body``: small ones inline (cheaper than a thread hop), others in
    a worker thread."""
    if len(body) > SMALL_JSON_BYTES:
        return await run_in_threadpool(decode_for_landing, body, fmt)
    decoded = decode_small(body, fmt)  # a single reading: no frame needed
    return [decoded] if isinstance(decoded, dict) else decoded


def _table(batch: Batch) -> pl.DataFrame | pa.Table:
    """What the landing writer takes: the frame or table, or a table of the raw records."""
    return raw_table(batch) if isinstance(batch, list) else batch


def _decoded_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    raise ApiError(
        415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}; use gzip"
    )


async def _write(
    context: ApiContext, source: str, batch: Batch, size: int, correlation_id: str | None
) -> IngestAccepted:
    """Land ``batch``: group-committed with other small bodies, or in a file of its own."""
    if context.group_commit is not None and size <= context.settings.group_commit_max_body_bytes:
        grouped = await context.group_commit.submit(source, batch, correlation_id, size)
        return IngestAccepted(
            batch_id=grouped.batch_id,
            source=source,
            records=grouped.records,
            first_record=grouped.first_record,
        )
    receipt = await run_in_threadpool(
        partial(context.writer.write_frame, source, _table(batch), correlation_id=correlation_id)
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
    request: IngestRequest,
    key: str,
    fmt: str,
    body: bytes,
    batch: Batch,
    charge: Callable[[], Awaitable[None]],
) -> tuple[IngestAccepted, bool]:
    """Write ``batch`` at most once per (token, source, key); ``(answer, replayed)``.

    A racing request with the same key waits for the one that reserved it and returns
    its answer; a reservation whose writer died is completed or taken over (see
    :mod:`landing_zone.idempotency`). Written alone (never group-committed).
    """
    store = context.idempotency
    if store is None:
        raise ApiError(503, "idempotency_unavailable", "idempotency keys are not available")
    source = request.source
    if len(body) > SMALL_JSON_BYTES:  # hashing a large body takes milliseconds
        digest = await run_in_threadpool(_body_digest, fmt, body)
    else:
        digest = _body_digest(fmt, body)
    rows = len(batch)
    principal = token.name
    deadline = time.monotonic() + 2 * store.lease_s
    delay = 0.002
    while True:
        outcome = await run_in_threadpool(store.reserve, principal, source, key, digest, rows)
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
                    _table(batch),
                    batch_id=outcome.batch_id,
                    correlation_id=request.correlation_id,
                    publish_guard=guard,
                )
            )
        except ReservationLost:
            continue  # taken over while we stalled: answer as the new owner does
        except BaseException:
            await run_in_threadpool(store.release, principal, source, key, outcome.owner)
            raise
        return answer, False


def _body_digest(fmt: str, body: bytes) -> str:
    digest = hashlib.sha256(fmt.encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()
