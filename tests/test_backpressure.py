"""Back-pressure: 503 + Retry-After over the landing bounds, 507 when the disk is full.

The 503s are provoked with tiny bounds (backlog files/bytes) or a huge free-space
minimum against the real ``lakehouse api``; the 507 with a real full file system:
a 2 MiB tmpfs mounted on the landing directory (skipped where mounting is not
allowed). In every case nothing partial is visible and every acknowledged batch is
intact.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from tests.conftest import Tokens
from tests.helpers import running_api

NDJSON = {"Content-Type": "application/x-ndjson"}


def reading(i: int, payload: str = "") -> bytes:
    row = {"ts": "2026-11-20T10:00:00Z", "device_id": f"d{i}", "sensor": "t", "value": i}
    if payload:
        row["blob"] = payload
    return json.dumps(row).encode() + b"\n"


def visible(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["retry-after"]) > 0


def test_backlog_over_its_bound_is_503_until_the_processor_catches_up(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    env = {"LAKEHOUSE_MAX_BACKLOG_FILES": "3", "LAKEHOUSE_GROUP_COMMIT_MS": "0"}
    landing = data_dir / "landing" / "readings"
    with (
        running_api(data_dir, tmp_path / "api.log", **env) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens.admin}"}) as http,
    ):
        accepted = []
        for i in range(4):  # 4 files: one past the bound
            response = http.post("/v1/ingest/readings", content=reading(i), headers=NDJSON)
            assert response.status_code == 202
            accepted.append(response.json()["batch_id"])
        time.sleep(0.7)  # the measurement is cached for 0.5 s
        refused = http.post("/v1/ingest/readings", content=reading(9), headers=NDJSON)
        assert_refused(refused, "backlog_full")
        assert "LAKEHOUSE_MAX_BACKLOG_FILES=3" in refused.json()["error"]["message"]
        # Idempotent requests are refused too (nothing is read or written under pressure).
        keyed = http.post(
            "/v1/ingest/readings",
            content=reading(9),
            headers={**NDJSON, "Idempotency-Key": "k"},
        )
        assert_refused(keyed, "backlog_full")
        assert visible(landing) == sorted(f"{b}.parquet" for b in accepted)
        Processor(load_settings(data_dir=data_dir), load_contracts()).run_once()
        time.sleep(0.7)
        again = http.post("/v1/ingest/readings", content=reading(10), headers=NDJSON)
        assert again.status_code == 202, again.text
    bronze = pl.read_delta(str(data_dir / "bronze" / "readings"))
    assert sorted(bronze["device_id"].to_list()) == [f"d{i}" for i in range(4)]


def test_backlog_bytes_and_free_disk_bounds_are_503(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    headers = {**NDJSON, "Authorization": f"Bearer {tokens.admin}"}
    with running_api(data_dir, tmp_path / "a.log", LAKEHOUSE_MAX_BACKLOG_BYTES="1") as base:
        assert httpx.post(f"{base}/v1/ingest/readings", content=reading(1), headers=headers)
        time.sleep(0.7)
        refused = httpx.post(f"{base}/v1/ingest/readings", content=reading(2), headers=headers)
        assert_refused(refused, "backlog_full")
        assert "LAKEHOUSE_MAX_BACKLOG_BYTES" in refused.json()["error"]["message"]
    assert len(visible(data_dir / "landing" / "readings")) == 1
    huge = str(1024**3)  # a petabyte free: never true here
    with running_api(data_dir, tmp_path / "b.log", LAKEHOUSE_MIN_FREE_DISK_MB=huge) as base:
        refused = httpx.post(f"{base}/v1/ingest/readings", content=reading(3), headers=headers)
        assert_refused(refused, "disk_full")
        assert refused.headers["retry-after"] == "30"
        assert "LAKEHOUSE_MIN_FREE_DISK_MB" in refused.json()["error"]["message"]
    assert len(visible(data_dir / "landing" / "readings")) == 1
    assert list((data_dir / "landing" / "readings" / ".tmp").iterdir()) == []


@pytest.fixture
def tiny_landing(data_dir: Path) -> Iterator[Path]:
    """``data_dir/landing`` on a real 2 MiB tmpfs (needs root / CAP_SYS_ADMIN)."""
    landing = data_dir / "landing"
    landing.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(landing)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield landing
    finally:
        subprocess.run(["umount", "-l", str(landing)], check=False)


def test_a_full_landing_disk_is_507_with_nothing_partial_and_every_ack_intact(
    data_dir: Path, tokens: Tokens, tmp_path: Path, tiny_landing: Path
) -> None:
    env = {"LAKEHOUSE_MIN_FREE_DISK_MB": "0", "LAKEHOUSE_MAX_BODY_BYTES": str(4 * 1024**2)}
    acked: dict[str, list[int]] = {}  # batch id -> ids of its records (large bodies)
    grouped: list[tuple[str, int, int]] = []  # (batch id, first record, id) of small ones
    statuses: list[int] = []
    lock = threading.Lock()
    with running_api(data_dir, tmp_path / "api.log", **env) as base:
        headers = {**NDJSON, "Authorization": f"Bearer {tokens.admin}"}
        # Large batches (own files) of incompressible data until the disk is full.
        for n in range(30):
            ids = list(range(n * 100, n * 100 + 2))
            blob = base64.b64encode(os.urandom(90_000)).decode()
            response = httpx.post(
                f"{base}/v1/ingest/readings",
                content=b"".join(reading(i, blob) for i in ids),
                headers=headers,
                timeout=30,
            )
            statuses.append(response.status_code)
            if response.status_code == 202:
                acked[response.json()["batch_id"]] = ids
            else:
                assert response.status_code == 507, response.text
                assert response.json()["error"]["code"] == "insufficient_storage"
                assert response.headers["retry-after"] == "30"
        assert 507 in statuses and 202 in statuses

        # Concurrent small requests (group commit) against the full disk.
        def small(c: int) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
                for k in range(10):
                    i = 10_000 + c * 100 + k
                    blob = base64.b64encode(os.urandom(3_000)).decode()
                    response = http.post("/v1/ingest/readings", content=reading(i, blob))
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 202:
                            answer = response.json()
                            grouped.append((answer["batch_id"], answer["first_record"], i))
                        else:
                            assert response.status_code == 507, response.text

        threads = [threading.Thread(target=small, args=(c,)) for c in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    directory = tiny_landing / "readings"
    assert list((directory / ".tmp").iterdir()) == []  # no temp file left behind
    names = visible(directory)
    expected = {f"{b}.parquet" for b in acked} | {f"{b}.parquet" for b, _, _ in grouped}
    assert set(names) == expected  # nothing visible that was not acknowledged
    for batch, ids in acked.items():
        frame = pl.read_parquet(directory / f"{batch}.parquet")
        assert frame["device_id"].to_list() == [f"d{i}" for i in ids]
    for batch, first, i in grouped:
        frame = pl.read_parquet(directory / f"{batch}.parquet")
        assert frame.row(first, named=True)["device_id"] == f"d{i}"
