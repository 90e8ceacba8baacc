#!/usr/bin/env python
"""Freshness: time from the API's 202 to the rows being visible in gold.readings_hourly.

    .venv/bin/python bench/freshness_bench.py                 # 50k rows/s for 60 s, 3 runs
    .venv/bin/python bench/freshness_bench.py --quick         # 10k rows/s for 10 s, 1 run
    .venv/bin/python bench/freshness_bench.py --rate 20000 --duration 30 --runs 1

An open-loop load generator (threads, one keep-alive httpx client each) POSTs NDJSON
batches of ``--batch-rows`` readings at ``--rate`` rows/s to a real ``lakehouse up``
(subprocess, default settings). Every batch carries its own device id, so it makes its
own ``(device_id, sensor, hour)`` groups in gold; a poller in this process re-reads
``gold/readings_hourly`` with deltalake every ``--poll-ms`` and notes when the batch's
counts sum to its size. Freshness = first poll that saw the batch complete - the 202.

Baseline, same load, same poller: ``bench/bare_asgi.py`` (write + fsync each body, 202)
and a bare loop that appends every complete body straight to one Delta table
(``polars.read_ndjson`` + ``write_deltalake``, no bronze/silver/gold, no trigger delay):
the floor of "acknowledged" to "queryable in Delta" on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
from common import (
    LAKEHOUSE,
    REPO,
    RESULTS_DIR,
    Figure,
    Target,
    free_port,
    lakehouse_env,
    log,
    peak_rss_mib,
    percentile,
    render,
    sigterm_as_exit,
    spawn,
    stop,
    tail,
    wait_for,
    write_results,
)

SECTION = "freshness"
SOURCE = "readings"
GOLD = ("gold", "readings_hourly")


@dataclass
class Batch:
    index: int
    device: str
    rows: int
    sent: float = 0.0
    acked: float = 0.0  # monotonic time of the 202
    seen: float = 0.0  # monotonic time of the first poll that saw every row


@dataclass
class RunResult:
    freshness_s: list[float]
    post_ms: list[float]
    rows_acked: int
    seconds: float
    unseen: int
    poll_ms: list[float] = field(default_factory=list)
    rss_mib: float = float("nan")

    @property
    def rate(self) -> float:
        return self.rows_acked / self.seconds if self.seconds else 0.0


def batch_body(batch: Batch, at: datetime) -> bytes:
    """``batch.rows`` readings of one new device, one per millisecond ending at ``at``."""
    start = at - timedelta(milliseconds=batch.rows)
    k = pl.int_range(0, batch.rows, dtype=pl.Int64)
    frame = pl.select(
        ts=(pl.lit(start) + pl.duration(milliseconds=k)).dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"),
        device_id=pl.lit(batch.device),
        sensor=pl.lit("temp"),
        value=(k % 1000).cast(pl.Float64) / 10,
    )
    return frame.write_ndjson().encode()


# ---------------------------------------------------------------------------- load + poll


def run_load(
    base_url: str,
    path: str,
    headers: dict[str, str],
    batches: list[Batch],
    interval: float,
    clients: int,
    failures: list[str],
) -> float:
    """POST every batch at its due time (open loop); return the seconds the load took."""
    t0 = time.monotonic() + 0.2

    def worker(index: int) -> None:
        try:
            with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
                for batch in batches[index::clients]:
                    due = t0 + batch.index * interval
                    body = batch_body(batch, datetime.now(UTC))
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    batch.sent = time.monotonic()
                    response = client.post(path, content=body)
                    if response.status_code != 202:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                    batch.acked = time.monotonic()
        except Exception as exc:  # reported by the caller
            failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The load lasts len(batches) intervals (the last batch opens the last interval).
    return max(max((b.acked for b in batches), default=t0) - t0, len(batches) * interval)


class Poller(threading.Thread):
    """Re-reads a Delta table every ``every`` seconds; marks batches whose rows are all in.

    ``mode="gold"``: the table is gold.readings_hourly (device_id, count per window);
    ``mode="raw"``: an append-only table of raw rows, read incrementally (new files only).
    """

    def __init__(self, table: Path, batches: list[Batch], every: float, mode: str) -> None:
        super().__init__(daemon=True, name=f"poller-{mode}")
        self.table, self.every, self.mode = table, every, mode
        self.by_device = {b.device: b for b in batches}
        self.pending = set(self.by_device)
        self.halt = threading.Event()
        self.read_ms: list[float] = []
        self.errors: list[str] = []
        self._raw_counts: dict[str, int] = {}
        self._raw_files: set[str] = set()

    def counts(self, dt: Any) -> dict[str, int]:
        if self.mode == "gold":
            frame = pl.read_delta(dt, columns=["device_id", "count"])
            grouped = frame.group_by("device_id").agg(pl.col("count").sum())
            return dict(zip(grouped["device_id"], grouped["count"], strict=True))
        new = [uri for uri in dt.file_uris() if uri not in self._raw_files]
        if new:
            frame = pl.read_parquet(new, columns=["device_id"]).group_by("device_id").len()
            for device, n in zip(frame["device_id"], frame["len"], strict=True):
                self._raw_counts[device] = self._raw_counts.get(device, 0) + n
            self._raw_files.update(new)
        return self._raw_counts

    def run(self) -> None:
        from deltalake import DeltaTable

        dt = None
        while not self.halt.is_set() and self.pending:
            start = time.monotonic()
            try:
                if dt is None:
                    if (self.table / "_delta_log").is_dir():
                        dt = DeltaTable(str(self.table))
                else:
                    dt.update_incremental()
                if dt is not None:
                    counts = self.counts(dt)
                    now = time.monotonic()
                    self.read_ms.append((now - start) * 1000)
                    for device in list(self.pending):
                        batch = self.by_device[device]
                        if batch.acked and counts.get(device, 0) >= batch.rows:
                            batch.seen = now
                            self.pending.discard(device)
            except Exception as exc:  # a read racing a commit: try again next poll
                self.errors.append(repr(exc))
                dt = None
            time.sleep(max(0.0, self.every - (time.monotonic() - start)))


def measure(
    base_url: str,
    path: str,
    headers: dict[str, str],
    table: Path,
    mode: str,
    args: argparse.Namespace,
    run: int,
    rss_pid: int | None,
) -> RunResult:
    count = max(1, round(args.rate * args.duration / args.batch_rows))
    batches = [Batch(i, f"fr{run:02d}{mode[0]}{i:06d}", args.batch_rows) for i in range(count)]
    poller = Poller(table, batches, args.poll_ms / 1000, "gold" if mode == "lakehouse" else "raw")
    poller.start()
    failures: list[str] = []
    seconds = run_load(
        base_url, path, headers, batches, args.batch_rows / args.rate, args.clients, failures
    )
    if failures:
        poller.halt.set()
        raise RuntimeError("; ".join(failures[:3]))
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not poller.pending, args.drain_timeout, f"{mode}: rows visible", 0.1)
    poller.halt.set()
    poller.join(timeout=30)
    rss = peak_rss_mib(rss_pid) if rss_pid else float("nan")
    seen = [b for b in batches if b.seen]
    if poller.errors:
        log(f"{mode}: {len(poller.errors)} poll error(s), e.g. {poller.errors[0]}")
    return RunResult(
        freshness_s=[b.seen - b.acked for b in seen],
        post_ms=[(b.acked - b.sent) * 1000 for b in batches],
        rows_acked=sum(b.rows for b in batches if b.acked),
        seconds=seconds,
        unseen=len(batches) - len(seen),
        poll_ms=poller.read_ms,
        rss_mib=rss,
    )


# ---------------------------------------------------------------------------- the two systems


def run_lakehouse(workdir: Path, args: argparse.Namespace, run: int) -> RunResult:
    from api.tokens import TokenStore

    data_dir = workdir / f"lakehouse-{run}"
    data_dir.mkdir()
    token = TokenStore(data_dir / "_meta" / "tokens.json").create("bench", [f"ingest:{SOURCE}"])
    port = free_port()
    log_path = workdir / f"up-{run}.log"
    env = lakehouse_env(data_dir, LAKEHOUSE_MAX_BODY_BYTES=str(256 * 1024 * 1024))
    proc = spawn([*LAKEHOUSE, "up", "--port", str(port)], env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
        return measure(
            base,
            f"/v1/ingest/{SOURCE}",
            headers,
            data_dir.joinpath(*GOLD),
            "lakehouse",
            args,
            run,
            proc.pid,
        )
    finally:
        stop(proc)


def run_bare(workdir: Path, args: argparse.Namespace, run: int) -> RunResult:
    out_dir = workdir / f"bare-out-{run}"
    out_dir.mkdir()
    table = workdir / f"bare-table-{run}"
    port = free_port()
    env = {**os.environ, "BENCH_BARE_DIR": str(out_dir)}
    server_log = workdir / f"bare-asgi-{run}.log"
    ingest_log = workdir / f"bare-ingest-{run}.log"
    server = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_asgi:app",
            "--app-dir",
            str(REPO),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env,
        server_log,
    )
    ingester = spawn(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--bare-ingester",
            str(out_dir),
            str(table),
            str(args.batch_rows),
        ],
        env,
        ingest_log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server, server_log)
        headers = {"Content-Type": "application/x-ndjson"}
        return measure(base, "/ingest", headers, table, "bare", args, run, ingester.pid)
    finally:
        stop(server)
        stop(ingester)
        if ingester.returncode not in (0, -15, 143):
            log(f"bare ingester exited {ingester.returncode}:\n{tail(ingest_log)}")


def bare_ingester(out_dir: Path, table: Path, batch_rows: int) -> None:
    """Child: append every complete body in ``out_dir`` to one Delta table, then delete it.

    bare_asgi writes bodies in place (no temp-then-rename), so a body is taken only once
    it holds all ``batch_rows`` lines."""
    import signal

    from deltalake import write_deltalake

    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    while not halt.is_set():
        ready: list[tuple[str, bytes]] = []
        for entry in os.scandir(out_dir):
            with open(entry.path, "rb") as handle:
                data = handle.read()
            if data.count(b"\n") == batch_rows:
                ready.append((entry.path, data))
        if not ready:
            time.sleep(0.005)
            continue
        frame = pl.read_ndjson(io.BytesIO(b"".join(d for _, d in ready)))
        write_deltalake(
            str(table), frame.to_arrow(compat_level=pl.CompatLevel.oldest()), mode="append"
        )
        for path, _ in ready:
            os.unlink(path)


def wait_healthy(base_url: str, proc: Any, log_path: Path) -> None:
    def probe() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{tail(log_path)}")
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(probe, 60, "server healthy", 0.1)


# ---------------------------------------------------------------------------- main


def figures_from(ours: list[RunResult], base: list[RunResult], rate: float) -> list[Figure]:
    def pct(results: list[RunResult], q: float) -> list[float]:
        return [percentile(r.freshness_s, q) for r in results]

    figures = []
    for q, limit in ((0.5, 1.0), (0.95, None), (0.99, 3.0)):
        figures.append(
            Figure(
                SECTION,
                f"202 -> gold visible, p{round(q * 100)}",
                "s",
                pct(ours, q),
                pct(base, q),
                higher_is_better=False,
                baseline_name="bare append",
                target=Target("value", "<=", limit) if limit else None,
            )
        )
    figures.append(
        Figure(
            SECTION,
            "achieved load (acked rows / s)",
            "rows/s",
            [r.rate for r in ours],
            [r.rate for r in base],
            higher_is_better=True,
            baseline_name="bare",
            target=Target("value", ">=", 0.95 * rate),
            detail={"requested_rows_per_s": rate},
        )
    )
    figures.append(
        Figure(
            SECTION,
            "POST 202 latency p50",
            "ms",
            [percentile(r.post_ms, 0.5) for r in ours],
            [percentile(r.post_ms, 0.5) for r in base],
            higher_is_better=False,
            baseline_name="bare asgi",
        )
    )
    figures.append(
        Figure(
            SECTION,
            "batches never visible",
            "batches",
            [float(r.unseen) for r in ours],
            [float(r.unseen) for r in base],
            higher_is_better=False,
            baseline_name="bare",
            target=Target("value", "<=", 0),
        )
    )
    figures.append(
        Figure(
            SECTION,
            "peak RSS (lakehouse up / bare ingester)",
            "MiB",
            [r.rss_mib for r in ours],
            [r.rss_mib for r in base],
            higher_is_better=False,
            baseline_name="bare ingester",
        )
    )
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10k rows/s for 10 s, 1 run")
    parser.add_argument("--rate", type=float, help="rows/s (default 50000; quick 10000)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60; quick 10)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--batch-rows", type=int, default=5000, help="rows per POST")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--poll-ms", type=float, default=50, help="gold poll interval")
    parser.add_argument("--drain-timeout", type=float, default=120, help="wait after the load")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "freshness.json")
    parser.add_argument("--bare-ingester", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rate = args.rate or (10_000 if args.quick else 50_000)
    args.duration = args.duration or (10 if args.quick else 60)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_ingester:
        out_dir, table, rows = args.bare_ingester
        bare_ingester(Path(out_dir), Path(table), int(rows))
        return 0
    started = time.perf_counter()
    ours: list[RunResult] = []
    base: list[RunResult] = []
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-fresh-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        for run in range(args.runs):
            for name, fn, results in (("lakehouse", run_lakehouse, ours), ("bare", run_bare, base)):
                result = fn(workdir, args, run)
                results.append(result)
                log(
                    f"run {run + 1}/{args.runs} {name:9}: {result.rate:,.0f} rows/s acked, "
                    f"freshness p50 {percentile(result.freshness_s, 0.5):.3f}s "
                    f"p99 {percentile(result.freshness_s, 0.99):.3f}s, "
                    f"{result.unseen} unseen, "
                    f"poll read p50 {percentile(result.poll_ms, 0.5):.0f} ms"
                )
    figures = figures_from(ours, base, args.rate)
    notes = [
        f"{args.rate:,.0f} rows/s requested for {args.duration:g} s in POSTs of "
        f"{args.batch_rows:,} NDJSON rows from {args.clients} clients; gold polled every "
        f"{args.poll_ms:g} ms (poll read p50 "
        f"{percentile([m for r in ours for m in r.poll_ms], 0.5):.0f} ms adds to each figure)",
        "baseline: bare ASGI (write+fsync, 202) + a bare loop appending each body to one "
        "Delta table (read_ndjson + write_deltalake), same load and poller",
    ]
    render(
        f"Freshness: POST 202 -> visible in gold.readings_hourly ({len(ours)} run(s))",
        figures,
        notes,
    )
    write_results(
        args.output,
        SECTION,
        figures,
        started,
        config={k: v for k, v in vars(args).items() if k not in {"output", "workdir"}},
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
