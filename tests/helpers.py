"""Shared test helpers: real servers on free loopback ports, polling, reference results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import polars as pl
import pytest
from deltalake import DeltaTable

from config.contracts import load_contracts
from delta_processing.gold import gold_frame

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
LAKEHOUSE = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last probe: {last!r})")


def wait_listening(
    proc: subprocess.Popen[bytes],
    name: str,
    host: str,
    ports: list[int],
    output: Callable[[], str],
    timeout: float = 15.0,
) -> None:
    """Wait until ``proc`` accepts TCP connections on every one of ``ports``.

    Fails with ``output()`` (the server's log) if it exits or does not listen in time.
    """
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{output()}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen on {port}:\n{output()}") from None
                time.sleep(0.05)


def lakehouse_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env.update({"LAKEHOUSE_DATA_DIR": str(data_dir), "LAKEHOUSE_LOG_LEVEL": "WARNING"})
    env["COLUMNS"] = "250"  # rich tables: no truncation in captured output
    env.update(extra)
    return env


def start_lakehouse(
    args: list[str], data_dir: Path, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """Start ``lakehouse <args>`` as a real subprocess writing its output to ``log``."""
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [*LAKEHOUSE, *args],
        cwd=REPO,
        env=lakehouse_env(data_dir, **env),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def probe() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(probe, timeout=60)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_api(data_dir: Path, log: Path, **env: str) -> Iterator[str]:
    """A real `lakehouse api` on a free loopback port; yields its base URL, stops it after."""
    port = free_port()
    proc = start_lakehouse(
        ["api", "--host", "127.0.0.1", "--port", str(port)], data_dir, log, **env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base
    finally:
        stop(proc)


def reference_gold(silver: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Every readings gold table recomputed from scratch out of silver rows."""
    contract = load_contracts()["readings"]
    return {spec.name: gold_frame(silver, spec, contract) for spec in contract.gold}


def read_sorted(path: Path, keys: list[str]) -> pl.DataFrame:
    return pl.read_delta(str(path)).sort(keys)


def land_records(
    data_dir: Path,
    source: str,
    rows: list[dict[str, object]],
    correlation_id: str | None = None,
) -> str:
    """Land ``rows`` for ``source`` as one NDJSON batch, as the API would; the file name."""
    from landing_zone.formats import decode_batch
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter

    body = b"\n".join(json.dumps(r).encode() for r in rows)
    receipt = LandingWriter(LandingLayout(data_dir)).write_frame(
        source, decode_batch(body, "ndjson"), correlation_id=correlation_id
    )
    return receipt.path.name


def count_change_feed_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the end version of every change feed read silver makes (from now on)."""
    import delta_processing.silver as silver_module

    reads: list[int] = []
    real_read_changes = silver_module.read_changes

    def counting(table: DeltaTable, start: int, end: int) -> pl.DataFrame:
        reads.append(end)
        return real_read_changes(table, start, end)

    monkeypatch.setattr(silver_module, "read_changes", counting)
    return reads
