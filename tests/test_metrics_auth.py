"""Optional bearer authentication of `/metrics` (``LAKEHOUSE_METRICS_AUTH``, scope ``metrics``).

The API's `/metrics` through its app (TestClient), and the metrics port of a real
`lakehouse bridge mqtt --metrics-port` subprocess against a real mosquitto: open
while the setting is off (the default), refused without a token granting
``metrics`` (or ``admin``) while it is on, every refusal logged without the secret.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from structlog.testing import capture_logs

from api.app import create_app
from api.tokens import TokenError, TokenStore, check_scope, hash_token
from config.settings import load_settings
from tests.conftest import Tokens
from tests.helpers import free_port, start_lakehouse, stop, wait_until
from tests.mqtt_broker import MosquittoBroker

READY = "lakehouse_landing_backlog_files "  # a sample every metrics endpoint here serves


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class MetricsTokens:
    """Secrets of the tokens these tests present, beside conftest's."""

    metrics: str
    expired: str
    revoked: str


@pytest.fixture
def metrics_tokens(data_dir: Path, tokens: Tokens) -> MetricsTokens:
    """A ``metrics`` token, an expired and a revoked one (in the same store as ``tokens``)."""
    store = TokenStore(data_dir / "_meta" / "tokens.json")
    metrics = store.create("prometheus", ["metrics"])
    expired = store.create("brief", ["metrics"], expires_in_s=0.2)
    revoked = store.create("late", ["metrics"])
    store.revoke("late")
    time.sleep(0.3)  # "brief" has expired by now
    return MetricsTokens(metrics=metrics, expired=expired, revoked=revoked)


# ------------------------------------------------------------------------- the scope


def test_metrics_is_a_scope_that_admin_grants_and_others_do_not(data_dir: Path) -> None:
    assert check_scope("metrics") == "metrics"
    with pytest.raises(TokenError, match=r"use admin, query, metrics, ingest:\* or"):
        check_scope("metric")
    store = TokenStore(data_dir / "_meta" / "tokens.json")
    store.create("scraper", ["metrics"])
    store.create("root", ["admin"])
    store.create("pipe", ["ingest:*", "query"])
    assert store.get("scraper").allows("metrics")
    assert store.get("root").allows("metrics")
    assert not store.get("pipe").allows("metrics")
    assert not store.get("scraper").allows("query")  # metrics grants nothing else


# ------------------------------------------------------------------------- the API


class LoopProbe(Collector):
    """A collector that records whether it ran on a thread with a running event loop."""

    def __init__(self) -> None:
        self.on_event_loop: list[bool] = []

    def collect(self) -> Iterator[Metric]:
        try:
            asyncio.get_running_loop()
            self.on_event_loop.append(True)
        except RuntimeError:
            self.on_event_loop.append(False)
        yield GaugeMetricFamily("probe_collections", "Times collected.", value=1)


def test_api_metrics_stay_open_while_the_setting_is_off(
    data_dir: Path, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(data_dir=data_dir)
    assert settings.metrics_auth is False  # the default keeps today's behaviour
    client = TestClient(create_app(settings))
    for headers in ({}, bearer("lh_not-a-token"), bearer(tokens.ingest_readings)):
        answer = client.get("/metrics", headers=headers)
        assert answer.status_code == 200, answer.text
        assert READY in answer.text
    assert "security" not in client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    monkeypatch.setenv("LAKEHOUSE_METRICS_AUTH", "true")
    assert load_settings(data_dir=data_dir).metrics_auth is True


def test_api_metrics_require_a_metrics_token_while_the_setting_is_on(
    data_dir: Path, tokens: Tokens, metrics_tokens: MetricsTokens
) -> None:
    probe = LoopProbe()
    settings = load_settings(data_dir=data_dir, metrics_auth=True)
    client = TestClient(create_app(settings, collectors=[probe]))
    refusals = {
        "missing": {},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "unknown": bearer("lh_not-a-token"),
        "expired": bearer(metrics_tokens.expired),
        "revoked": bearer(metrics_tokens.revoked),
    }
    with capture_logs() as logs:
        for case, headers in refusals.items():
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 401, (case, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer", case
            assert answer.json()["error"]["code"] == "unauthorized", case
            assert READY not in answer.text
        assert "revoked" in client.get("/metrics", headers=refusals["revoked"]).text
        forbidden = client.get("/metrics", headers=bearer(tokens.ingest_readings))
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error"] == {
            "code": "forbidden",
            "message": "token 'sensors' lacks scope 'metrics'",
            "scope": "metrics",
        }
        assert client.get("/metrics", headers=bearer(tokens.query)).status_code == 403
        assert probe.on_event_loop == []  # nothing was collected for a refused request
        for token in (metrics_tokens.metrics, tokens.admin):
            answer = client.get("/metrics", headers=bearer(token))
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("text/plain")
            assert READY in answer.text and "probe_collections 1.0" in answer.text
    # Collected in a worker thread, never on the event loop (it lists directories).
    assert probe.on_event_loop == [False, False]
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert {(e["reason"], e["token"]) for e in failed} == {
        ("missing", "unknown"),
        ("invalid", "unknown"),
        ("expired", "brief"),
        ("revoked", "late"),
        ("insufficient_scope", "sensors"),
        ("insufficient_scope", "analyst"),
    }
    assert all(e["path"] == "/metrics" and e["log_level"] == "warning" for e in failed)
    logged = repr(logs)
    for secret in (tokens.ingest_readings, metrics_tokens.expired, metrics_tokens.revoked):
        assert secret not in logged
    # The other routes are untouched, and OpenAPI shows the bearer requirement.
    assert client.get("/health").status_code == 200
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"HTTPBearer": []}]


# --------------------------------------------------------------- a bridge's metrics port


def start_bridge(
    broker: MosquittoBroker, data_dir: Path, work: Path, name: str, **env: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`lakehouse bridge mqtt --metrics-port` on a free port; the process, its metrics
    URL and its log file."""
    config = work / f"{name}.toml"
    config.write_text(f'host = "{broker.host}"\nport = {broker.port}\nclient_id = "{name}"\n')
    port = free_port()
    log = work / f"{name}.log"
    proc = start_lakehouse(
        ["bridge", "mqtt", "--config", str(config), "--metrics-port", str(port)],
        data_dir,
        log,
        **env,
    )
    return proc, f"http://127.0.0.1:{port}/metrics", log


def scrape(
    proc: subprocess.Popen[bytes], log: Path, url: str, headers: dict[str, str]
) -> httpx.Response | None:
    """One GET of ``url``; ``None`` while nothing listens yet."""
    if proc.poll() is not None:
        raise AssertionError(f"the bridge exited early:\n{log.read_text()}")
    try:
        return httpx.get(url, headers=headers, timeout=2)
    except httpx.TransportError:
        return None


def auth_failures(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in map(json.loads, lines) if e.get("event") == "auth.failed"]


def test_bridge_metrics_port_requires_a_metrics_token_only_while_the_setting_is_on(
    broker: MosquittoBroker,
    data_dir: Path,
    tokens: Tokens,
    metrics_tokens: MetricsTokens,
    tmp_path: Path,
) -> None:
    open_dir = tmp_path / "open-dados"  # no tokens at all: the off path never reads them
    open_dir.mkdir()
    open_proc, open_url, open_log = start_bridge(broker, open_dir, tmp_path, "open")
    proc, url, log = start_bridge(
        broker, data_dir, tmp_path, "guarded", LAKEHOUSE_METRICS_AUTH="true"
    )
    try:
        # Off: served to anyone, whatever the Authorization header says.
        for headers in ({}, bearer("lh_not-a-token")):
            answer = wait_until(lambda h=headers: scrape(open_proc, open_log, open_url, h))
            assert answer.status_code == 200 and READY in answer.text, answer.text

        # On: a metrics or an admin token is needed.
        ok = wait_until(lambda: scrape(proc, log, url, bearer(metrics_tokens.metrics)))
        assert ok.status_code == 200, ok.text
        assert READY in ok.text and 'lakehouse_bridge_messages_in_total{bridge="mqtt"}' in ok.text
        admin = httpx.get(url, headers=bearer(tokens.admin), timeout=5)
        assert admin.status_code == 200 and READY in admin.text

        for headers, reason in (
            ({}, None),  # missing: no reason, as the API answers it
            ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
            (bearer("lh_not-a-token"), "invalid"),
            (bearer(metrics_tokens.expired), "expired"),
            (bearer(metrics_tokens.revoked), "revoked"),
        ):
            refused = httpx.get(url, headers=headers, timeout=5)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            error = refused.json()["error"]
            assert error["code"] == "unauthorized" and error.get("reason") == reason, error
            assert READY not in refused.text
        forbidden = httpx.get(url, headers=bearer(tokens.ingest_readings), timeout=5)
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error"]["scope"] == "metrics"

        # Container health checks probe /health: open, and without the metrics.
        health = httpx.get(url.replace("/metrics", "/health"), timeout=5)
        assert health.status_code == 200 and health.text == "ok\n"

        # The token file is re-read: a token created now works without a restart.
        later = TokenStore(data_dir / "_meta" / "tokens.json").create("later", ["metrics"])
        assert httpx.get(url, headers=bearer(later), timeout=5).status_code == 200
        store = TokenStore(data_dir / "_meta" / "tokens.json")
        assert store.get("prometheus").last_used_at is not None  # as the API records it

        failed = wait_until(lambda: (f := auth_failures(log)) and len(f) >= 6 and f)
    finally:
        stop(open_proc)  # SIGTERM: the metrics thread must not keep the bridge from exiting
        stop(proc)
    assert (open_proc.returncode, proc.returncode) == (0, 0), log.read_text()
    assert {(e["reason"], e["token"]) for e in failed} == {
        ("missing", "unknown"),
        ("invalid", "unknown"),
        ("expired", "brief"),
        ("revoked", "late"),
        ("insufficient_scope", "sensors"),
    }, failed
    assert all(
        e["level"] == "warning" and e["path"] == "/metrics" and e["client"] == "127.0.0.1"
        for e in failed
    ), failed
    assert auth_failures(open_log) == []
    text = log.read_text()
    for secret in (tokens.ingest_readings, metrics_tokens.expired, metrics_tokens.revoked):
        assert secret not in text and hash_token(secret) not in text


def test_processor_metrics_port_requires_a_metrics_token_while_the_setting_is_on(
    data_dir: Path, tokens: Tokens, metrics_tokens: MetricsTokens, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "process.log"
    proc = start_lakehouse(
        ["process", "--metrics-port", str(port)], data_dir, log, LAKEHOUSE_METRICS_AUTH="true"
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        ok = wait_until(lambda: scrape(proc, log, url, bearer(metrics_tokens.metrics)))
        assert ok.status_code == 200 and "lakehouse_stage_failures" in ok.text, ok.text
        refused = httpx.get(url, timeout=5)
        assert refused.status_code == 401 and "lakehouse_stage" not in refused.text
        forbidden = httpx.get(url, headers=bearer(tokens.ingest_readings), timeout=5)
        assert forbidden.status_code == 403
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()
