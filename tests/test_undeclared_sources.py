"""Sources without a contract: accepted when configured, silver declared later."""

from __future__ import annotations

from pathlib import Path

import httpx
import polars as pl

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from tests.conftest import Tokens
from tests.helpers import free_port, start_lakehouse, stop, wait_healthy

EVENTS = """
name = "events"
keys = ["id"]
event_time = "at"

[[fields]]
name = "id"
type = "int"

[[fields]]
name = "at"
type = "timestamp"
required = true
"""


def test_undeclared_source_lands_in_bronze_and_silver_follows_its_contract(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "api.log"
    proc = start_lakehouse(["api", "--port", str(port)], data_dir, log,
                           LAKEHOUSE_AUTO_CREATE_SOURCES="true")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {tokens.ingest_all}"}
        )
        body = b'{"id": 1, "at": "2026-11-20T10:00:00Z", "kind": "click"}\n{"id": 2, "at": "x"}\n'
        sent = client.post("/v1/ingest/events", content=body,
                           headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert sent.status_code == 202 and sent.json()["records"] == 2
    finally:
        stop(proc)
    settings = load_settings(data_dir=data_dir)
    Processor(settings, load_contracts()).run_once()
    bronze = pl.read_delta(str(data_dir / "bronze" / "events"))
    assert bronze.select("id", "kind").rows() == [("1", "click"), ("2", None)]
    assert not (data_dir / "silver" / "events").exists()

    contracts = tmp_path / "contracts"
    contracts.mkdir()
    (contracts / "events.toml").write_text(EVENTS)
    Processor(settings, load_contracts(contracts)).run_once()
    silver = pl.read_delta(str(data_dir / "silver" / "events"))
    assert silver.select("id", "_rescued_data").rows() == [(1, '{"kind":"click"}')]
    reasons = pl.read_delta(str(data_dir / "quarantine" / "events"))["_reason"].to_list()
    assert reasons == ["at: cannot parse 'x' as timestamp"]


def test_without_the_setting_undeclared_sources_are_404(live_api, tokens: Tokens) -> None:
    with live_api.client(tokens.ingest_all) as client:
        response = client.post("/v1/ingest/events", content=b'{"a": 1}',
                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 404
        assert "LAKEHOUSE_AUTO_CREATE_SOURCES" in response.json()["error"]["message"]
