"""Group commit: concurrent small requests share landing files; each 202 is durable.

Against the real ``lakehouse api`` (default settings: group commit on): every
acknowledged record is found exactly once, at the position its answer names, in
the landing file its answer names; then exactly once in bronze. Unit tests of
:class:`GroupCommitter` cover a failing write (no waiter acknowledged, nothing
visible) and groups of differently shaped frames.
"""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from config.contracts import load_contracts
from config.settings import load_settings
from delta_processing.processor import Processor
from landing_zone.formats import decode_batch
from landing_zone.group_commit import GroupCommitter
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriteError, LandingWriter, correlation_ids_of
from tests.conftest import LiveServer, Tokens

NDJSON = {"Content-Type": "application/x-ndjson"}


def record(i: int) -> bytes:
    return json.dumps(
        {
            "ts": f"2026-11-20T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "device_id": f"dev-{i}",
            "sensor": "temp",
            "value": i,
        }
    ).encode()


def test_concurrent_small_requests_share_files_and_every_ack_is_durable(
    live_api: LiveServer, tokens: Tokens
) -> None:
    clients, per_client = 24, 25
    acks: dict[int, dict[str, object]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        with live_api.client(tokens.ingest_readings) as http:
            barrier.wait()
            for n in range(per_client):
                i = index * per_client + n
                response = http.post(
                    "/v1/ingest/readings",
                    content=record(i),
                    headers={**NDJSON, "X-Correlation-ID": f"req-{i}"},
                )
                with lock:
                    if response.status_code == 202:
                        acks[i] = response.json()
                    else:
                        failures.append(response.text)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(acks) == clients * per_client

    directory = live_api.data_dir / "landing" / "readings"
    files = {p.stem: p for p in directory.glob("*.parquet")}
    assert list((directory / ".tmp").iterdir()) == []
    assert set(files) == {str(a["batch_id"]) for a in acks.values()}
    assert len(files) < len(acks)  # requests really shared files
    frames = {batch: pl.read_parquet(path) for batch, path in files.items()}
    assert sum(f.height for f in frames.values()) == len(acks)
    for i, ack in acks.items():
        assert ack["records"] == 1
        frame = frames[str(ack["batch_id"])]
        row = frame.row(int(str(ack["first_record"])), named=True)
        assert row["device_id"] == f"dev-{i}", (i, ack)
    for batch, path in files.items():
        ids = correlation_ids_of(path.read_bytes(), path.name)
        expected = [
            f"req-{i}"
            for i, ack in sorted(acks.items(), key=lambda kv: int(str(kv[1]["first_record"])))
            if ack["batch_id"] == batch
        ]
        assert ids == expected

    settings = load_settings(data_dir=live_api.data_dir)
    Processor(settings, load_contracts()).run_once()
    bronze = pl.read_delta(str(live_api.data_dir / "bronze" / "readings"))
    counts = Counter(bronze["device_id"].to_list())
    assert counts == Counter(f"dev-{i}" for i in acks)


def test_large_bodies_keep_their_own_file(live_api: LiveServer, tokens: Tokens) -> None:
    big = b"\n".join(record(i) for i in range(1000))  # > 64 KiB
    assert len(big) > 64 * 1024
    with live_api.client(tokens.ingest_readings) as http:
        answer = http.post("/v1/ingest/readings", content=big, headers=NDJSON).json()
    assert answer["records"] == 1000 and answer["first_record"] == 0
    path = live_api.data_dir / "landing" / "readings" / f"{answer['batch_id']}.parquet"
    assert pl.read_parquet(path).height == 1000


class _FailingWriter(LandingWriter):
    def write_frame(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        raise LandingWriteError(errno.ENOSPC, "no space left (injected)")


def test_a_failed_group_write_fails_every_waiter_and_leaves_nothing(tmp_path: Path) -> None:
    committer = GroupCommitter(_FailingWriter(LandingLayout(tmp_path)), window_s=0.05)

    async def run() -> list[BaseException | object]:
        frames = [pl.DataFrame({"a": [str(i)]}) for i in range(10)]
        return await asyncio.gather(
            *(committer.submit("readings", f, None, 10) for f in frames), return_exceptions=True
        )

    results = asyncio.run(run())
    committer.close()
    assert all(isinstance(r, LandingWriteError) and r.errno == errno.ENOSPC for r in results)
    assert not (tmp_path / "landing" / "readings").exists() or not list(
        (tmp_path / "landing" / "readings").glob("*.parquet")
    )


def test_groups_concatenate_different_shapes_in_arrival_order(tmp_path: Path) -> None:
    layout = LandingLayout(tmp_path)
    committer = GroupCommitter(LandingWriter(layout), window_s=0.05, max_rows=1000)
    frames = [
        pl.DataFrame({"a": ["1"], "b": ["x"]}),
        decode_batch(b"{}\n{}", "ndjson"),  # records without fields: rows, no columns
        pl.DataFrame({"c": ["2", "3"]}),
        pl.DataFrame({"a": ["4"], "c": ["5"]}),
    ]

    async def run() -> list[object]:
        return list(
            await asyncio.gather(
                *(committer.submit("readings", f, f"cid-{n}", 10) for n, f in enumerate(frames))
            )
        )

    receipts = asyncio.run(run())
    committer.close()
    assert len({r.batch_id for r in receipts}) == 1  # type: ignore[attr-defined]
    assert [r.first_record for r in receipts] == [0, 1, 3, 5]  # type: ignore[attr-defined]
    path = next((tmp_path / "landing" / "readings").glob("*.parquet"))
    frame = pl.read_parquet(path)
    assert frame.to_dicts() == [
        {"a": "1", "b": "x", "c": None},
        {"a": None, "b": None, "c": None},
        {"a": None, "b": None, "c": None},
        {"a": None, "b": None, "c": "2"},
        {"a": None, "b": None, "c": "3"},
        {"a": "4", "b": None, "c": "5"},
    ]
    assert correlation_ids_of(path.read_bytes(), path.name) == [f"cid-{n}" for n in range(4)]


@pytest.mark.parametrize("max_rows", [1, 3])
def test_size_bound_flushes_a_group_early(tmp_path: Path, max_rows: int) -> None:
    committer = GroupCommitter(
        LandingWriter(LandingLayout(tmp_path)), window_s=10.0, max_rows=max_rows
    )

    async def run() -> list[object]:
        frames = [pl.DataFrame({"a": [str(i)]}) for i in range(6)]
        return list(
            await asyncio.wait_for(
                asyncio.gather(*(committer.submit("readings", f, None, 1) for f in frames)), 5
            )
        )

    receipts = asyncio.run(run())
    committer.close()
    assert sum(r.records for r in receipts) == 6  # type: ignore[attr-defined]
    assert len(list((tmp_path / "landing" / "readings").glob("*.parquet"))) >= 6 // max_rows
