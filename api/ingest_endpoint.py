"""``POST /v1/ingest/{source}`` as a lean ASGI endpoint: the hot path of HTTP ingestion.

The FastAPI stack (middlewares, routing, dependency injection, request and response
objects) costs several times what the rest of a small durable request does, so
:class:`api.app.LakehouseApp` hands ingest requests to this endpoint before that
stack. It does for them exactly what the stack does, in one pass:

- a correlation id, the access-log line and the request metrics (as
  :class:`api.observability.ObservabilityMiddleware`);
- the body limit: ``413`` before anything else for a declared ``Content-Length``
  over it, or as soon as a streamed body passes it (as
  :class:`api.body_limit.BodyLimitMiddleware`);
- bearer authentication with the same ``401`` and ``auth.failed`` log lines
  (:func:`api.auth.token_of`), then :func:`api.ingestion.accept`;
- answers shaped as FastAPI shapes them: the ``202`` body of
  :class:`api.ingestion.IngestAccepted`, errors as :mod:`api.errors` renders them,
  ``X-RateLimit-*`` from the rate check on, ``Idempotent-Replayed``, and a ``500``
  (re-raised for the server to log) if something unexpected breaks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import structlog
from starlette.types import Message, Receive, Scope, Send

from api.auth import bearer_secret, token_of
from api.body_limit import INGEST_PREFIX, reject_too_large
from api.context import ApiContext
from api.errors import ApiError, error_body
from api.ingestion import ROUTE, IngestRequest, accept
from api.observability import HEADER as CORRELATION_HEADER
from api.observability import UNMATCHED, correlation_id, observe
from api.rate_limit import RateLimiter

Headers = list[tuple[bytes, bytes]]

# The request headers the endpoint reads (ASGI servers lowercase the names).
_WANTED = frozenset(
    {
        b"authorization",
        b"content-encoding",
        b"content-length",
        b"content-type",
        b"idempotency-key",
        CORRELATION_HEADER.encode(),
    }
)
_JSON = (b"content-type", b"application/json")
_REPLAYED = (b"idempotent-replayed", b"true")
_SERVER_ERROR = b"Internal Server Error"


class _Answered(Exception):
    """The endpoint already sent its whole answer (a ``413`` for a streamed body)."""


class _ClientGone(Exception):
    """The client disconnected before its body ended: there is no one to answer."""


class IngestEndpoint:
    """Answers ``POST /v1/ingest/{source}`` (see the module docstring)."""

    def __init__(self, context: ApiContext, limiter: RateLimiter | None) -> None:
        self._context = context
        self._limiter = limiter
        self._limit = context.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send, route_path: str) -> None:
        """Answer one ingest request; ``route_path`` is its path without any root path."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _WANTED and name not in headers:  # the first, as Starlette reads them
                headers[name] = value
        cid = correlation_id(_text(headers.get(CORRELATION_HEADER.encode())))
        started = time.perf_counter()
        status = 500  # if nothing is answered
        route = UNMATCHED
        sent = False
        rate_headers: dict[str, str] | None = None

        async def respond(code: int, body: bytes, before: Headers, after: Headers) -> None:
            # Header order as Starlette's JSONResponse: its own headers, then length and
            # type, then (FastAPI) those of the route's response; then the middlewares'.
            nonlocal status, sent
            head = [*before, (b"content-length", str(len(body)).encode()), _JSON, *after]
            if rate_headers:
                head += [(k.lower().encode(), v.encode()) for k, v in rate_headers.items()]
            head.append((CORRELATION_HEADER.encode(), cid.encode()))
            status, sent = code, True
            await send({"type": "http.response.start", "status": code, "headers": head})
            await send({"type": "http.response.body", "body": body})

        # Bound for every log line of the request (bind/reset: several times cheaper than
        # structlog's bound_contextvars context manager).
        bound = structlog.contextvars.bind_contextvars(correlation_id=cid)
        try:
            try:
                declared = headers.get(b"content-length", b"")
                if declared.isdigit() and int(declared) > self._limit:
                    await reject_too_large(self._send_with_id(send, cid), self._limit)
                    status, sent = 413, True
                    return
                route = ROUTE
                client = scope.get("client")
                host = client[0] if client else "unknown"
                request = IngestRequest(
                    source=route_path[len(INGEST_PREFIX) :],
                    content_type=_text(headers.get(b"content-type")),
                    content_encoding=_text(headers.get(b"content-encoding")),
                    idempotency_key=_text(headers.get(b"idempotency-key")),
                    client=host,
                    correlation_id=cid,
                    read_body=self._body_reader(receive, send, cid),
                )
                try:
                    token = await token_of(
                        bearer_secret(_text(headers.get(b"authorization"))),
                        self._context.tokens,
                        host,
                        _url_path(scope["path"]),
                    )
                    accepted = await accept(self._context, self._limiter, token, request)
                except ApiError as exc:
                    rate_headers = request.rate_headers
                    await respond(exc.status, *_rendered(exc), [])
                    return
                rate_headers = request.rate_headers
                await respond(
                    202,
                    accepted.model_dump_json().encode(),
                    [],
                    [_REPLAYED] if request.replayed else [],
                )
            except _Answered:
                status = 413
            except _ClientGone:
                pass  # logged with status 500, as the FastAPI stack logs it
            except Exception:
                if not sent:
                    await _server_error(send)
                raise  # for the server to log
            finally:
                observe(self._context.metrics, scope, route, status, started)
        finally:
            structlog.contextvars.reset_contextvars(**bound)

    def _body_reader(
        self, receive: Receive, send: Send, cid: str
    ) -> Callable[[], Awaitable[bytes]]:
        """Reads the whole body, answering ``413`` (and ending the request) past the limit."""
        limit = self._limit

        async def read() -> bytes:
            chunks: list[bytes] = []
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    await reject_too_large(self._send_with_id(send, cid), limit)
                    raise _Answered
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        return read

    @staticmethod
    def _send_with_id(send: Send, cid: str) -> Send:
        """``send`` adding the correlation id to the answer's headers."""

        async def sender(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (CORRELATION_HEADER.encode(), cid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        return sender


def _rendered(exc: ApiError) -> tuple[bytes, Headers]:
    """The body and headers :func:`api.errors.install_error_handlers` answers ``exc`` with."""
    body = json.dumps(
        error_body(exc.code, exc.message, **exc.details),
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    ).encode()
    return body, [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]


async def _server_error(send: Send) -> None:
    """The ``500`` Starlette's ServerErrorMiddleware answers."""
    headers = [
        (b"content-length", str(len(_SERVER_ERROR)).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": _SERVER_ERROR})


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _url_path(path: str) -> str:
    """``path`` as ``starlette.requests.Request.url.path`` spells it (auth log lines)."""
    return path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
