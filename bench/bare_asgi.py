"""Baseline server for the API benchmark: the ceiling of HTTP plus durable disk here.

A raw ASGI callable with no framework, no auth and no parsing: it reads the
request body, writes it to a new file, fsyncs the file and its directory (a new
file is durable only once its directory entry is), and answers ``202``. Served
by uvicorn exactly like ``lakehouse api`` (same event loop and HTTP parser)::

    BENCH_BARE_DIR=/tmp/out python -m uvicorn bench.bare_asgi:app --port 8001

Files go to ``$BENCH_BARE_DIR`` (a fresh temporary directory if unset).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OUT_DIR = os.environ.get("BENCH_BARE_DIR") or tempfile.mkdtemp(prefix="bare-asgi-")
_names = itertools.count()
_BODY = b'{"accepted":true}'
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BODY)).encode()),
]


def _write_durably(body: bytes) -> None:
    path = os.path.join(OUT_DIR, f"{os.getpid()}-{next(_names)}.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(OUT_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Store every POST body durably; answer everything else with 200 (health probes)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    status = 200
    if scope["method"] == "POST":
        # Blocking on purpose, like a single fsync-per-request writer on the event loop;
        # the lakehouse API does its write in a thread pool instead.
        _write_durably(b"".join(chunks))
        status = 202
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
