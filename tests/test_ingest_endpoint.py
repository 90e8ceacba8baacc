"""The lean ingest endpoint answers exactly as the FastAPI route behind it would.

Two apps over two data directories holding the same tokens receive the same
requests, one through :class:`api.app.LakehouseApp` (the lean endpoint) and one
through FastAPI alone (the declared route, its middlewares and error handlers);
every answer must match: status, headers in order, and body (batch ids aside).
"""

from __future__ import annotations

import gzip
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from api.app import LakehouseApp, create_app
from api.tokens import TokenStore
from config.settings import load_settings

RECORD = b'{"ts":"2026-11-20T00:00:00Z","device_id":"d1","sensor":"temp","value":1.5}\n'
LIMIT = 64 * 1024
BATCH_ID = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{12}")


def _fastapi_only(app: LakehouseApp) -> Callable[[Scope, Receive, Send], Any]:
    """The app without the lean dispatch: every request goes through FastAPI."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    return asgi


def _answer(response: Any) -> tuple[int, list[tuple[str, str]], str]:
    headers = [
        (name, BATCH_ID.sub("<batch>", value))
        for name, value in response.headers.multi_items()
        if name not in ("date", "x-correlation-id")
    ]
    assert response.headers.get("x-correlation-id")
    return response.status_code, headers, BATCH_ID.sub("<batch>", response.text)


@pytest.fixture
def clients(tmp_path: Path) -> tuple[TestClient, TestClient, dict[str, str]]:
    dirs = [tmp_path / "lean", tmp_path / "routed"]
    store = TokenStore(dirs[0] / "_meta" / "tokens.json")
    secrets = {
        "good": store.create("sensors", ["ingest:readings"]),
        "all": store.create("all", ["ingest:*"]),
        "other": store.create("other", ["ingest:other"]),
        "slow": store.create("slow", ["ingest:readings"], rate_rows_per_s=0.5),
        "gone": store.create("gone", ["ingest:readings"]),
    }
    store.revoke("gone")
    (dirs[1] / "_meta").mkdir(parents=True)
    shutil.copy(store.path, dirs[1] / "_meta" / "tokens.json")
    apps = [create_app(load_settings(data_dir=d, max_body_bytes=LIMIT)) for d in dirs]
    return (
        TestClient(apps[0], raise_server_exceptions=False),
        TestClient(_fastapi_only(apps[1]), raise_server_exceptions=False),
        secrets,
    )


def test_every_answer_matches_the_fastapi_route(
    clients: tuple[TestClient, TestClient, dict[str, str]],
) -> None:
    lean, routed, secret = clients

    def auth(name: str, content_type: str = "application/x-ndjson", **more: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret[name]}", "Content-Type": content_type, **more}

    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("/v1/ingest/readings", "POST", RECORD, auth("good", **{"X-Correlation-ID": "r-1"})),
        ("/v1/ingest/readings", "POST", RECORD * 200, auth("good")),
        (
            "/v1/ingest/readings",
            "POST",
            b'[{"a":1},{"a":2.5,"b":[1]}]',
            auth("good", "application/json"),
        ),
        ("/v1/ingest/readings", "POST", b"a,b\n1,2\n", auth("good", "text/csv")),
        (
            "/v1/ingest/readings",
            "POST",
            gzip.compress(RECORD * 3),
            auth("good", **{"Content-Encoding": "gzip"}),
        ),
        ("/v1/ingest/readings", "POST", RECORD, {"Content-Type": "application/x-ndjson"}),
        ("/v1/ingest/readings", "POST", RECORD, {"Authorization": "Basic abc"}),
        ("/v1/ingest/readings", "POST", RECORD, {"Authorization": f"bearer  {secret['good']} "}),
        ("/v1/ingest/readings", "POST", RECORD, auth("gone")),
        ("/v1/ingest/readings", "POST", RECORD, {"Authorization": "Bearer lh_nope"}),
        ("/v1/ingest/readings", "POST", RECORD, auth("other")),
        ("/v1/ingest/Bad-Name", "POST", RECORD, auth("good")),
        ("/v1/ingest/a%2Fb", "POST", RECORD, auth("good")),
        ("/v1/ingest/", "POST", RECORD, auth("good")),
        ("/v1/ingest/nosuch", "POST", RECORD, auth("all")),
        ("/v1/ingest/readings", "POST", RECORD, auth("good", **{"Idempotency-Key": "a\tb"})),
        ("/v1/ingest/readings", "POST", RECORD, auth("good", "text/plain")),
        ("/v1/ingest/readings", "POST", RECORD, {"Authorization": f"Bearer {secret['good']}"}),
        ("/v1/ingest/readings", "POST", RECORD, auth("good", **{"Content-Encoding": "br"})),
        ("/v1/ingest/readings", "POST", b"notgzip", auth("good", **{"Content-Encoding": "gzip"})),
        ("/v1/ingest/readings", "POST", RECORD + b'{"a":\n', auth("good")),
        ("/v1/ingest/readings", "POST", b"", auth("good")),
        ("/v1/ingest/readings", "POST", b"{}", auth("good", "application/json")),
        ("/v1/ingest/readings", "POST", b"[]", auth("good", "application/json")),
        ("/v1/ingest/readings", "POST", b"[1,2]", auth("good", "application/json")),
        ("/v1/ingest/readings", "POST", b"x" * (LIMIT + 1), auth("good")),
        ("/v1/ingest/readings", "POST", b"x" * (LIMIT + 1), {}),
        (
            "/v1/ingest/readings",
            "POST",
            gzip.compress(b" " * 2 * LIMIT),
            auth("good", **{"Content-Encoding": "gzip"}),
        ),
        ("/v1/ingest/readings", "POST", RECORD, auth("good", **{"Idempotency-Key": "k1"})),
        ("/v1/ingest/readings", "POST", RECORD, auth("good", **{"Idempotency-Key": "k1"})),
        ("/v1/ingest/readings", "POST", RECORD * 2, auth("good", **{"Idempotency-Key": "k1"})),
        ("/v1/ingest/readings", "POST", RECORD * 3, auth("slow")),
        ("/v1/ingest/readings", "POST", RECORD * 3, auth("slow")),
        ("/v1/ingest/readings", "POST", RECORD * 6, auth("slow")),
        ("/v1/ingest/readings", "POST", RECORD, auth("slow", **{"Idempotency-Key": "k1"})),
        ("/v1/ingest/readings", "POST", b'{"a\\u0000b":1,"":2}', auth("good", "application/json")),
        ("/v1/ingest/readings", "GET", b"", auth("good")),
    ]
    for path, method, body, headers in cases:
        ours = _answer(lean.request(method, path, content=body, headers=headers))
        theirs = _answer(routed.request(method, path, content=body, headers=headers))
        assert ours == theirs, (path, method, body[:60], headers)
