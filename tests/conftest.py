from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.tokens import TokenStore
from config.settings import Settings, load_settings
from tests.helpers import free_port, start_lakehouse, stop, wait_healthy
from tests.mqtt_broker import MOSQUITTO, MosquittoBroker


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "dados"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return load_settings(
        data_dir=data_dir, trigger_latency_ms=0, rescan_interval_s=0.5, file_settle_ms=0
    )


@dataclass(frozen=True)
class Tokens:
    admin: str
    ingest_readings: str
    ingest_all: str
    query: str
    ingest_other: str


@pytest.fixture
def tokens(settings: Settings) -> Tokens:
    store = TokenStore(settings.tokens_file)
    return Tokens(
        admin=store.create("admin", ["admin"]),
        ingest_readings=store.create("sensors", ["ingest:readings"]),
        ingest_all=store.create("all-ingest", ["ingest:*"]),
        query=store.create("analyst", ["query"]),
        ingest_other=store.create("other", ["ingest:other"]),
    )


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    data_dir: Path
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture
def live_api(data_dir: Path, tokens: Tokens, tmp_path: Path) -> Iterator[LiveServer]:
    """`lakehouse api` (real uvicorn) on a free loopback port."""
    port = free_port()
    log = tmp_path / "api.log"
    proc = start_lakehouse(
        ["api", "--host", "127.0.0.1", "--port", str(port)],
        data_dir,
        log,
        LAKEHOUSE_MAX_BODY_BYTES=str(1024 * 1024),
    )
    server = LiveServer(f"http://127.0.0.1:{port}", data_dir, log)
    try:
        wait_healthy(server.base_url, proc, log)
        yield server
    finally:
        stop(proc)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto of the test's own on a free loopback port (the MQTT tests' broker;
    the Kafka tests define their own ``broker``, a tansu)."""
    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed")
    server = MosquittoBroker(tmp_path / "broker")
    server.start()
    try:
        yield server
    finally:
        server.stop()
