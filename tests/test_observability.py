"""Operations: correlation ids from request to bronze, /metrics, /ready, result formats."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from fastapi.testclient import TestClient

from analytics.results import UnsupportedResultFormat, format_for_accept
from api.app import create_app
from api.observability import correlation_id
from config.contracts import load_contracts
from config.settings import Settings, load_settings
from delta_processing.processor import Processor
from landing_zone.writer import CORRELATION_KEY, batch_time, new_batch_id
from tests.conftest import Tokens
from tests.helpers import (
    LAKEHOUSE,
    free_port,
    lakehouse_env,
    start_lakehouse,
    stop,
    wait_healthy,
    wait_until,
)

READINGS = [
    {"ts": "2026-11-20T10:05:00Z", "device_id": "d1", "sensor": "temp", "value": 20.5},
    {"ts": "2026-11-20T10:35:00Z", "device_id": "d1", "sensor": "temp", "value": 21.5},
    {"ts": "2026-11-20T11:10:00Z", "device_id": "d2", "sensor": "hum", "value": 40.0},
]
BODY = "\n".join(json.dumps(r) for r in READINGS).encode()
NDJSON = {"Content-Type": "application/x-ndjson"}


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text ``text`` (None if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if found == labels:
            return float(value)
    return None


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------ correlation ids


def test_correlation_id_is_kept_when_sane_and_made_otherwise() -> None:
    assert correlation_id("req-42.a:b_C") == "req-42.a:b_C"
    for bad in (None, "", "has space", "x" * 129, "semi;colon", "é"):
        made = correlation_id(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", made), made
    assert correlation_id(None) != correlation_id(None)


def test_batch_time_reads_writer_names_only() -> None:
    name = new_batch_id() + ".parquet"
    stamp = batch_time(name)
    assert stamp is not None and abs(time.time() - stamp.timestamp()) < 5
    assert batch_time("replay-20261120T101500123456Z.parquet") is not None
    assert batch_time("readings-export.csv") is None


def test_request_correlation_reaches_landing_file_and_bronze_commit(
    settings: Settings, tokens: Tokens
) -> None:
    client = TestClient(create_app(settings))
    sent = client.post(
        "/v1/ingest/readings",
        content=BODY,
        headers={**NDJSON, **_auth(tokens.ingest_readings), "X-Correlation-ID": "req-7f3"},
    )
    assert sent.status_code == 202, sent.text
    assert sent.headers["X-Correlation-ID"] == "req-7f3"
    made = client.post(
        "/v1/ingest/readings",
        content=BODY,
        headers={**NDJSON, **_auth(tokens.ingest_readings), "X-Correlation-ID": "bad id!"},
    )
    generated = made.headers["X-Correlation-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # errors carry one too, so a failed call can be found in the logs
    assert client.get("/v1/tables-that-do-not-exist").headers["X-Correlation-ID"]

    landing = settings.data_dir / "landing" / "readings"
    files = {p.name: p for p in landing.glob("*.parquet")}
    file = files[sent.json()["batch_id"] + ".parquet"]
    assert pl.read_parquet_metadata(file)[CORRELATION_KEY] == "req-7f3"

    report = Processor(settings, load_contracts()).run_once()
    assert not report.failures
    assert {cid for b in report.bronze for cid in b.correlation_ids} == {"req-7f3", generated}
    bronze = DeltaTable(str(settings.data_dir / "bronze" / "readings"))
    recorded = {
        cid
        for entry in bronze.history()
        for cid in json.loads(entry.get("lakehouse.correlation_ids", "[]"))
    }
    assert recorded == {"req-7f3", generated}


def test_logs_of_a_request_and_of_its_batch_carry_the_correlation_id(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    proc = start_lakehouse(
        ["up", "--port", str(port)],
        data_dir,
        log,
        LAKEHOUSE_LOG_LEVEL="INFO",
        LAKEHOUSE_TRIGGER_LATENCY_MS="0",
        LAKEHOUSE_FILE_SETTLE_MS="0",
        LAKEHOUSE_RESCAN_INTERVAL_S="0.5",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        sent = httpx.post(
            f"{base}/v1/ingest/readings",
            content=BODY,
            headers={**NDJSON, **_auth(tokens.ingest_readings), "X-Correlation-ID": "trace-991"},
        )
        assert sent.status_code == 202, sent.text
        query = httpx.Client(base_url=base, headers=_auth(tokens.query))

        def gold_rows() -> int | None:
            answer = query.post(
                "/v1/query", json={"sql": "SELECT sum(count) AS n FROM gold.readings_hourly"}
            )
            if answer.status_code != 200:
                return None
            n = answer.json()["rows"][0]["n"]
            return 3 if n is not None and int(n) == 3 else None

        wait_until(gold_rows, timeout=60)

        def scraped() -> str | None:
            # Gold is visible the moment it commits; the metrics follow right after.
            text = httpx.get(f"{base}/metrics").text
            done = _metric(text, "lakehouse_end_to_end_seconds_count", source="readings")
            return text if done else None

        metrics = wait_until(scraped, timeout=30)
    finally:
        stop(proc)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    request = [e for e in events if e.get("event") == "http.request" and e.get("status") == 202]
    assert request and request[0]["correlation_id"] == "trace-991"
    assert request[0]["route"] == "/v1/ingest/{source:path}"
    bronze = [e for e in events if e.get("event") == "bronze.committed" and e.get("rows")]
    assert any("trace-991" in e.get("correlation_ids", []) for e in bronze), bronze

    # The processor's metrics are served by the API of `lakehouse up`.
    assert _metric(metrics, "lakehouse_stage_rows_total", stage="bronze", source="readings") == 3
    assert _metric(metrics, "lakehouse_stage_rows_total", stage="silver", source="readings") == 3
    assert _metric(metrics, "lakehouse_quality_rows_total", source="readings", outcome="in") == 3
    hourly = _metric(
        metrics, "lakehouse_stage_batches_total", stage="gold", source="readings_hourly"
    )
    assert hourly is not None and hourly >= 1
    e2e = _metric(metrics, "lakehouse_end_to_end_seconds_count", source="readings")
    assert e2e is not None and e2e >= 1
    freshness = _metric(metrics, "lakehouse_gold_freshness_seconds", table="readings_hourly")
    assert freshness is not None and 0 <= freshness < 120
    assert _metric(metrics, "lakehouse_ingest_records_total", source="readings") == 3
    assert _metric(metrics, "lakehouse_ingest_bytes_total", source="readings") == len(BODY)
    accepted = _metric(
        metrics,
        "lakehouse_http_requests_total",
        method="POST",
        route="/v1/ingest/{source:path}",
        status="202",
    )
    assert accepted == 1
    assert _metric(metrics, "lakehouse_landing_backlog_files") == 0


# -------------------------------------------------------------------- metrics


def test_metrics_count_requests_rejections_and_the_backlog(
    settings: Settings, tokens: Tokens
) -> None:
    client = TestClient(create_app(settings))
    for _ in range(2):
        answer = client.post(
            "/v1/ingest/readings", content=BODY, headers={**NDJSON, **_auth(tokens.ingest_readings)}
        )
        assert answer.status_code == 202
    rejected = client.post(
        "/v1/ingest/readings",
        content=b"{not json",
        headers={**NDJSON, **_auth(tokens.ingest_readings)},
    )
    assert rejected.status_code == 400
    assert client.post("/v1/ingest/readings", content=BODY, headers=NDJSON).status_code == 401

    text = client.get("/metrics").text
    route = "/v1/ingest/{source:path}"
    assert (
        _metric(text, "lakehouse_http_requests_total", method="POST", route=route, status="202")
        == 2
    )
    assert (
        _metric(text, "lakehouse_http_requests_total", method="POST", route=route, status="400")
        == 1
    )
    assert (
        _metric(text, "lakehouse_http_requests_total", method="POST", route=route, status="401")
        == 1
    )
    assert _metric(text, "lakehouse_ingest_records_total", source="readings") == 6
    assert _metric(text, "lakehouse_ingest_batches_total", source="readings") == 2
    assert _metric(text, "lakehouse_http_request_seconds_count", route=route) == 4

    # No processor runs here: both batches wait in the landing zone.
    landing = sorted((settings.data_dir / "landing" / "readings").glob("*.parquet"))
    assert len(landing) == 2
    assert _metric(text, "lakehouse_landing_backlog_files") == 2
    assert _metric(text, "lakehouse_landing_source_backlog_files", source="readings") == 2
    size = sum(p.stat().st_size for p in landing)
    assert _metric(text, "lakehouse_landing_backlog_bytes") == size
    oldest = _metric(text, "lakehouse_landing_backlog_oldest_seconds")
    assert oldest is not None and 0 <= oldest < 60


def test_processor_metrics_without_the_api(
    settings: Settings, tokens: Tokens, tmp_path: Path
) -> None:
    """`lakehouse process --metrics-port` serves the processor's own metrics."""
    from tests.helpers import land_records

    land_records(settings.data_dir, "readings", READINGS)
    port = free_port()
    log = tmp_path / "process.log"
    proc = start_lakehouse(
        ["process", "--metrics-port", str(port)],
        settings.data_dir,
        log,
        LAKEHOUSE_TRIGGER_LATENCY_MS="0",
        LAKEHOUSE_FILE_SETTLE_MS="0",
    )
    try:

        def scraped() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                return None
            done = _metric(text, "lakehouse_stage_rows_total", stage="silver", source="readings")
            return text if done == 3 else None

        text = wait_until(scraped, timeout=60)
    finally:
        stop(proc)
    assert _metric(text, "lakehouse_stage_batch_seconds_count", stage="bronze") == 1
    assert _metric(text, "lakehouse_landing_backlog_files") == 0


# ---------------------------------------------------------------------- ready


def test_ready_fails_while_the_backlog_is_older_than_the_bound(
    data_dir: Path, tokens: Tokens
) -> None:
    settings = load_settings(data_dir=data_dir, ready_max_backlog_age_s=0.5)
    client = TestClient(create_app(settings))
    assert client.get("/ready").status_code == 200
    answer = client.post(
        "/v1/ingest/readings", content=BODY, headers={**NDJSON, **_auth(tokens.ingest_readings)}
    )
    assert answer.status_code == 202
    assert client.get("/ready").status_code == 200  # just written: within the bound
    time.sleep(0.7)
    stale = client.get("/ready")
    assert stale.status_code == 503
    (reason,) = stale.json()["reasons"]
    assert "landing backlog of 'readings'" in reason and "1 files" in reason
    # Once bronze has it, ready again.
    Processor(settings, load_contracts()).run_once()
    assert client.get("/ready").status_code == 200


def test_ready_fails_when_storage_is_not_writable(data_dir: Path) -> None:
    settings = load_settings(data_dir=data_dir)
    (data_dir / "landing").write_text("not a directory")
    answer = TestClient(create_app(settings)).get("/ready")
    assert answer.status_code == 503
    assert any(r.startswith("landing zone ") for r in answer.json()["reasons"])


# -------------------------------------------------------------- result formats


def test_accept_header_negotiation() -> None:
    assert format_for_accept(None) == "json"
    assert format_for_accept("*/*") == "json"
    assert format_for_accept("text/csv") == "csv"
    assert format_for_accept("image/png, text/csv;q=0.5") == "csv"
    assert format_for_accept("application/vnd.apache.arrow.stream") == "arrow"
    assert format_for_accept("application/vnd.apache.parquet") == "parquet"
    assert format_for_accept("text/csv;q=0, application/json") == "json"
    with pytest.raises(UnsupportedResultFormat, match="results come as"):
        format_for_accept("image/png")


@pytest.fixture
def filled(settings: Settings, tokens: Tokens) -> TestClient:
    client = TestClient(create_app(settings))
    answer = client.post(
        "/v1/ingest/readings", content=BODY, headers={**NDJSON, **_auth(tokens.ingest_readings)}
    )
    assert answer.status_code == 202
    assert not Processor(settings, load_contracts()).run_once().failures
    return client


SQL = (
    "SELECT device_id, sensor, window_start, count, avg AS mean "
    "FROM gold.readings_hourly ORDER BY device_id, window_start"
)


def test_query_results_in_every_format(filled: TestClient, tokens: Tokens) -> None:
    headers = _auth(tokens.query)
    as_json = filled.post("/v1/query", json={"sql": SQL}, headers=headers)
    assert as_json.status_code == 200 and as_json.headers["X-Row-Count"] == "2"
    rows = as_json.json()["rows"]
    assert [(r["device_id"], r["count"], r["mean"]) for r in rows] == [
        ("d1", 2, 21.0),
        ("d2", 1, 40.0),
    ]

    as_csv = filled.post("/v1/query", json={"sql": SQL}, headers={**headers, "Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert pl.read_csv(io.BytesIO(as_csv.content))["device_id"].to_list() == [
        r["device_id"] for r in rows
    ]

    arrow = filled.post(
        "/v1/query",
        json={"sql": SQL},
        headers={**headers, "Accept": "application/vnd.apache.arrow.stream"},
    )
    assert arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column("mean").to_pylist() == [r["mean"] for r in rows]
    assert pa.types.is_timestamp(table.schema.field("window_start").type)  # typed, not text

    parquet = filled.post("/v1/query", json={"sql": SQL, "format": "parquet"}, headers=headers)
    assert parquet.headers["content-type"] == "application/vnd.apache.parquet"
    assert pq.read_table(io.BytesIO(parquet.content)).equals(table)

    refused = filled.post(
        "/v1/query", json={"sql": SQL}, headers={**headers, "Accept": "image/png"}
    )
    assert refused.status_code == 406 and refused.json()["error"]["code"] == "not_acceptable"
    bad_field = filled.post("/v1/query", json={"sql": SQL, "format": "xml"}, headers=headers)
    assert bad_field.status_code == 422


def test_cli_sql_writes_every_format(
    filled: TestClient, settings: Settings, tmp_path: Path
) -> None:
    env = lakehouse_env(settings.data_dir)
    target = tmp_path / "hourly.parquet"
    done = subprocess.run(
        [*LAKEHOUSE, "sql", SQL, "--format", "parquet", "--output", str(target)],
        env=env,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert pq.read_table(target).num_rows == 2
    arrow = subprocess.run(
        [*LAKEHOUSE, "sql", SQL, "-f", "arrow"], env=env, capture_output=True, check=True
    )
    assert pa.ipc.open_stream(arrow.stdout).read_all().equals(pq.read_table(target))
    as_csv = subprocess.run(
        [*LAKEHOUSE, "sql", SQL, "-f", "csv"], env=env, capture_output=True, check=True
    )
    assert as_csv.stdout.decode().splitlines()[0] == "device_id,sensor,window_start,count,mean"


def test_integral_sums_are_json_numbers_and_exact_decimals_stay_text() -> None:
    import duckdb

    from analytics.results import rows_json

    result = duckdb.sql(
        "SELECT sum(x) AS total, 170141183460469231731687303715884105727::HUGEINT AS huge, "
        "1.50::DECIMAL(10, 2) AS price FROM (SELECT 41::BIGINT AS x UNION ALL SELECT 1)"
    ).arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    assert json.loads(rows_json(table)) == [
        {"total": 42, "huge": "170141183460469231731687303715884105727", "price": "1.50"}
    ]


def test_results_a_format_cannot_hold_are_a_clear_422(filled: TestClient, tokens: Tokens) -> None:
    headers = _auth(tokens.query)

    def post(sql: str, fmt: str) -> httpx.Response:
        return filled.post("/v1/query", json={"sql": sql, "format": fmt}, headers=headers)

    blob = post("SELECT 'abc'::BLOB AS b", "csv")  # blobs: base64, as in JSON
    assert blob.status_code == 200 and blob.text.splitlines() == ["b", "YWJj"]
    for sql, fmt in (
        ("SELECT INTERVAL 1 DAY AS i", "parquet"),
        ("SELECT union_value(k := 1) AS u", "csv"),
    ):
        answer = post(sql, fmt)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "unencodable_result" and "ask for JSON" in error["message"]
        assert post(sql, "json").status_code == 200


def test_unknown_methods_do_not_make_new_metric_series(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    for method in ("PROPFIND", "QUERY", "BREW"):
        client.request(method, "/v1/tables")
    text = client.get("/metrics").text
    assert "PROPFIND" not in text and "BREW" not in text
    other = _metric(
        text, "lakehouse_http_requests_total", method="OTHER", route="/v1/tables", status="405"
    )
    assert other == 3


def test_backlog_gauges_reuse_a_scan_only_while_it_is_recent_for_its_cost(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape rescans the landing zone unless the last scan ended within ``reuse_factor``
    times its own duration: cheap scans are always fresh, a slow one is not repeated
    by every scrape."""
    from landing_zone import backlog as backlog_module
    from landing_zone.backlog import BacklogCollector
    from landing_zone.layout import LandingLayout
    from tests.helpers import land_records

    def files(collector: BacklogCollector) -> float:
        return next(iter(collector.collect())).samples[0].value

    layout = LandingLayout(settings.data_dir)
    land_records(settings.data_dir, "readings", READINGS)
    reusing, fresh = BacklogCollector(layout, reuse_factor=1e9), BacklogCollector(layout, 0)
    assert files(reusing) == files(fresh) == 1
    land_records(settings.data_dir, "readings", READINGS)
    assert files(fresh) == 2
    assert files(reusing) == 1  # the first scan still answers

    scans: list[float] = []
    measure = backlog_module.measure_backlog

    def slow_scan(layout: LandingLayout) -> dict[str, backlog_module.SourceBacklog]:
        scans.append(time.monotonic())
        time.sleep(0.2)
        return measure(layout)

    monkeypatch.setattr(backlog_module, "measure_backlog", slow_scan)
    default = BacklogCollector(layout)  # reuses a 0.2 s scan for 2 s
    assert [files(default), files(default)] == [2, 2]
    assert len(scans) == 1
