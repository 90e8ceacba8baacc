"""Idempotency-Key on ``POST /v1/ingest/{source}``: a retry never lands twice.

Against the real ``lakehouse api``: retries across a restart, racing retries, a key
reused with another body (409), bad header values (400), writers that died with a
reservation pending (completed or taken over), and a source without key columns
(silver de-duplication cannot help there) counted in bronze.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from landing_zone.idempotency import IdempotencyStore, ReservationLost
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.conftest import Tokens
from tests.helpers import running_api

NDJSON = {"Content-Type": "application/x-ndjson"}


def body(*ids: int) -> bytes:
    return b"".join(
        json.dumps(
            {"ts": "2026-11-20T10:00:00Z", "device_id": f"d{i}", "sensor": "t", "value": i}
        ).encode()
        + b"\n"
        for i in ids
    )


def landed(data_dir: Path, source: str = "readings") -> list[str]:
    directory = data_dir / "landing" / source
    return sorted(p.name for p in directory.glob("*.parquet")) if directory.is_dir() else []


def post(
    base: str, token: str, data: bytes, key: str | None, source: str = "readings"
) -> httpx.Response:
    headers = {**NDJSON, "Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{base}/v1/ingest/{source}", content=data, headers=headers, timeout=60)


def test_retry_returns_the_first_answer_also_after_a_restart(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    with running_api(data_dir, log) as base:
        first = post(base, tokens.ingest_readings, body(1, 2, 3), "order-1")
        assert first.status_code == 202, first.text
        answer = first.json()
        assert answer["records"] == 3 and answer["first_record"] == 0
        assert "idempotent-replayed" not in first.headers
        again = post(base, tokens.ingest_readings, body(1, 2, 3), "order-1")
        assert again.status_code == 202 and again.json() == answer
        assert again.headers["idempotent-replayed"] == "true"
        assert landed(data_dir) == [f"{answer['batch_id']}.parquet"]
    with running_api(data_dir, log) as base:  # a new server process: the key is remembered on disk
        retry = post(base, tokens.ingest_readings, body(1, 2, 3), "order-1")
        assert retry.status_code == 202 and retry.json() == answer
        assert retry.headers["idempotent-replayed"] == "true"
        # The same key with another body: 409, naming the key; nothing written.
        other = post(base, tokens.ingest_readings, body(1, 2), "order-1")
        assert other.status_code == 409, other.text
        error = other.json()["error"]
        assert error["code"] == "idempotency_key_reused" and "'order-1'" in error["message"]
        assert error["batch_id"] == answer["batch_id"]
        # Keys are per token: another token's "order-1" is its own key.
        mine = post(base, tokens.ingest_all, body(9), "order-1")
        assert mine.status_code == 202 and mine.json()["batch_id"] != answer["batch_id"]
        # Without a key every request lands (no de-duplication is implied).
        plain = [post(base, tokens.ingest_readings, body(1, 2, 3), None) for _ in range(2)]
        assert all(r.status_code == 202 for r in plain)
    assert len(landed(data_dir)) == 4


def test_invalid_keys_are_400_and_land_nothing(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    with running_api(data_dir, tmp_path / "api.log") as base:
        headers = {**NDJSON, "Authorization": f"Bearer {tokens.ingest_readings}"}
        cases: list[Any] = ["", "k" * 256, "caf\xe9".encode("latin-1"), "tab\there"]
        for value in cases:
            response = httpx.post(
                f"{base}/v1/ingest/readings",
                content=body(1),
                headers=[*headers.items(), ("Idempotency-Key", value)],
                timeout=30,
            )
            assert response.status_code == 400, (value, response.text)
            assert response.json()["error"]["code"] == "invalid_idempotency_key"
        ok = post(base, tokens.ingest_readings, body(1), "k" * 255)
        assert ok.status_code == 202
        assert post(base, tokens.ingest_readings, body(1), "~ !x").status_code == 202
    assert len(landed(data_dir)) == 2


def test_racing_retries_land_one_batch_and_share_its_answer(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    racers = 12
    with running_api(data_dir, tmp_path / "api.log") as base:
        for round_ in range(5):
            barrier = threading.Barrier(racers)
            answers: list[httpx.Response] = []
            lock = threading.Lock()

            def racer(
                round_: int = round_,
                barrier: threading.Barrier = barrier,
                answers: list[httpx.Response] = answers,
                lock: threading.Lock = lock,
            ) -> None:
                with httpx.Client(timeout=60) as client:
                    barrier.wait()
                    response = client.post(
                        f"{base}/v1/ingest/readings",
                        content=body(round_, round_ + 100),
                        headers={
                            **NDJSON,
                            "Authorization": f"Bearer {tokens.ingest_readings}",
                            "Idempotency-Key": f"race-{round_}",
                        },
                    )
                with lock:
                    answers.append(response)

            threads = [threading.Thread(target=racer) for _ in range(racers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [r.status_code for r in answers] == [202] * racers, [r.text for r in answers]
            assert len({r.json()["batch_id"] for r in answers}) == 1
            fresh = [r for r in answers if "idempotent-replayed" not in r.headers]
            assert len(fresh) == 1  # exactly one request wrote; the others replayed it
    files = landed(data_dir)
    assert len(files) == 5
    for name in files:
        assert pl.read_parquet(data_dir / "landing" / "readings" / name).height == 2


def _store(data_dir: Path, **kwargs: Any) -> IdempotencyStore:
    return IdempotencyStore(
        data_dir / "_meta" / "idempotency.sqlite", LandingLayout(data_dir), **kwargs
    )


def _kill_owner(data_dir: Path, key: str) -> None:
    """Make a pending reservation look like one of a writer that died (no such pid)."""
    with sqlite3.connect(data_dir / "_meta" / "idempotency.sqlite") as conn:
        conn.execute(
            "UPDATE idempotency SET owner = ? WHERE key = ?",
            (f"{socket.gethostname()}:4194305:1:dead", key),
        )


def test_a_dead_writers_reservation_is_completed_or_taken_over(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    """The writer died after reserving: with its file durable (died after the rename),
    a retry completes the entry and answers its batch; without it, the retry writes
    under the reserved batch id. Either way exactly one file."""
    import hashlib

    store = _store(data_dir)
    sha = lambda data: hashlib.sha256(b"ndjson\0" + data).hexdigest()  # noqa: E731
    published = store.reserve("sensors", "readings", "crashed-after-rename", sha(body(1)), 1)
    lost = store.reserve("sensors", "readings", "crashed-before-rename", sha(body(2)), 1)
    assert published.status == lost.status == "reserved"
    from landing_zone.formats import decode_batch

    LandingWriter(LandingLayout(data_dir)).write_frame(
        "readings", decode_batch(body(1), "ndjson"), batch_id=published.batch_id
    )
    _kill_owner(data_dir, "crashed-after-rename")
    _kill_owner(data_dir, "crashed-before-rename")
    store.close()
    with running_api(data_dir, tmp_path / "api.log") as base:
        done = post(base, tokens.ingest_readings, body(1), "crashed-after-rename")
        assert done.status_code == 202 and done.json()["batch_id"] == published.batch_id
        assert done.headers["idempotent-replayed"] == "true"
        taken = post(base, tokens.ingest_readings, body(2), "crashed-before-rename")
        assert taken.status_code == 202 and taken.json()["batch_id"] == lost.batch_id
        again = post(base, tokens.ingest_readings, body(2), "crashed-before-rename")
        assert again.json()["batch_id"] == lost.batch_id
    assert landed(data_dir) == sorted([f"{published.batch_id}.parquet", f"{lost.batch_id}.parquet"])


def test_store_leases_takeover_guard_and_expiry(data_dir: Path) -> None:
    now = [1000.0]
    store = _store(data_dir, window_s=100.0, lease_s=10.0, clock=lambda: now[0])
    first = store.reserve("t", "readings", "k", "sha-a", 2)
    assert first.status == "reserved"
    assert store.reserve("t", "readings", "k", "sha-a", 2).status == "pending"
    assert store.reserve("t", "readings", "k", "sha-b", 2).status == "conflict"
    now[0] += 11  # the first writer stalled past its lease: taken over, same batch id
    second = store.reserve("t", "readings", "k", "sha-a", 2)
    assert second.status == "reserved" and second.batch_id == first.batch_id
    assert second.owner != first.owner
    layout = LandingLayout(data_dir)
    writer = LandingWriter(layout)
    frame = pl.DataFrame({"a": ["1", "2"]})
    # The stalled first writer wakes up: its publish is refused and nothing is visible.
    with pytest.raises(ReservationLost):
        writer.write_frame(
            "readings",
            frame,
            batch_id=first.batch_id,
            publish_guard=store.publish_guard("t", "readings", "k", first.owner),
        )
    assert not layout.batch_exists("readings", first.batch_id)
    assert list((data_dir / "landing" / "readings" / ".tmp").iterdir()) == []
    writer.write_frame(
        "readings",
        frame,
        batch_id=second.batch_id,
        publish_guard=store.publish_guard("t", "readings", "k", second.owner),
    )
    assert store.entry("t", "readings", "k")["state"] == "done"  # type: ignore[index]
    assert store.reserve("t", "readings", "k", "sha-a", 2).status == "done"
    # A failed write releases its reservation so a retry can write.
    failed = store.reserve("t", "readings", "k2", "sha-c", 1)
    store.release("t", "readings", "k2", failed.owner)
    assert store.entry("t", "readings", "k2") is None
    # After the window the key is free again, and purged.
    now[0] += 101
    assert store.purge_expired() == 1
    renewed = store.reserve("t", "readings", "k", "sha-other", 1)
    assert renewed.status == "reserved" and renewed.batch_id != first.batch_id


def test_keyless_source_gets_each_record_once_in_bronze(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    """An undeclared source (no contract, no key columns): only the key prevents doubles."""
    env = {"LAKEHOUSE_AUTO_CREATE_SOURCES": "true"}
    sent = [json.dumps({"event": f"e{i}", "n": i}).encode() + b"\n" for i in range(6)]
    log = tmp_path / "api.log"
    with running_api(data_dir, log, **env) as base:
        for i, data in enumerate(sent):
            assert post(base, tokens.ingest_all, data, f"evt-{i}", "events").status_code == 202
    with running_api(data_dir, log, **env) as base:  # every request retried after a restart, twice
        for _ in range(2):
            for i, data in enumerate(sent):
                retry = post(base, tokens.ingest_all, data, f"evt-{i}", "events")
                assert retry.status_code == 202
                assert retry.headers["idempotent-replayed"] == "true"
    settings = load_settings(data_dir=data_dir, auto_create_sources=True)
    Processor(settings, load_contracts()).run_once()
    bronze = pl.read_delta(str(data_dir / "bronze" / "events"))
    assert sorted(bronze["event"].to_list()) == [f"e{i}" for i in range(6)]


def test_waiting_racer_takes_over_when_the_winner_fails(data_dir: Path) -> None:
    """release() frees the key: the next reserve writes (it is not stuck pending)."""
    store = _store(data_dir)
    winner = store.reserve("t", "readings", "k", "s", 1)
    assert store.reserve("t", "readings", "k", "s", 1).status == "pending"
    store.release("t", "readings", "k", winner.owner)
    started = time.monotonic()
    assert store.reserve("t", "readings", "k", "s", 1).status == "reserved"
    assert time.monotonic() - started < 1


def test_a_replay_is_not_charged_to_the_rate_limit(data_dir: Path, tokens: Tokens) -> None:
    """A retry answers what was already paid for: no 429 for an acknowledged batch."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = load_settings(data_dir=data_dir, rate_limit_rows_per_s=0.1, rate_limit_burst_s=30)
    client = TestClient(create_app(settings))  # a bucket of 3 rows, refilled every 10 s
    headers = {**NDJSON, "Authorization": f"Bearer {tokens.ingest_readings}"}
    first = client.post(
        "/v1/ingest/readings", content=body(1, 2, 3), headers={**headers, "Idempotency-Key": "k1"}
    )
    assert first.status_code == 202, first.text
    for _ in range(3):
        again = client.post(
            "/v1/ingest/readings",
            content=body(1, 2, 3),
            headers={**headers, "Idempotency-Key": "k1"},
        )
        assert again.status_code == 202, again.text
        assert again.json()["batch_id"] == first.json()["batch_id"]
    # New data is charged: the bucket is empty now; the refused key stays free.
    refused = client.post(
        "/v1/ingest/readings", content=body(4), headers={**headers, "Idempotency-Key": "k2"}
    )
    assert refused.status_code == 429
    assert len(landed(data_dir)) == 1


def test_abandoned_reservations_expire_with_the_window(data_dir: Path) -> None:
    clock = [1000.0]
    store = _store(data_dir, window_s=60, clock=lambda: clock[0])
    reserved = store.reserve("t", "readings", "k", "sha-1", 1)
    assert reserved.status == "reserved"
    _kill_owner(data_dir, "k")  # its writer died without writing
    clock[0] += 61  # past the window (and the lease)
    again = store.reserve("t", "readings", "k", "sha-2", 1)  # another body: the key is free
    assert again.status == "reserved"
