"""Request body caps applied before any route runs (and so before authentication).

FastAPI reads a JSON body before it resolves a route's dependencies; without
this, an anonymous client could make the server buffer any amount of data.
Ingest bodies get the configured limit; every other route gets a small one.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OTHER_ROUTES_MAX_BYTES = 1024 * 1024
INGEST_PREFIX = "/v1/ingest/"


class BodyLimitMiddleware:
    """Answer 413 as soon as a body is known to exceed its route's limit."""

    def __init__(self, app: ASGIApp, ingest_max_bytes: int) -> None:
        self.app = app
        self.ingest_max_bytes = ingest_max_bytes

    def limit_for(self, path: str) -> int:
        """The body limit of a request path."""
        return self.ingest_max_bytes if path.startswith(INGEST_PREFIX) else OTHER_ROUTES_MAX_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await reject_too_large(send, limit)
            return
        received = 0
        started = rejected = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not started:
                    # Answer now; the app sees a disconnect and stops reading.
                    rejected = True
                    await reject_too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is already sent; drop whatever the app answers
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


async def reject_too_large(send: Send, limit: int) -> None:
    """Answer 413 for a body over ``limit`` bytes (and close the connection)."""
    body = json.dumps(
        {
            "error": {
                "code": "body_too_large",
                "message": f"request body exceeds the limit of {limit} bytes",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
