"""Ingest rate limits: the token bucket, 429 with Retry-After, headers, sharing across processes."""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from api import create_app
from api.rate_limit import Bucket, Limit, RateLimiter, charge_ingest, take
from api.tokens import TokenRecord, TokenStore
from config.settings import Settings, load_settings
from tests.conftest import Tokens
from tests.helpers import free_port, start_lakehouse, stop, wait_healthy

INGEST = "/v1/ingest/readings"
HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def rows(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {"ts": "2026-11-20T10:00:00Z", "device_id": f"d{i}", "sensor": "t", "value": 1.0}
        ).encode()
        + b"\n"
        for i in range(n)
    )


def post(client: httpx.Client | TestClient, token: str, n: int, path: str = INGEST) -> Any:
    return client.post(
        path,
        content=rows(n),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )


def limited(data_dir: Path, **overrides: Any) -> Settings:
    return load_settings(data_dir=data_dir, **overrides)


def rate_headers(response: httpx.Response) -> tuple[int, int, int]:
    limit, remaining, reset = (int(response.headers[h]) for h in HEADERS)
    return limit, remaining, reset


# --- the algorithm -------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),  # seconds since the last request
        st.floats(min_value=0, max_value=60, allow_nan=False),  # cost
    ),
    min_size=1,
    max_size=60,
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=1000, allow_nan=False),
    burst_s=st.floats(min_value=0.1, max_value=20, allow_nan=False),
    start=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    history=events,
)
def test_never_admits_more_than_rate_times_t_plus_burst(
    rate: float, burst_s: float, start: float, history: list[tuple[float, float]]
) -> None:
    limit = Limit(rate, rate * burst_s)
    bucket: Bucket | None = None
    now = start
    admitted: list[tuple[float, float]] = []
    for gap, cost in history:
        now += gap
        result = take(bucket, limit, cost, now)
        assert 0 <= result.bucket.level <= limit.burst + 1e-9
        level = limit.burst if bucket is None else min(limit.burst, bucket.level + gap * rate)
        assert result.admitted == (cost <= level)
        if result.admitted:
            admitted.append((now, cost))
            assert result.retry_after == 0
        elif cost > limit.burst:
            assert math.isinf(result.retry_after)
        else:
            # Waiting Retry-After is enough, and not waiting is not.
            assert result.retry_after > 0
            later = take(result.bucket, limit, cost, now + result.retry_after + 1e-3)  # float slack
            assert later.admitted
        bucket = result.bucket
    # Over every window [t_i, t_j] of admitted requests: sum <= rate * (t_j - t_i) + burst.
    for i in range(len(admitted)):
        total = 0.0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            window = admitted[j][0] - admitted[i][0]
            assert total <= rate * window + limit.burst + 1e-6 * max(1.0, total)


def test_time_running_backwards_adds_nothing() -> None:
    limit = Limit(rate=1.0, burst=10.0)
    first = take(None, limit, 10, now=1000.0)
    assert first.admitted and first.bucket.level == 0
    earlier = take(first.bucket, limit, 1, now=500.0)
    assert not earlier.admitted and earlier.bucket == Bucket(0.0, 1000.0)
    assert earlier.retry_after == pytest.approx(1.0)


# --- the API ---------------------------------------------------------------------------------


@pytest.fixture
def burst_app(data_dir: Path, tokens: Tokens) -> Iterator[TestClient]:
    """2 rows/s, a bucket of 5 s = 10 rows; bytes: 1 MB/s (not binding)."""
    settings = limited(
        data_dir, rate_limit_rows_per_s=2, rate_limit_bytes_per_s=1e6, rate_limit_burst_s=5
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_a_burst_gets_429_with_retry_after_and_rate_limit_headers(
    burst_app: TestClient, tokens: Tokens
) -> None:
    remaining = []
    for _ in range(3):
        accepted = post(burst_app, tokens.ingest_readings, 3)
        assert accepted.status_code == 202, accepted.text
        limit, left, reset = rate_headers(accepted)
        assert limit == 10
        remaining.append(left)
        assert reset == math.ceil((10 - left) / 2) or reset == math.ceil((10 - left) / 2) - 1
    assert remaining == [7, 4, 1]  # the requests take milliseconds: no visible refill
    refused = post(burst_app, tokens.ingest_readings, 3)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and "sensors" in error["message"]
    assert refused.headers["retry-after"] == "1"  # (3 - 1) rows at 2 rows/s
    assert error["retry_after_s"] == 1
    assert rate_headers(refused) == (10, 1, 5)  # nothing was charged
    # A smaller batch still fits; waiting Retry-After lets the refused one through.
    assert post(burst_app, tokens.ingest_readings, 1).status_code == 202
    time.sleep(1.6)  # 0 + 3.2 rows
    again = post(burst_app, tokens.ingest_readings, 3)
    assert again.status_code == 202, again.text
    # A batch larger than the bucket could never pass: 413, not a retry loop.
    huge = post(burst_app, tokens.ingest_readings, 11)
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "batch_exceeds_rate_limit"
    assert "retry-after" not in huge.headers


def test_buckets_are_per_token_and_source(data_dir: Path, tokens: Tokens) -> None:
    settings = limited(
        data_dir, rate_limit_rows_per_s=1, rate_limit_burst_s=5, auto_create_sources=True
    )
    with TestClient(create_app(settings)) as client:
        assert post(client, tokens.ingest_all, 5).status_code == 202
        assert post(client, tokens.ingest_all, 1).status_code == 429
        # the same token, another source; another token, the same source
        assert post(client, tokens.ingest_all, 5, "/v1/ingest/other").status_code == 202
        assert post(client, tokens.ingest_readings, 5).status_code == 202


def test_bytes_limit_and_headers_describe_the_rows_bucket(data_dir: Path, tokens: Tokens) -> None:
    one_row = len(rows(1))
    settings = limited(
        data_dir,
        rate_limit_rows_per_s=10,  # bucket: 1000 rows
        rate_limit_bytes_per_s=one_row / 10,  # bucket: 10 rows' worth of bytes
        rate_limit_burst_s=100,
    )
    with TestClient(create_app(settings)) as client:
        first = post(client, tokens.ingest_readings, 8)
        assert first.status_code == 202
        assert rate_headers(first)[:2] == (1000, 992)
        refused = post(client, tokens.ingest_readings, 5)  # 5 rows fit, their bytes do not
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"  # 3 rows' bytes at a tenth of a row/s
        limit, remaining, _ = rate_headers(refused)  # the rows bucket, not charged
        assert limit == 1000 and remaining in (992, 993)


def test_per_token_overrides_and_off_by_default(data_dir: Path, tokens: Tokens) -> None:
    store = TokenStore(data_dir / "_meta" / "tokens.json")
    slow = store.create("slow", ["ingest:readings"], rate_rows_per_s=0.5)
    with TestClient(create_app(load_settings(data_dir=data_dir))) as client:
        unlimited = post(client, tokens.ingest_readings, 50)
        assert unlimited.status_code == 202
        assert not any(h in unlimited.headers for h in HEADERS)
        capped = post(client, slow, 3)
        assert capped.status_code == 202
        assert rate_headers(capped)[:2] == (5, 2)  # 0.5 rows/s x 10 s default burst
        assert post(client, slow, 3).status_code == 429


def test_limits_hold_across_two_apps_on_one_data_dir(data_dir: Path, tokens: Tokens) -> None:
    settings = limited(data_dir, rate_limit_rows_per_s=1, rate_limit_burst_s=10)
    with (
        TestClient(create_app(settings)) as worker_a,
        TestClient(create_app(settings)) as worker_b,
    ):
        started = time.monotonic()
        answers = [
            post(w, tokens.ingest_readings, 1) for _ in range(15) for w in (worker_a, worker_b)
        ]
        elapsed = time.monotonic() - started
    admitted = sum(a.status_code == 202 for a in answers)
    assert {a.status_code for a in answers} == {202, 429}
    assert 10 <= admitted <= 10 + math.ceil(elapsed * 1)


def test_limits_hold_across_two_live_servers(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    env = {"LAKEHOUSE_RATE_LIMIT_ROWS_PER_S": "2", "LAKEHOUSE_RATE_LIMIT_BURST_S": "5"}
    servers = []
    try:
        for i in range(2):
            port = free_port()
            log = tmp_path / f"api{i}.log"
            proc = start_lakehouse(
                ["api", "--host", "127.0.0.1", "--port", str(port)], data_dir, log, **env
            )
            servers.append((proc, f"http://127.0.0.1:{port}", log))
        for proc, base, log in servers:
            wait_healthy(base, proc, log)
        clients = [httpx.Client(base_url=base, timeout=30) for _, base, _ in servers]
        counts = [0, 0]
        started = time.monotonic()
        for _ in range(20):
            for i, client in enumerate(clients):
                answer = post(client, tokens.ingest_readings, 1)
                assert answer.status_code in (202, 429), answer.text
                counts[i] += answer.status_code == 202
                if answer.status_code == 429:
                    assert int(answer.headers["retry-after"]) >= 1
                    assert answer.headers["x-ratelimit-limit"] == "10"
        elapsed = time.monotonic() - started
        for client in clients:
            client.close()
    finally:
        for proc, _, _ in servers:
            stop(proc)
    # One bucket of 10 rows plus 2 rows/s between both processes (each alone would admit 10).
    assert all(counts), counts
    assert 10 <= sum(counts) <= 10 + math.ceil(elapsed * 2), (counts, elapsed)


def test_per_request_cost_is_well_under_a_millisecond(tmp_path: Path) -> None:
    limiter = RateLimiter(tmp_path / "ratelimits.sqlite", 1e9, 1e12, 10)
    token = TokenRecord(
        name="bench", scopes=["ingest:*"], sha256="0" * 64, created_at=datetime.now(UTC)
    )
    limiter.check(token, "readings", 1, 100)  # opens the database
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        decision = limiter.check(token, "readings", 100, 10_000)
        assert decision is not None and decision.admitted
    per_request = (time.perf_counter() - started) / n
    print(f"rate check: {per_request * 1e6:.1f} us per request")
    assert per_request < 0.5e-3
    limiter.close()


def test_a_busy_limiter_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    # A bucket of 1000 rows refilled at 0.01 row/s: no visible refill during the test.
    limiter = RateLimiter(tmp_path / "ratelimits.sqlite", 0.01, None, 100_000)
    token = TokenRecord(
        name="t", scopes=["ingest:*"], sha256="0" * 64, created_at=datetime.now(UTC)
    )
    assert limiter.check(token, "readings", 1, 10) is not None  # opens the database

    async def run(other: Any) -> Any:
        check = asyncio.create_task(charge_ingest(limiter, token, "readings", rows=1, nbytes=10))
        ticks = 0
        for _ in range(10):  # the loop keeps running while the check waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10 and not check.done()
        fcntl.flock(other, fcntl.LOCK_UN)  # the other process's check ends
        return await asyncio.wait_for(check, 10)

    # Another process's check holds the lock (flock: per open file, so this open conflicts).
    with open(limiter.path.with_suffix(".lock"), "ab") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        decision = asyncio.run(run(other))
    assert decision is not None and decision.admitted
    assert decision.headers["X-RateLimit-Remaining"] == "998"
    limiter.close()
