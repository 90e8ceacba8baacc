"""``lakehouse api --workers 2``: two processes behind one port share the landing zone.

Concurrent POSTs from threads all land exactly once (checked in the landing files
and in bronze); idempotent retries spread over both workers all get one batch id.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import httpx
import polars as pl

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from tests.conftest import Tokens
from tests.helpers import free_port, start_lakehouse, stop, wait_healthy, wait_until

NDJSON = {"Content-Type": "application/x-ndjson"}


def reading(i: int) -> bytes:
    return json.dumps(
        {"ts": "2026-11-20T10:00:00Z", "device_id": f"d{i}", "sensor": "t", "value": i}
    ).encode()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_two_workers_land_everything_once_and_share_idempotency(
    data_dir: Path, tokens: Tokens, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "api.log"
    proc = start_lakehouse(
        ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], data_dir, log
    )
    base = f"http://127.0.0.1:{port}"
    plain: dict[int, dict[str, object]] = {}
    keyed: dict[str, set[str]] = {}
    replays = Counter[str]()
    errors: list[str] = []
    lock = threading.Lock()
    try:
        wait_healthy(base, proc, log)
        wait_until(lambda: len(children(proc.pid)) >= 2, timeout=30)
        clients = 16

        def client(c: int) -> None:
            # A new connection per request spreads the requests over both workers.
            http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=60)
            for k in range(25):
                i = c * 1000 + k
                headers = {**NDJSON, "Authorization": f"Bearer {tokens.ingest_readings}"}
                response = http.post(
                    f"{base}/v1/ingest/readings", content=reading(i), headers=headers
                )
                key = f"key-{k % 10}"  # every client retries the same 10 keys
                retried = http.post(
                    f"{base}/v1/ingest/readings",
                    content=reading(10**6 + k % 10),
                    headers={**headers, "Idempotency-Key": key},
                )
                with lock:
                    for r in (response, retried):
                        if r.status_code != 202:
                            errors.append(r.text)
                    plain[i] = response.json()
                    keyed.setdefault(key, set()).add(retried.json()["batch_id"])
                    if retried.headers.get("idempotent-replayed") != "true":
                        replays[key] += 1
            http.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(children(proc.pid)) >= 2  # both workers still serve
    finally:
        stop(proc)
    assert errors == []
    assert all(len(batches) == 1 for batches in keyed.values()), keyed
    assert replays == Counter({key: 1 for key in keyed})  # one writer per key
    assert len(plain) == 16 * 25

    directory = data_dir / "landing" / "readings"
    assert list((directory / ".tmp").iterdir()) == []
    files = {p.stem for p in directory.glob("*.parquet")}
    batches = {str(a["batch_id"]) for a in plain.values()}
    assert files == batches | {b for bs in keyed.values() for b in bs}
    Processor(load_settings(data_dir=data_dir), load_contracts()).run_once()
    bronze = pl.read_delta(str(data_dir / "bronze" / "readings"))
    counts = Counter(bronze["device_id"].to_list())
    expected = Counter(f"d{i}" for i in plain) + Counter(f"d{10**6 + k}" for k in range(10))
    assert counts == expected
