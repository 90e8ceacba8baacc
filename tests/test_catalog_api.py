"""The table catalog, the admin operations and /v1/status over a lakehouse the processor filled.

Eleven landing batches (ten of three good readings, one of a reading whose time
is unparseable) make every number exact: bronze has one commit, one file and
three rows per batch; silver and gold hold only the good rows; quarantine and
the quality table hold the bad one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from fastapi.testclient import TestClient

from api import create_app
from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.maintenance import apply_policy_properties, policy_for
from delta_processing.operations import OperationConflict, ProcessorRunner
from delta_processing.processor import Processor, ProcessorLock
from tests.conftest import Tokens
from tests.helpers import land_records, wait_until

GOOD_BATCHES = 10
ROWS_PER_BATCH = 3
GOOD_ROWS = GOOD_BATCHES * ROWS_PER_BATCH
BRONZE_VERSION = GOOD_BATCHES  # versions 0..10: one append per landing file


@pytest.fixture
def lake_settings(data_dir: Path) -> Settings:
    """Settings whose vacuum retention is zero, so a vacuum can remove files at once."""
    return load_settings(
        data_dir=data_dir,
        trigger_latency_ms=0,
        rescan_interval_s=0.5,
        file_settle_ms=0,
        vacuum_retention_days=0,
    )


def reading(batch: int, i: int) -> dict[str, object]:
    return {
        "ts": f"2026-11-20T10:{batch:02d}:{i:02d}Z",
        "device_id": "d1",
        "sensor": "temp",
        "value": float(batch * 10 + i),
    }


def fill(settings: Settings) -> None:
    """Ten good batches, then one batch whose only row has an unparseable time."""
    processor = Processor(settings, load_contracts())
    for batch in range(GOOD_BATCHES):
        land_records(settings.data_dir, "readings", [reading(batch, i) for i in range(3)])
        processor.run_once()
    land_records(
        settings.data_dir,
        "readings",
        [{"ts": "not a time", "device_id": "d1", "sensor": "temp", "value": 1.0}],
    )
    processor.run_once()


@pytest.fixture
def client(lake_settings: Settings, tokens: Tokens) -> Iterator[TestClient]:
    fill(lake_settings)
    with TestClient(create_app(lake_settings)) as test_client:
        yield test_client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bronze(settings: Settings) -> DeltaTable:
    return DeltaTable(str(settings.data_dir / "bronze" / "readings"))


def test_table_details_are_exact(client: TestClient, tokens: Tokens) -> None:
    answer = client.get("/v1/tables/bronze/readings", headers=auth(tokens.query))
    assert answer.status_code == 200, answer.text
    details = answer.json()
    assert details["layer"] == "bronze" and details["name"] == "readings"
    assert details["version"] == BRONZE_VERSION
    assert details["file_count"] == GOOD_BATCHES + 1
    assert details["row_count"] == GOOD_ROWS + 1
    assert details["partition_columns"] == []
    assert details["last_operation"] == "WRITE"
    assert details["total_bytes"] > 0
    assert 0 <= details["freshness_s"] < 120
    last_commit = datetime.fromisoformat(details["last_commit_at"])
    assert abs((datetime.now(UTC) - last_commit).total_seconds()) < 120
    columns = {c["name"]: c["type"] for c in details["columns"]}
    assert columns["ts"] == "string" and columns["_ingested_at"] == "timestamp[us, tz=UTC]"
    assert details["newest_data_at"] is None  # only gold tables report it

    silver = client.get("/v1/tables/silver/readings", headers=auth(tokens.query)).json()
    assert silver["row_count"] == GOOD_ROWS
    assert {c["name"]: c["type"] for c in silver["columns"]}["value"] == "double"

    hourly = client.get("/v1/tables/gold/readings_hourly", headers=auth(tokens.query)).json()
    assert hourly["row_count"] == 1
    assert hourly["newest_data_at"].startswith("2026-11-20T10:00:00")
    latest = client.get("/v1/tables/gold/readings_latest", headers=auth(tokens.query)).json()
    assert latest["row_count"] == 1
    assert latest["newest_data_at"].startswith("2026-11-20T10:09:02")

    quarantine = client.get("/v1/tables/quarantine/readings", headers=auth(tokens.query)).json()
    assert quarantine["row_count"] == 1


def test_table_list_summarises_every_table(client: TestClient, tokens: Tokens) -> None:
    answer = client.get("/v1/tables", headers=auth(tokens.query))
    assert answer.status_code == 200, answer.text
    listed = {f"{t['layer']}/{t['name']}": t for t in answer.json()}
    assert set(listed) == {
        "bronze/readings",
        "silver/readings",
        "quarantine/readings",
        "gold/readings_hourly",
        "gold/readings_daily",
        "gold/readings_latest",
        "_meta/quality",
    }
    assert listed["bronze/readings"]["row_count"] == GOOD_ROWS + 1
    assert listed["bronze/readings"]["column_count"] == len(bronze_columns(client, tokens))
    assert listed["silver/readings"]["row_count"] == GOOD_ROWS
    assert listed["_meta/quality"]["row_count"] == GOOD_BATCHES + 1
    assert "columns" not in listed["bronze/readings"]


def bronze_columns(client: TestClient, tokens: Tokens) -> list[str]:
    details = client.get("/v1/tables/bronze/readings", headers=auth(tokens.query)).json()
    return [c["name"] for c in details["columns"]]


def test_history_lists_commits_newest_first_with_metrics_and_metadata(
    client: TestClient, tokens: Tokens
) -> None:
    answer = client.get("/v1/tables/bronze/readings/history?limit=3", headers=auth(tokens.query))
    assert answer.status_code == 200, answer.text
    entries = answer.json()
    assert [e["version"] for e in entries] == [BRONZE_VERSION, BRONZE_VERSION - 1, 8]
    assert all(e["operation"] == "WRITE" for e in entries)
    assert [e["metrics"]["num_added_rows"] for e in entries] == [1, 3, 3]
    assert all(e["metadata"] == {"lakehouse.files": "1"} for e in entries)
    assert entries[0]["parameters"] == {"mode": "Append"}
    everything = client.get("/v1/tables/bronze/readings/history", headers=auth(tokens.query))
    assert [e["version"] for e in everything.json()] == list(range(BRONZE_VERSION, -1, -1))
    too_many = client.get("/v1/tables/bronze/readings/history?limit=0", headers=auth(tokens.query))
    assert too_many.status_code == 422


def test_catalog_scopes_and_bad_references(client: TestClient, tokens: Tokens) -> None:
    for path in ("/v1/tables", "/v1/tables/bronze/readings", "/v1/tables/bronze/readings/history"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=auth("lh_not-a-token")).status_code == 401
        forbidden = client.get(path, headers=auth(tokens.ingest_readings))
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "forbidden"
        assert client.get(path, headers=auth(tokens.admin)).status_code == 200

    unknown_layer = client.get("/v1/tables/platinum/readings", headers=auth(tokens.query))
    assert unknown_layer.status_code == 404
    assert unknown_layer.json()["error"]["code"] == "unknown_layer"
    assert "platinum" in unknown_layer.json()["error"]["message"]
    unknown = client.get("/v1/tables/bronze/nope/history", headers=auth(tokens.query))
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "code": "unknown_table",
        "message": "no table bronze/nope",
        "layer": "bronze",
        "table": "nope",
    }
    for name in ("bad.name", "%2E%2E", "-x", "a" * 129):
        bad = client.get(f"/v1/tables/bronze/{name}", headers=auth(tokens.query))
        assert bad.status_code == 400, (name, bad.text)
        assert bad.json()["error"]["code"] == "invalid_table_name"
    # An encoded slash never reaches a table outside the layer.
    escape = client.get("/v1/tables/bronze/..%2F..%2Fsilver%2Freadings", headers=auth(tokens.query))
    assert escape.status_code in (400, 404)


def test_admin_optimize_compacts_and_needs_admin(
    client: TestClient, tokens: Tokens, lake_settings: Settings
) -> None:
    path = "/v1/admin/tables/bronze/readings/optimize"
    assert client.post(path).status_code == 401
    assert client.post(path, headers=auth(tokens.query)).status_code == 403

    answer = client.post(path, headers=auth(tokens.admin))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["table"] == "bronze/readings"
    assert result["files_before"] == GOOD_BATCHES + 1 and result["files_after"] == 1
    assert result["version_before"] == BRONZE_VERSION
    assert result["version_after"] == BRONZE_VERSION + 1
    assert result["compaction"]["ran"] is True
    assert result["compaction"]["files_removed"] == GOOD_BATCHES + 1
    assert result["compaction"]["files_added"] == 1
    assert result["compaction"]["version"] == BRONZE_VERSION + 1

    details = client.get("/v1/tables/bronze/readings", headers=auth(tokens.query)).json()
    assert details["file_count"] == 1 and details["row_count"] == GOOD_ROWS + 1
    assert details["last_operation"] == "OPTIMIZE"
    newest = client.get("/v1/tables/bronze/readings/history?limit=1", headers=auth(tokens.query))
    entry = newest.json()[0]
    assert entry["operation"] == "OPTIMIZE" and entry["version"] == BRONZE_VERSION + 1
    assert entry["metadata"]["lakehouse.maintenance"] == "optimize"
    assert entry["metrics"]["numFilesRemoved"] == GOOD_BATCHES + 1

    zordered = client.post(
        "/v1/admin/tables/gold/readings_hourly/optimize?zorder=device_id&zorder=sensor",
        headers=auth(tokens.admin),
    )
    assert zordered.status_code == 200, zordered.text
    assert zordered.json()["compaction"]["zorder"] == ["device_id", "sensor"]
    bad_column = client.post(
        "/v1/admin/tables/gold/readings_hourly/optimize?zorder=nope", headers=auth(tokens.admin)
    )
    assert bad_column.status_code == 400
    assert "nope" in bad_column.json()["error"]["message"]
    missing = client.post("/v1/admin/tables/gold/nope/optimize", headers=auth(tokens.admin))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_table"
    bad_layer = client.post("/v1/admin/tables/platinum/x/optimize", headers=auth(tokens.admin))
    assert bad_layer.status_code == 404 and bad_layer.json()["error"]["code"] == "unknown_layer"
    assert pl.read_delta(str(lake_settings.data_dir / "bronze" / "readings")).height == 31


def test_admin_vacuum_dry_run_lists_then_real_run_removes(
    client: TestClient, tokens: Tokens, lake_settings: Settings
) -> None:
    root = lake_settings.data_dir / "bronze" / "readings"
    before = {p.name for p in root.glob("*.parquet")}
    assert client.post(
        "/v1/admin/tables/bronze/readings/optimize", headers=auth(tokens.admin)
    ).json()["compaction"]["ran"]
    vacuum = "/v1/admin/tables/bronze/readings/vacuum"
    assert client.post(vacuum, headers=auth(tokens.query)).status_code == 403

    # The tables still carry Delta's default minimum (7 days): the zero retention of the
    # settings must not go below it.
    refused = client.post(f"{vacuum}?dry_run=true", headers=auth(tokens.admin))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "retention_below_table_minimum"

    # The processor's housekeeping records the configured policy in the table.
    apply_policy_properties(bronze(lake_settings), policy_for(lake_settings))
    dry = client.post(f"{vacuum}?dry_run=true", headers=auth(tokens.admin))
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and dry.json()["retention_hours"] == 0
    assert set(dry.json()["files"]) == before
    assert {p.name for p in root.glob("*.parquet")} >= before  # nothing deleted yet

    real = client.post(vacuum, headers=auth(tokens.admin))
    assert real.status_code == 200, real.text
    assert set(real.json()["files"]) == before
    assert not before & {p.name for p in root.glob("*.parquet")}
    assert pl.read_delta(str(root)).height == GOOD_ROWS + 1
    again = client.post(f"{vacuum}?dry_run=true", headers=auth(tokens.admin))
    assert again.json()["files"] == []


def test_admin_refresh_rebuilds_like_the_cli(
    client: TestClient, tokens: Tokens, lake_settings: Settings
) -> None:
    assert (
        client.post("/v1/admin/refresh/silver/readings", headers=auth(tokens.query)).status_code
        == 403
    )
    answer = client.post("/v1/admin/refresh/silver/readings", headers=auth(tokens.admin))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["table"] == "silver/readings"
    assert result["rows"] == GOOD_ROWS
    assert result["upstream_version"] == bronze(lake_settings).version()
    silver = DeltaTable(str(lake_settings.data_dir / "silver" / "readings"))
    assert result["version"] == silver.version()
    assert silver.history(1)[0]["lakehouse.refresh"] == "full"
    assert pl.read_delta(str(lake_settings.data_dir / "silver" / "readings")).height == GOOD_ROWS

    gold = client.post("/v1/admin/refresh/gold/readings_hourly", headers=auth(tokens.admin))
    assert gold.status_code == 200, gold.text
    assert gold.json()["table"] == "gold/readings_hourly"

    for target, status, code in [
        ("gold/nope", 404, "unknown_table"),
        ("silver/nope", 404, "unknown_table"),
        ("bronze/readings", 400, "invalid_operation"),
        ("readings", 400, "invalid_operation"),
    ]:
        bad = client.post(f"/v1/admin/refresh/{target}", headers=auth(tokens.admin))
        assert (bad.status_code, bad.json()["error"]["code"]) == (status, code), target


def test_admin_operations_conflict_with_a_running_processor(
    client: TestClient, tokens: Tokens, lake_settings: Settings
) -> None:
    lock = ProcessorLock(lake_settings.data_dir)
    lock.acquire()
    try:
        for path in (
            "/v1/admin/tables/bronze/readings/optimize",
            "/v1/admin/tables/bronze/readings/vacuum?dry_run=true",
            "/v1/admin/refresh/silver/readings",
        ):
            answer = client.post(path, headers=auth(tokens.admin))
            assert answer.status_code == 409, (path, answer.text)
            assert answer.json()["error"]["code"] == "processor_busy"
            assert "processor" in answer.json()["error"]["message"]
    finally:
        lock.release()
    assert bronze(lake_settings).version() == BRONZE_VERSION  # nothing ran


def test_admin_operations_run_inside_a_running_processor(
    lake_settings: Settings, tokens: Tokens
) -> None:
    """Under `lakehouse up` the processor itself runs them, between micro-batches."""
    fill(lake_settings)
    processor = Processor(lake_settings, load_contracts())
    stop = threading.Event()
    worker = threading.Thread(target=processor.run_forever, args=(stop,), daemon=True)
    worker.start()
    assert processor.started.wait(10)
    try:
        app = create_app(lake_settings, operations=ProcessorRunner(processor))
        with TestClient(app) as client:
            answer = client.post(
                "/v1/admin/tables/bronze/readings/optimize", headers=auth(tokens.admin)
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["compaction"]["files_removed"] == GOOD_BATCHES + 1
            # Data keeps flowing while operations are served.
            land_records(lake_settings.data_dir, "readings", [reading(40, i) for i in range(3)])
            refreshed = client.post("/v1/admin/refresh/silver/readings", headers=auth(tokens.admin))
            assert refreshed.status_code == 200, refreshed.text
            metrics = client.get("/metrics").text
            for operation in ("optimize", "refresh"):
                line = f'lakehouse_admin_operations_total{{operation="{operation}"}} 1.0'
                assert line in metrics
        silver = DeltaTable(str(lake_settings.data_dir / "silver" / "readings"))
        wait_until(lambda: silver.update_incremental() or silver.count() == GOOD_ROWS + 3)
    finally:
        stop.set()
        processor.wake.set()
        worker.join(timeout=30)
    # After the processor stopped, a queued operation fails instead of hanging.
    with pytest.raises(OperationConflict, match="not running"):
        ProcessorRunner(processor)(lambda: 1)


def test_status_reports_pipeline_rate_and_problems(client: TestClient, tokens: Tokens) -> None:
    assert client.get("/v1/status").status_code == 401
    assert client.get("/v1/status", headers=auth(tokens.ingest_readings)).status_code == 403
    answer = client.get("/v1/status", headers=auth(tokens.query))
    assert answer.status_code == 200, answer.text
    status = answer.json()
    assert status["pipeline"] == [
        {
            "source": "readings",
            "declared": True,
            "bronze": "bronze/readings",
            "silver": "silver/readings",
            "quarantine": "quarantine/readings",
            "gold": ["gold/readings_hourly", "gold/readings_daily", "gold/readings_latest"],
        }
    ]
    assert len(status["ingestion"]) == 60
    assert sum(b["rows"] for b in status["ingestion"]) == GOOD_ROWS + 1
    assert sum(b["commits"] for b in status["ingestion"]) == GOOD_BATCHES + 1
    assert [f["source"] for f in status["quality_failures"]] == ["readings"]
    assert status["quality_failures"][0]["rows_quarantined"] == 1
    assert status["dead_letters"] == [] and status["dead_letter_count"] == 0
    assert {t["layer"] + "/" + t["name"] for t in status["tables"]} >= {"bronze/readings"}
