"""Landing disk full: refused with 507/503, nothing partial visible, nothing acknowledged lost.

The landing zone is a 4 MiB tmpfs mounted over ``<data dir>/landing`` (root only).
Without the privilege to mount, a quota on the landing writer's ``open`` raises
``ENOSPC`` once 4 MiB were written, which exercises the same code path.

Two ways of running out: with back-pressure off (``min_free_disk_mb=0``) the writes
themselves hit ``ENOSPC`` and the API answers ``507``; with a free-space bound the
API refuses with ``503`` before writing (a burst within the measurement interval may
still meet ``ENOSPC``: ``507``). Either way every acknowledged batch is one complete,
readable landing file, no temporary file is left, and once the processor has drained
the landing zone ingestion resumes and every acknowledged record reaches silver once.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient

import landing_zone.writer as writer_module
from api.app import create_app
from api.tokens import TokenStore
from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from tests.reliability.chaos import REPORT

SIZE = 4 * 1024 * 1024


class _Quota:
    """Byte quota over the files the landing writer creates (the no-mount fallback)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned
        return _QuotaFile(handle, self) if ("x" in mode or "w" in mode) else handle


class _QuotaFile:
    def __init__(self, handle: Any, quota: _Quota) -> None:
        self._handle = handle
        self._quota = quota

    def write(self, data: Any) -> int:
        size = len(memoryview(data))
        if self._quota.used + size > self._quota.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._quota.used += size
        return int(self._handle.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _QuotaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


@pytest.fixture
def small_landing(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Quota | None]:
    """A 4 MiB landing file system: a tmpfs (``None``), else a write quota."""
    landing = data_dir / "landing"
    landing.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(landing)],
        capture_output=True,
    ).returncode == 0  # fmt: skip
    if mounted:
        try:
            yield None
        finally:
            if subprocess.run(["umount", str(landing)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(landing)], check=False)
        return
    quota = _Quota(SIZE)
    monkeypatch.setattr(writer_module, "open", quota.open, raising=False)
    yield quota


def _body(rids: range) -> bytes:
    # Random filler: the zstd landing file stays about as large as the body.
    return b"".join(
        json.dumps({"ts": f"2026-11-01T00:00:00.{r:06d}Z", "device_id": "df", "sensor": "s",
                    "value": r, "filler": secrets.token_hex(64)}).encode() + b"\n"
        for r in rids
    )  # fmt: skip


def _free_bytes(data_dir: Path) -> int:
    stat = os.statvfs(data_dir / "landing")
    return stat.f_bavail * stat.f_frsize


@pytest.mark.reliability
@pytest.mark.parametrize("min_free_disk_mb", [0, 1], ids=["enospc", "free-space-bound"])
def test_full_landing_disk_refuses_cleanly_and_loses_nothing(
    data_dir: Path, small_landing: _Quota | None, min_free_disk_mb: int
) -> None:
    if small_landing is not None and min_free_disk_mb:
        pytest.skip("a free-space bound needs a real (tmpfs) file system")
    settings = load_settings(
        data_dir=data_dir, min_free_disk_mb=min_free_disk_mb, trigger_latency_ms=0,
        file_settle_ms=0,
    )  # fmt: skip
    token = TokenStore(settings.tokens_file).create("t", ["ingest:readings"])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
    acked: dict[str, range] = {}  # batch id -> its records
    refusals: list[tuple[int, dict[str, Any]]] = []
    next_rid = 0
    with TestClient(create_app(settings)) as client:
        for _ in range(400):
            rids = range(next_rid, next_rid + 300)
            next_rid += 300
            response = client.post("/v1/ingest/readings", content=_body(rids), headers=headers)
            if response.status_code == 202:
                acked[response.json()["batch_id"]] = rids
                if min_free_disk_mb and _free_bytes(data_dir) < 2 * min_free_disk_mb * 2**20:
                    # Near the bound: let the API's cached measurement (0.5 s) expire, or a
                    # fast client fills the rest of the disk between two measurements.
                    time.sleep(0.6)
                continue
            assert response.status_code in (503, 507), response.text
            assert "Retry-After" in response.headers
            refusals.append((response.status_code, response.json()["error"]))
            if len(refusals) >= 5:
                break
        assert len(acked) >= 3, "the landing disk filled up before anything was accepted"
        assert len(refusals) == 5, f"never refused: {len(acked)} batches accepted"
        codes = {error["code"] for _, error in refusals}
        statuses = {status for status, _ in refusals}
        REPORT.append(f"disk full ({'4 MiB tmpfs' if small_landing is None else 'quota'}, "
                      f"min_free_disk_mb={min_free_disk_mb}): accepted={len(acked)} "
                      f"refused={sorted(statuses)} codes={sorted(codes)}")  # fmt: skip
        if min_free_disk_mb == 0:
            assert statuses == {507} and codes == {"insufficient_storage"}, refusals
        else:  # the bound refuses before the disk is full
            assert statuses == {503} and codes == {"disk_full"}, refusals
        for _, error in refusals:
            assert any(word in error["message"] for word in ("space", "free")), error

        # Nothing partial is visible: exactly the acknowledged files, each complete.
        source_dir = data_dir / "landing" / "readings"
        visible = sorted(p.name for p in source_dir.iterdir() if not p.name.startswith("."))
        assert visible == sorted(f"{batch}.parquet" for batch in acked)
        for batch, rids in acked.items():
            frame = pl.read_parquet(source_dir / f"{batch}.parquet")
            assert frame["value"].cast(pl.Int64).to_list() == list(rids)
        temp = source_dir / ".tmp"
        assert not temp.exists() or list(temp.iterdir()) == [], "temporary files left behind"

        # The processor drains the landing zone (archive and tables are on the big disk)...
        assert Processor(settings, load_contracts()).run_once().failures == []
        if small_landing is not None:
            small_landing.used = 0  # the quota's way of freeing the space
        time.sleep(0.6)  # past the back-pressure measurement cache
        # ... and ingestion resumes.
        rids = range(next_rid, next_rid + 300)
        response = client.post("/v1/ingest/readings", content=_body(rids), headers=headers)
        assert response.status_code == 202, response.text
        acked[response.json()["batch_id"]] = rids

    assert Processor(settings, load_contracts()).run_once().failures == []
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    expected = sorted(r for rids in acked.values() for r in rids)
    assert sorted(silver["value"].cast(pl.Int64).to_list()) == expected
