"""End to end: `lakehouse up` (real uvicorn + processor), every format in, exact gold out."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl

from tests.conftest import Tokens
from tests.helpers import (
    LAKEHOUSE,
    REPO,
    free_port,
    lakehouse_env,
    start_lakehouse,
    stop,
    wait_healthy,
    wait_until,
)

# Device d1/temp receives readings in five formats, spread over two hours of one day,
# plus one duplicate and one invalid record; d2/hum receives a late reading from the day before.
NDJSON = (
    b'{"ts": "2026-11-20T10:05:00Z", "device_id": "d1", "sensor": "temp", "value": 20.0, '
    b'"unit": "C"}\n'
    b'{"ts": "2026-11-20T10:15:00+01:00", "device_id": "d1", "sensor": "temp", "value": 22}\n'
)
JSON_OBJECT = {"ts": "2026-11-20T10:20:00", "device_id": "d1", "sensor": "temp", "value": 24.0}
JSON_ARRAY = [
    {"ts": 1795171500000, "device_id": "d1", "sensor": "temp", "value": "26.5"},  # 10:45Z
    {"ts": "2026-11-20T10:05:00Z", "device_id": "d1", "sensor": "temp", "value": 20.0},  # dup
    {"ts": "not a time", "device_id": "d1", "sensor": "temp", "value": 99.0},  # quarantined
]
CSV = b"ts,device_id,sensor,value,unit\n2026-11-20T11:30:00Z,d1,temp,30.0,C\n"
GZIP_NDJSON = gzip.compress(
    b'{"ts": "2026-11-19T23:59:59Z", "device_id": "d2", "sensor": "hum", "value": 55.5}\n'
)


def _parquet() -> bytes:
    frame = pl.DataFrame(
        {
            "ts": [datetime(2026, 11, 20, 11, 45, tzinfo=UTC)],
            "device_id": ["d1"],
            "sensor": ["temp"],
            "value": [34.0],
        }
    )
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def _query(client: httpx.Client, sql: str) -> list[dict[str, object]]:
    response = client.post("/v1/query", json={"sql": sql})
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    assert isinstance(rows, list)
    return rows


def _count(client: httpx.Client, table: str) -> int | None:
    """Row count of ``table``, or None while the processor has not created it yet."""
    response = client.post("/v1/query", json={"sql": f"SELECT count(*) AS n FROM {table}"})
    return int(response.json()["rows"][0]["n"]) if response.status_code == 200 else None


def test_every_format_reaches_exact_gold(data_dir: Path, tokens: Tokens, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    proc = start_lakehouse(
        ["up", "--port", str(port)],
        data_dir,
        log,
        LAKEHOUSE_TRIGGER_LATENCY_MS="50",
        LAKEHOUSE_RESCAN_INTERVAL_S="1",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        ingest = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {tokens.ingest_readings}"}
        )
        posts = [
            ("application/x-ndjson", NDJSON, {}, 2),
            ("application/json", json.dumps(JSON_OBJECT).encode(), {}, 1),
            ("application/json", json.dumps(JSON_ARRAY).encode(), {}, 3),
            ("text/csv", CSV, {}, 1),
            ("application/vnd.apache.parquet", _parquet(), {}, 1),
            ("application/x-ndjson", GZIP_NDJSON, {"Content-Encoding": "gzip"}, 1),
        ]
        batch_ids = set()
        for content_type, body, headers, records in posts:
            response = ingest.post(
                "/v1/ingest/readings",
                content=body,
                headers={"Content-Type": content_type, **headers},
            )
            assert response.status_code == 202, response.text
            assert response.json()["records"] == records
            batch_ids.add(response.json()["batch_id"])
        assert len(batch_ids) == len(posts)

        analyst = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens.query}"})
        # 9 accepted records: 1 duplicate key and 1 invalid -> 7 silver rows.
        wait_until(
            lambda: (
                _count(analyst, "silver.readings") == 7
                and _count(analyst, "quarantine.readings") == 1
            ),
            timeout=60,
        )

        def hourly() -> list[dict[str, object]]:
            return _query(
                analyst,
                "SELECT device_id, sensor, strftime(window_start, '%Y-%m-%dT%H:%M') AS w, "
                "count, min, max, avg, sum FROM gold.readings_hourly ORDER BY 1, 2, 3",
            )

        expected_hourly = [
            # 10:05, 10:20, 10:45 (d1), and 09:15Z (10:15+01:00)
            {"device_id": "d1", "sensor": "temp", "w": "2026-11-20T09:00", "count": 1,
             "min": 22.0, "max": 22.0, "avg": 22.0, "sum": 22.0},
            {"device_id": "d1", "sensor": "temp", "w": "2026-11-20T10:00", "count": 3,
             "min": 20.0, "max": 26.5, "avg": 70.5 / 3, "sum": 70.5},
            {"device_id": "d1", "sensor": "temp", "w": "2026-11-20T11:00", "count": 2,
             "min": 30.0, "max": 34.0, "avg": 32.0, "sum": 64.0},
            {"device_id": "d2", "sensor": "hum", "w": "2026-11-19T23:00", "count": 1,
             "min": 55.5, "max": 55.5, "avg": 55.5, "sum": 55.5},
        ]  # fmt: skip
        assert wait_until(lambda: hourly() == expected_hourly or None, timeout=30)

        daily = _query(
            analyst,
            "SELECT device_id, strftime(window_start, '%Y-%m-%d') AS d, count, sum "
            "FROM gold.readings_daily ORDER BY 1, 2",
        )
        assert daily == [
            {"device_id": "d1", "d": "2026-11-20", "count": 6, "sum": 156.5},
            {"device_id": "d2", "d": "2026-11-19", "count": 1, "sum": 55.5},
        ]
        latest = _query(
            analyst,
            "SELECT device_id, sensor, strftime(ts, '%Y-%m-%dT%H:%M:%S') AS ts, value "
            "FROM gold.readings_latest ORDER BY 1",
        )
        assert latest == [
            {"device_id": "d1", "sensor": "temp", "ts": "2026-11-20T11:45:00", "value": 34.0},
            {"device_id": "d2", "sensor": "hum", "ts": "2026-11-19T23:59:59", "value": 55.5},
        ]
        reason = _query(analyst, "SELECT ts, _reason FROM quarantine.readings")[0]
        assert reason == {
            "ts": "not a time",
            "_reason": "ts: cannot parse 'not a time' as timestamp",
        }
        # Landing drained: every file moved to the archive, none left behind.
        assert list((data_dir / "landing" / "readings").glob("*.parquet")) == []
        assert len(list((data_dir / "archive" / "readings").rglob("*.parquet"))) == len(posts)
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()


def test_first_up_prints_an_admin_token_once(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"

    def run_once() -> str:
        proc = subprocess.Popen(
            [*LAKEHOUSE, "up", "--port", str(port)],
            cwd=REPO,
            env=lakehouse_env(data_dir),
            stdout=subprocess.PIPE,
            stderr=open(log, "ab"),  # noqa: SIM115
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        finally:
            stop(proc)
        assert proc.stdout is not None
        return proc.stdout.read().decode()

    first = run_once().split()
    assert len(first) == 1 and first[0].startswith("lh_")
    admin = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {first[0]}"}
    )
    assert run_once() == ""  # never printed again
    # The printed token is a working admin token on the next start.
    proc = start_lakehouse(["api", "--port", str(port)], data_dir, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        response = admin.post("/v1/query", json={"sql": "SELECT 1 AS one"})
        assert response.json()["rows"] == [{"one": 1}]
    finally:
        stop(proc)


def test_up_refuses_to_start_when_another_processor_owns_the_data_dir(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    from delta_processing.processor import ProcessorLock

    lock = ProcessorLock(data_dir)
    lock.acquire()
    try:
        result = subprocess.run(
            [*LAKEHOUSE, "up", "--port", str(free_port())],
            cwd=REPO,
            env=lakehouse_env(data_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        lock.release()
    assert result.returncode == 1
    assert "only one may run per data directory" in result.stderr
