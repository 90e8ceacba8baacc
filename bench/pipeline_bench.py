#!/usr/bin/env python
"""End-to-end performance figures of the lakehouse, each beside a raw baseline.

    .venv/bin/python bench/pipeline_bench.py            # N=3 runs per figure
    .venv/bin/python bench/pipeline_bench.py --quick    # N=1, smaller loads

Three sections, every figure the median of N runs, reported with its baseline
and the ratio lakehouse / baseline:

1. **API ingestion** over real HTTP: ``lakehouse api`` (uvicorn subprocess) versus
   ``bench/bare_asgi.py`` (raw ASGI: read the body, write a new file, fsync it and
   its directory, 202) served by the same uvicorn (``lakehouse api`` with
   ``--workers 2``, as in production on 2 cores), under the same load of NDJSON
   readings batches (1, 100, 10,000 rows) from 1 and 8 concurrent keep-alive httpx
   clients (threads, a fixed number of requests per run).
2. **Pipeline** landing -> bronze -> silver -> gold: ``Processor.run_once()`` over
   K landing files of 10,000 readings written by ``LandingWriter``, versus
   ``polars.read_parquet`` of the same files + one ``deltalake.write_deltalake``
   append. Two passes per run: ``initial`` (empty data dir) and ``incremental``
   (K more files on top: the steady state). Each side runs in a child process
   (``--stage``) so its peak RSS is measured on its own.
3. **Query**: DuckDB through ``analytics.connect`` (views over the Delta tables)
   versus the same SQL over ``read_parquet`` of a plain Parquet copy of the data
   (written by polars), plus the cost of ``analytics.connect`` itself.

Results are printed as tables and written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import httpx
import polars as pl
from common import fmt, free_port, log, percentile, sigterm_as_exit

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "latest.json"
SOURCE = "readings"
ROWS_PER_FILE = 10_000
API_CLIENTS = (1, 8)
API_WORKERS = 2  # `lakehouse api --workers 2`: the production configuration on 2 cores
QUERY_REPEATS = 5  # executions per query run; a run's figure is their mean
MAX_BODY_BYTES = 256 * 1024 * 1024
CHILD_TIMEOUT_S = 1800.0
SENSORS = ("temp", "hum", "pressure", "co2", "voltage")
UNITS = ("C", "%", "hPa", "ppm", "V")
DEVICES = 200
SERIES = DEVICES * len(SENSORS)  # 1,000 (device, sensor) series, one reading a minute each
EPOCH = datetime(2026, 11, 20, tzinfo=UTC)

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How much work each mode does."""

    mode: str
    runs: int
    api_requests: dict[int, int]  # rows per request -> requests per run (all clients together)
    landing_files: int


PLANS = {
    "quick": Plan("quick", 1, {1: 2000, 100: 300, 10_000: 30}, 20),
    "normal": Plan("normal", 3, {1: 5000, 100: 1000, 10_000: 100}, 100),
}


# ---------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One measured figure: the lakehouse beside its baseline, both medians of N runs."""

    section: str
    name: str
    unit: str
    runs: list[float]
    baseline_runs: list[float]
    higher_is_better: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return statistics.median(self.runs)

    @property
    def baseline(self) -> float:
        return statistics.median(self.baseline_runs)

    @property
    def ratio(self) -> float:
        """Lakehouse figure divided by baseline figure."""
        return self.value / self.baseline if self.baseline else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "value": self.value,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "runs": self.runs,
            "baseline_runs": self.baseline_runs,
            **({"detail": self.detail} if self.detail else {}),
        }


# ---------------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any LAKEHOUSE_* setting of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env.update(extra)
    return env


def clear_files(directory: Path) -> int:
    """Delete the regular files directly inside ``directory``; return how many there were."""
    count = 0
    if directory.is_dir():
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                count += 1
    return count


def fsync_probe_ms(directory: Path, samples: int = 100) -> float:
    """Median time to create a small file, fsync it and fsync its directory."""
    probe = directory / "fsync-probe"
    probe.mkdir()
    times = []
    try:
        for index in range(samples):
            start = time.perf_counter()
            fd = os.open(probe / str(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 128)
            os.fsync(fd)
            os.close(fd)
            dir_fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dir_fd)
            os.close(dir_fd)
            times.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(times) * 1000


def machine_info(workdir: Path) -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "polars": version("polars"),
        "deltalake": version("deltalake"),
        "duckdb": version("duckdb"),
        "pyarrow": version("pyarrow"),
        "fastapi": version("fastapi"),
        "uvicorn": version("uvicorn"),
        "httpx": version("httpx"),
        "fsync_create_ms": round(fsync_probe_ms(workdir), 3),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def readings_frame(first: int, count: int) -> pl.DataFrame:
    """``count`` raw readings (all strings, as the API lands them), globally numbered from
    ``first``: 1,000 series of one reading a minute, so (device_id, sensor, ts) is unique."""
    g = pl.int_range(first, first + count, dtype=pl.Int64)
    sensor_index = (g // DEVICES) % len(SENSORS)
    cents = (g * 2_654_435_761) % 1_000_003  # pseudo-random values 0.00 .. 10000.02
    return pl.select(
        ts=(pl.lit(EPOCH) + pl.duration(minutes=g // SERIES)).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        device_id=pl.lit("dev-") + (g % DEVICES).cast(pl.String).str.zfill(4),
        sensor=sensor_index.replace_strict(dict(enumerate(SENSORS)), return_dtype=pl.String),
        value=pl.format("{}.{}", cents // 100, (cents % 100).cast(pl.String).str.zfill(2)),
        unit=sensor_index.replace_strict(dict(enumerate(UNITS)), return_dtype=pl.String),
    )


def ndjson_body(rows: int) -> bytes:
    """An NDJSON request body of ``rows`` readings (value numeric, as devices send it)."""
    frame = readings_frame(0, rows).with_columns(pl.col("value").cast(pl.Float64))
    return frame.write_ndjson().encode()


# ---------------------------------------------------------------------------- servers


@dataclass
class Server:
    """An HTTP server subprocess and where its output lands."""

    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    path: str
    out_dir: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def _spawn(
    cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as handle:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)


def start_lakehouse_api(workdir: Path, workers: int = 1, name: str = "api-data") -> Server:
    data_dir = workdir / name
    data_dir.mkdir()
    port = free_port()
    log_path = workdir / f"lakehouse-{name}.log"
    env = clean_env(
        LAKEHOUSE_DATA_DIR=str(data_dir),
        LAKEHOUSE_LOG_LEVEL="WARNING",
        LAKEHOUSE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )
    cmd = [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    proc = _spawn(cmd, env, workdir, log_path)
    return Server(
        "lakehouse",
        proc,
        f"http://127.0.0.1:{port}",
        f"/v1/ingest/{SOURCE}",
        data_dir / "landing" / SOURCE,
        log_path,
    )


def start_bare_asgi(workdir: Path, out_dir: Path | None = None) -> Server:
    out_dir = out_dir or workdir / "bare-out"
    out_dir.mkdir()
    port = free_port()
    log_path = workdir / f"bare-asgi-{out_dir.name}.log"
    env = clean_env(BENCH_BARE_DIR=str(out_dir))
    cmd = [
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
    ]
    proc = _spawn(cmd, env, workdir, log_path)
    return Server("bare", proc, f"http://127.0.0.1:{port}", "/ingest", out_dir, log_path)


def wait_healthy(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} server exited early:\n{server.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} server not healthy after {timeout}s:\n{server.tail()}")


# ---------------------------------------------------------------------------- API load


@dataclass(frozen=True)
class LoadRun:
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def post_load(
    server: Server, headers: dict[str, str], body: bytes, requests: int, clients: int
) -> LoadRun:
    """POST ``body`` ``requests`` times from ``clients`` threads (own keep-alive client each).

    Each client first sends one untimed warm-up request; the clock runs from the moment
    every client is warm until the last response.
    """
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []

    def post(client: httpx.Client) -> None:
        response = client.post(server.path, content=body)
        if response.status_code != 202:
            raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {response.text[:300]}")

    def worker(index: int) -> None:
        try:
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as client:
                post(client)
                barrier.wait()
                mine = latencies[index]
                for _ in range(shares[index]):
                    start = time.perf_counter()
                    post(client)
                    mine.append((time.perf_counter() - start) * 1000)
        except BaseException as exc:  # reported by the caller
            failures.append(f"client {index}: {exc}")
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-client-{i}", daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=120)  # a failed client aborts it; reported below
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError("; ".join(failures) + f"\n{server.tail()}")
    return LoadRun(requests, seconds, [ms for worker_ms in latencies for ms in worker_ms])


def bench_api(plan: Plan, workdir: Path) -> list[Figure]:
    from api.tokens import TokenStore

    servers: list[Server] = []
    try:
        servers.append(start_lakehouse_api(workdir, API_WORKERS))
        servers.append(start_bare_asgi(workdir))
        for server in servers:
            wait_healthy(server)
        token = TokenStore(workdir / "api-data" / "_meta" / "tokens.json").create(
            "bench", [f"ingest:{SOURCE}"]
        )
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
        bodies = {rows: ndjson_body(rows) for rows in plan.api_requests}
        scenarios = [(rows, clients) for rows in plan.api_requests for clients in API_CLIENTS]
        runs: dict[tuple[int, int, str], list[LoadRun]] = {}
        for run in range(plan.runs):
            for rows, clients in scenarios:
                requests = plan.api_requests[rows]
                for server in servers:
                    clear_files(server.out_dir)
                    result = post_load(server, headers, bodies[rows], requests, clients)
                    landed = landed_requests(server, rows)
                    if landed != requests + clients:
                        raise RuntimeError(
                            f"{server.name}: {landed} files for {requests + clients} requests"
                        )
                    runs.setdefault((rows, clients, server.name), []).append(result)
                    log(
                        f"api run {run + 1}/{plan.runs} {server.name:9} {rows:>6} rows x "
                        f"{clients} clients: {result.rps:9.1f} req/s"
                    )
    finally:
        for server in servers:
            server.stop()

    figures = []
    for rows, clients in scenarios:
        size = len(bodies[rows])
        ours, base = runs[(rows, clients, "lakehouse")], runs[(rows, clients, "bare")]
        detail = {
            "rows_per_request": rows,
            "clients": clients,
            "requests_per_run": plan.api_requests[rows],
            "body_bytes": size,
            "p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in ours),
            "p99_ms": statistics.median(percentile(r.latencies_ms, 0.99) for r in ours),
            "baseline_p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in base),
            "baseline_p99_ms": statistics.median(percentile(r.latencies_ms, 0.99) for r in base),
        }
        label = f"{rows:,} rows x {clients} clients"
        for unit, scale in (("req/s", 1.0), ("rows/s", float(rows)), ("MB/s", size / 1e6)):
            figures.append(
                Figure(
                    "api",
                    label,
                    unit,
                    [r.rps * scale for r in ours],
                    [r.rps * scale for r in base],
                    higher_is_better=True,
                    detail=detail,
                )
            )
    return figures


def landed_requests(server: Server, rows: int) -> int:
    """Requests whose data reached ``server.out_dir`` (then cleared): one file each for the
    bare server; for the lakehouse, landed rows / rows per request (group commit puts
    several requests in one file)."""
    if server.name == "bare" or not server.out_dir.is_dir():
        return clear_files(server.out_dir)
    files = [p for p in server.out_dir.glob("*.parquet") if p.is_file()]
    landed_rows = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in files)
    clear_files(server.out_dir)
    return landed_rows // rows


# ------------------------------------------------------------- API: small durable requests

SMALL_CLIENTS = (1, 8, 32, 64)
SMALL_WORKERS = (1, 2)


async def _raw_client(
    host: str, port: int, request: bytes, count: int, start: Any, latencies: list[float]
) -> None:
    """One keep-alive HTTP/1.1 connection sending ``request`` ``count`` times, each after
    the previous answer (a durable acknowledgement per request)."""
    import asyncio

    reader, writer = await asyncio.open_connection(host, port)
    try:

        async def once() -> None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"202":
                rest = await reader.read(2000)
                raise RuntimeError(f"HTTP {head[9:12].decode()}: {(head + rest)[:400]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)

        await once()  # warm-up, untimed
        await start.wait()
        for _ in range(count):
            began = time.perf_counter()
            await once()
            latencies.append((time.perf_counter() - began) * 1000)
    finally:
        writer.close()


def raw_load(server: Server, headers: dict[str, str], body: bytes, requests: int,
             clients: int) -> LoadRun:  # fmt: skip
    """``requests`` POSTs over ``clients`` concurrent keep-alive connections from one asyncio
    loop over raw sockets (an httpx client costs more CPU per request than the server)."""
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(server.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    lines = [f"POST {server.path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    request = "\r\n".join(lines).encode() + body
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]

    async def run() -> float:
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(_raw_client(host, port, request, n, start, latencies[i]))
            for i, n in enumerate(shares)
        ]
        await asyncio.sleep(0.3)  # connections open, warm-up answered
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - began

    seconds = asyncio.run(run())
    return LoadRun(requests, seconds, [ms for per_client in latencies for ms in per_client])


def bench_api_small(plan: Plan, workdir: Path) -> list[Figure]:
    """Single-record POSTs, each acknowledged durably: lakehouse api with 1 and 2 workers
    (group commit) versus the bare ASGI app that fsyncs every request on its own."""
    from api.tokens import TokenStore

    requests = plan.api_requests[1]
    servers: dict[str, Server] = {}
    try:
        for workers in SMALL_WORKERS:
            server = start_lakehouse_api(workdir, workers, f"small-{workers}w")
            server.name = f"lakehouse-{workers}w"
            servers[server.name] = server
        bare = start_bare_asgi_named(workdir, "bare-small")
        servers["bare"] = bare
        for server in servers.values():
            wait_healthy(server)
        tokens = {}
        for workers in SMALL_WORKERS:
            store = TokenStore(workdir / f"small-{workers}w" / "_meta" / "tokens.json")
            tokens[workers] = store.create("bench", [f"ingest:{SOURCE}"])
        body = ndjson_body(1)
        runs: dict[tuple[str, int], list[LoadRun]] = {}
        for run in range(plan.runs):
            for clients in SMALL_CLIENTS:
                for name, server in servers.items():
                    workers = 0 if name == "bare" else int(name.split("-")[1][:-1])
                    headers = {"Content-Type": "application/x-ndjson"}
                    if workers:
                        headers["Authorization"] = f"Bearer {tokens[workers]}"
                    clear_files(server.out_dir)
                    result = raw_load(server, headers, body, requests, clients)
                    landed = landed_requests(server, 1)
                    if landed != requests + clients:
                        raise RuntimeError(
                            f"{name}: {landed} requests landed for {requests + clients} sent"
                        )
                    runs.setdefault((name, clients), []).append(result)
                    log(
                        f"small run {run + 1}/{plan.runs} {name:13} 1 row x {clients:2} clients: "
                        f"{result.rps:8.1f} req/s, p50 {percentile(result.latencies_ms, 0.5):.2f}"
                        f" ms, p99 {percentile(result.latencies_ms, 0.99):.2f} ms"
                    )
    finally:
        for server in servers.values():
            server.stop()

    figures = []
    for clients in SMALL_CLIENTS:
        base = runs[("bare", clients)]
        for workers in SMALL_WORKERS:
            ours = runs[(f"lakehouse-{workers}w", clients)]
            detail = {
                "clients": clients,
                "workers": workers,
                "requests_per_run": requests,
                "p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in ours),
                "p99_ms": statistics.median(percentile(r.latencies_ms, 0.99) for r in ours),
                "baseline_p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in base),
                "baseline_p99_ms": statistics.median(
                    percentile(r.latencies_ms, 0.99) for r in base
                ),
            }
            figures.append(
                Figure(
                    "api_small",
                    f"1 row x {clients} clients, {workers} worker{'s' if workers > 1 else ''}",
                    "req/s",
                    [r.rps for r in ours],
                    [r.rps for r in base],
                    higher_is_better=True,
                    detail=detail,
                )
            )
    return figures


def start_bare_asgi_named(workdir: Path, name: str) -> Server:
    """The bare ASGI baseline with its own output directory."""
    out_dir = workdir / name
    server = start_bare_asgi(workdir, out_dir)
    return server


# ---------------------------------------------------------------------------- pipeline

PASSES = ("initial", "incremental")


def seed_landing(data_dir: Path, files: int, first_file: int) -> float:
    """Write ``files`` landing files of ROWS_PER_FILE readings with LandingWriter; seconds.

    Files are numbered globally from ``first_file``, so a later set continues the time
    series of an earlier one (new minutes, as live data arrives)."""
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter

    writer = LandingWriter(LandingLayout(data_dir))
    frames = [
        readings_frame(i * ROWS_PER_FILE, ROWS_PER_FILE)
        for i in range(first_file, first_file + files)
    ]
    start = time.perf_counter()
    for frame in frames:
        writer.write_frame(SOURCE, frame)
    return time.perf_counter() - start


def run_child(
    stage: str, args: list[str], workdir: Path, timeout: float
) -> tuple[dict[str, Any], float]:
    """Run ``--stage`` in a child process; return its result and its peak RSS in MiB."""
    result_path = workdir / f"{stage}-result.json"
    result_path.unlink(missing_ok=True)
    log_path = workdir / f"{stage}-child.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, *args]
    cmd += ["--result", str(result_path)]
    env = clean_env(LAKEHOUSE_LOG_LEVEL="WARNING")
    with open(log_path, "wb") as handle:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be a running max).
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage {stage} took more than {timeout}s")
            time.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        output = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"stage {stage} failed with exit code {proc.returncode}:\n{output}")
    peak_mib = usage.ru_maxrss / 1024  # Linux reports KiB
    return json.loads(result_path.read_text()), peak_mib


def bench_pipeline(plan: Plan, workdir: Path) -> tuple[list[Figure], Path, dict[str, Any]]:
    """Pipeline figures, the data dir of the last pipeline run (for queries), and extras.

    Each run processes two equal sets of K landing files: ``initial`` into an empty data
    dir (every table created), then ``incremental`` on top of it (MERGE into a populated
    silver, gold refreshed from the change feed), the steady state of a running system.
    """
    seeds = {name: workdir / f"seed-{name}" for name in PASSES}
    rows = plan.landing_files * ROWS_PER_FILE
    extras: dict[str, Any] = {"landing_files_per_pass": plan.landing_files, "rows_per_pass": rows}
    for index, (name, seed) in enumerate(seeds.items()):
        seconds = seed_landing(seed, plan.landing_files, index * plan.landing_files)
        size = sum(p.stat().st_size for p in (seed / "landing" / SOURCE).glob("*.parquet"))
        extras[f"{name}_landing_bytes"] = size
        extras[f"{name}_landing_write_rows_per_s"] = rows / seconds
        log(f"seeded {plan.landing_files} {name} landing files ({rows:,} rows) in {seconds:.2f}s")
    landings = [str(seeds[name] / "landing" / SOURCE) for name in PASSES]

    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    ours_rss: list[float] = []
    base_rss: list[float] = []
    last_dir: Path | None = None
    for run in range(plan.runs):
        data_dir = workdir / f"pipeline-{run}"
        args = ["--data-dir", str(data_dir), "--landing", *landings]
        result, peak = run_child("pipeline", args, workdir, CHILD_TIMEOUT_S)
        ours.append(result)
        ours_rss.append(peak)
        for name in PASSES:
            log(
                f"pipeline run {run + 1}/{plan.runs} {name}: {result[name]['seconds']:.2f}s "
                f"({rows / result[name]['seconds']:,.0f} rows/s) stages {result[name]['stages']}"
            )
        log(f"pipeline run {run + 1}/{plan.runs}: peak RSS {peak:.0f} MiB, rows {result['rows']}")
        raw_dir = workdir / f"raw-{run}"
        args = ["--data-dir", str(raw_dir), "--landing", *landings]
        result, peak = run_child("raw", args, workdir, CHILD_TIMEOUT_S)
        base.append(result)
        base_rss.append(peak)
        shutil.rmtree(raw_dir, ignore_errors=True)
        log(
            f"raw baseline run {run + 1}/{plan.runs}: "
            + ", ".join(f"{name} {result[name]['seconds']:.2f}s" for name in PASSES)
            + f", peak RSS {peak:.0f} MiB"
        )
        if last_dir is not None:
            shutil.rmtree(last_dir, ignore_errors=True)
        last_dir = data_dir
    for seed in seeds.values():
        shutil.rmtree(seed, ignore_errors=True)
    assert last_dir is not None

    figures = []
    for name in PASSES:
        stages = {
            stage: statistics.median(r[name]["stages"][stage] for r in ours)
            for stage in ours[0][name]["stages"]
        }
        label = f"{name}: {plan.landing_files} files, {rows:,} rows"
        detail = {"stages_s": stages, "last_run": ours[-1][name]}
        figures.append(
            Figure(
                "pipeline",
                label,
                "rows/s",
                [rows / r[name]["seconds"] for r in ours],
                [rows / r[name]["seconds"] for r in base],
                higher_is_better=True,
                detail=detail,
            )
        )
        figures.append(
            Figure(
                "pipeline",
                label,
                "s",
                [r[name]["seconds"] for r in ours],
                [r[name]["seconds"] for r in base],
                higher_is_better=False,
            )
        )
    figures.append(
        Figure(
            "pipeline",
            "peak RSS of the process (both passes)",
            "MiB",
            ours_rss,
            base_rss,
            higher_is_better=False,
        )
    )
    extras["final_rows"] = ours[-1]["rows"]
    return figures, last_dir, extras


def copy_landing_files(source: Path, data_dir: Path) -> int:
    """Place the landing files of ``source`` into ``data_dir``'s landing zone (no processor
    runs meanwhile, so a plain copy is as good as the writer's temp-name-then-rename)."""
    target = data_dir / "landing" / SOURCE
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.parquet"))
    for path in files:
        shutil.copyfile(path, target / path.name)
    return len(files)


def table_rows(data_dir: Path) -> dict[str, int]:
    tables = [
        ("bronze", SOURCE),
        ("silver", SOURCE),
        ("quarantine", SOURCE),
        ("gold", "readings_hourly"),
        ("gold", "readings_daily"),
        ("gold", "readings_latest"),
    ]
    return {
        f"{layer}.{name}": int(
            pl.scan_delta(str(data_dir / layer / name)).select(pl.len()).collect().item()
        )
        for layer, name in tables
        if (data_dir / layer / name / "_delta_log").is_dir()
    }


def stage_pipeline(data_dir: Path, landings: list[Path], result_path: Path) -> None:
    """Child: ``Processor.run_once()`` once per landing set, timed per stage."""
    import logging

    import structlog

    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    processor = Processor(load_settings(data_dir=data_dir), load_contracts())
    stages: dict[str, float] = {}

    def timed(stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        def wrapper(*args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - start

        return wrapper

    # Instrument the three stage entry points the processor loop calls (bench only).
    bronze, silver, gold = processor._bronze, processor._silver, processor._gold
    bronze.ingest_next = timed("bronze", bronze.ingest_next)  # type: ignore[method-assign]
    silver.promote = timed("silver", silver.promote)  # type: ignore[method-assign]
    gold.refresh = timed("gold", gold.refresh)  # type: ignore[method-assign]

    result: dict[str, Any] = {}
    for name, landing in zip(PASSES, landings, strict=True):
        files = copy_landing_files(landing, data_dir)
        stages.update(bronze=0.0, silver=0.0, gold=0.0)
        start = time.perf_counter()
        report = processor.run_once()
        seconds = time.perf_counter() - start
        if report.failures:
            raise RuntimeError(f"processor failures: {report.failures}")
        result[name] = {
            "seconds": seconds,
            "files": files,
            "stages": {k: round(v, 4) for k, v in stages.items()},
            "bronze_batches": len(report.bronze),
            "silver_promotions": len(report.silver),
            "gold_refreshes": len(report.gold),
        }
    result["rows"] = table_rows(data_dir)
    result["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result_path.write_text(json.dumps(result))


def stage_raw(data_dir: Path, landings: list[Path], result_path: Path) -> None:
    """Child: the raw ceiling, each landing set read and appended to one Delta table."""
    from deltalake import write_deltalake

    result: dict[str, Any] = {}
    for name, landing in zip(PASSES, landings, strict=True):
        files = sorted(str(p) for p in landing.glob("*.parquet"))
        start = time.perf_counter()
        frame = pl.read_parquet(files)
        arrow = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
        write_deltalake(str(data_dir / "table"), arrow, mode="append")
        seconds = time.perf_counter() - start
        result[name] = {"seconds": seconds, "rows": frame.height, "files": len(files)}
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------- queries

QUERIES = {
    "gold hourly -> daily": (
        "readings_hourly",
        "SELECT device_id, sensor, date_trunc('day', window_start) AS day, "
        "sum(count) AS n, avg(avg) AS mean FROM {table} GROUP BY ALL",
    ),
    "silver aggregate": (
        "readings",
        "SELECT device_id, sensor, count(*) AS n, avg(value) AS mean FROM {table} GROUP BY ALL",
    ),
}
TABLES = {"readings_hourly": ("gold", "readings_hourly"), "readings": ("silver", "readings")}


def timed_ms(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """Mean milliseconds per call of ``fn`` over ``repeats`` calls, and its last result."""
    start = time.perf_counter()
    for _ in range(repeats):
        value = fn()
    return (time.perf_counter() - start) * 1000 / repeats, value


def fetch_all(con: Any, sql: str) -> Any:
    """Run ``sql`` and materialise the whole answer (as Arrow: no Python objects per value)."""
    return con.sql(sql).to_arrow_table()


def same_answer(ours: Any, base: Any) -> bool:
    """Whether two query answers hold the same groups and counts, and means within 1e-9
    relative (summation order differs between scans)."""
    a, b = pl.from_arrow(ours), pl.from_arrow(base)
    assert isinstance(a, pl.DataFrame) and isinstance(b, pl.DataFrame)
    if a.columns != b.columns or a.height != b.height:
        return False
    keys = [c for c in a.columns if c != "mean"]
    a, b = a.sort(keys), b.sort(keys)
    mean_a, mean_b = a.get_column("mean"), b.get_column("mean")
    close = ((mean_a - mean_b).abs() <= 1e-9 * mean_b.abs().clip(lower_bound=1.0)).all()
    return bool(a.select(keys).equals(b.select(keys)) and close)


def bench_queries(plan: Plan, data_dir: Path, workdir: Path) -> list[Figure]:
    import duckdb

    from analytics import connect

    plain_dir = workdir / "plain-parquet"
    plain_dir.mkdir()
    plain: dict[str, str] = {}
    for key, (layer, name) in TABLES.items():
        path = plain_dir / f"{name}.parquet"
        pl.read_delta(str(data_dir / layer / name)).write_parquet(path)
        plain[key] = f"read_parquet('{path}')"

    def plain_connect() -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")  # as analytics.connect does
        return con

    connect_runs: list[float] = []
    connect_base: list[float] = []
    query_runs: dict[str, tuple[list[float], list[float]]] = {q: ([], []) for q in QUERIES}
    for run in range(plan.runs):
        ms, ours = timed_ms(lambda: connect(data_dir))
        connect_runs.append(ms)
        ms, base = timed_ms(plain_connect)
        connect_base.append(ms)
        for label, (table, sql) in QUERIES.items():
            ours_sql = sql.format(table=".".join(TABLES[table]))
            base_sql = sql.format(table=plain[table])
            # One untimed execution each (file cache, plan), then QUERY_REPEATS timed.
            ours_rows = fetch_all(ours, ours_sql)
            base_rows = fetch_all(base, base_sql)
            if not same_answer(ours_rows, base_rows):
                raise RuntimeError(f"{label}: lakehouse and plain Parquet answers differ")
            ms, _ = timed_ms(functools.partial(fetch_all, ours, ours_sql), QUERY_REPEATS)
            query_runs[label][0].append(ms)
            ms, _ = timed_ms(functools.partial(fetch_all, base, base_sql), QUERY_REPEATS)
            query_runs[label][1].append(ms)
            log(
                f"query run {run + 1}/{plan.runs} {label}: {query_runs[label][0][-1]:.1f} ms "
                f"vs {query_runs[label][1][-1]:.1f} ms ({ours_rows.num_rows} rows)"
            )
        ours.close()
        base.close()

    from deltalake import DeltaTable

    files = {
        f"{layer}.{name}": len(DeltaTable(str(data_dir / layer / name)).file_uris())
        for layer, name in TABLES.values()
    }
    figures = [
        Figure(
            "query",
            "connect (views over every table)",
            "ms",
            connect_runs,
            connect_base,
            higher_is_better=False,
        )
    ]
    for label, (ours_ms, base_ms) in query_runs.items():
        table = ".".join(TABLES[QUERIES[label][0]])
        figures.append(
            Figure(
                "query",
                f"{label} ({table}, {files[table]} file{'s' if files[table] != 1 else ''})",
                "ms",
                ours_ms,
                base_ms,
                higher_is_better=False,
                detail={"sql": QUERIES[label][1], "delta_files": files[table], "plain_files": 1},
            )
        )
    return figures


# ---------------------------------------------------------------------------- report


def render(figures: list[Figure], info: dict[str, Any], plan: Plan) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, highlight=False)
    console.print(
        f"lakehouse bench, {plan.mode} mode: every figure the median of {plan.runs} run(s); "
        f"{info['timestamp']}, took {info['duration_s']} s\n"
        f"{info['cpu_count']} CPUs, {info['memory_gib']} GiB, Python {info['python']}, "
        f"polars {info['polars']}, deltalake {info['deltalake']}, duckdb {info['duckdb']}; "
        f"create+fsync+dir fsync {info['fsync_create_ms']} ms\nload average (1 min) "
        f"{info['loadavg_1m_at_start']} at start, {info['loadavg_1m_at_end']} at end"
    )

    api = [f for f in figures if f.section == "api"]
    if api:
        table = Table(
            title="API ingestion of NDJSON readings: lakehouse api vs bare ASGI "
            "(write, fsync file+dir, 202)",
            box=box.ASCII2,
        )
        for header in ("rows/request", "clients", "server"):
            table.add_column(header, justify="right" if header != "server" else "left")
        for header in ("req/s", "rows/s", "MB/s", "p50 ms", "p99 ms", "ratio"):
            table.add_column(header, justify="right")
        by_name: dict[str, dict[str, Figure]] = {}
        for figure in api:
            by_name.setdefault(figure.name, {})[figure.unit] = figure
        for units in by_name.values():
            d = units["req/s"].detail
            table.add_row(
                f"{d['rows_per_request']:,}",
                str(d["clients"]),
                "lakehouse",
                *(fmt(units[u].value) for u in ("req/s", "rows/s", "MB/s")),
                fmt(d["p50_ms"]),
                fmt(d["p99_ms"]),
                f"{units['req/s'].ratio:.2f}",
            )
            table.add_row(
                "",
                "",
                "bare",
                *(fmt(units[u].baseline) for u in ("req/s", "rows/s", "MB/s")),
                fmt(d["baseline_p50_ms"]),
                fmt(d["baseline_p99_ms"]),
                "",
                end_section=True,
            )
        console.print(table)

    small = [f for f in figures if f.section == "api_small"]
    if small:
        table = Table(
            title="API: single-record POSTs, durable 202 (group commit) vs bare ASGI "
            "(fsync per request)",
            box=box.ASCII2,
        )
        for header in ("clients", "workers", "req/s", "p50 ms", "p99 ms"):
            table.add_column(header, justify="right")
        for header in ("bare req/s", "bare p50", "bare p99", "ratio"):
            table.add_column(header, justify="right")
        for figure in small:
            d = figure.detail
            table.add_row(
                str(d["clients"]),
                str(d["workers"]),
                fmt(figure.value),
                fmt(d["p50_ms"]),
                fmt(d["p99_ms"]),
                fmt(figure.baseline),
                fmt(d["baseline_p50_ms"]),
                fmt(d["baseline_p99_ms"]),
                f"{figure.ratio:.2f}",
            )
        console.print(table)

    for section, title, baseline in (
        ("pipeline", "Pipeline landing -> gold: Processor.run_once()", "read_parquet+write_delta"),
        ("query", "Query: DuckDB over analytics.connect views", "plain Parquet"),
    ):
        rows = [f for f in figures if f.section == section]
        if not rows:
            continue
        table = Table(title=f"{title} vs {baseline}", box=box.ASCII2)
        table.add_column("measure")
        table.add_column("unit")
        table.add_column("lakehouse", justify="right")
        table.add_column(baseline, justify="right")
        table.add_column("ratio", justify="right")
        for figure in rows:
            table.add_row(
                figure.name,
                figure.unit,
                fmt(figure.value),
                fmt(figure.baseline),
                f"{figure.ratio:.2f}",
            )
        console.print(table)
        for figure in rows:
            if "stages_s" in figure.detail:
                stages = ", ".join(f"{k} {v:.2f}" for k, v in figure.detail["stages_s"].items())
                console.print(f"  {figure.name.split(':')[0]} stage seconds: {stages}")
    console.print(
        "ratio = lakehouse / baseline: below 1 is slower for rates, above 1 is slower for "
        "ms, s and MiB."
    )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 run per figure, smaller loads")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, 1 with --quick)")
    parser.add_argument(
        "--sections",
        default="api,small,pipeline,query",
        help="comma-separated subset of api,small,pipeline,query (query needs pipeline); "
        "small: single-record POSTs at 1/8/32/64 clients, 1 and 2 workers",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    # Internal: one measured stage in a child process.
    parser.add_argument("--stage", choices=("pipeline", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--landing", type=Path, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "pipeline":
        stage_pipeline(args.data_dir, args.landing, args.result)
        return 0
    if args.stage == "raw":
        stage_raw(args.data_dir, args.landing, args.result)
        return 0

    base_plan = PLANS["quick" if args.quick else "normal"]
    plan = Plan(
        base_plan.mode,
        args.runs or base_plan.runs,
        base_plan.api_requests,
        base_plan.landing_files,
    )
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"api", "small", "pipeline", "query"}
    if unknown or ("query" in sections and "pipeline" not in sections):
        print(f"invalid --sections {args.sections!r}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    figures: list[Figure] = []
    extras: dict[str, Any] = {}
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="lakehouse-bench-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        info = machine_info(workdir)
        log(f"{plan.mode} mode, {plan.runs} run(s) per figure, work in {workdir}")
        if "api" in sections:
            figures += bench_api(plan, workdir)
        if "small" in sections:
            figures += bench_api_small(plan, workdir)
        if "pipeline" in sections:
            pipeline_figures, last_dir, extras["pipeline"] = bench_pipeline(plan, workdir)
            figures += pipeline_figures
            if "query" in sections:
                figures += bench_queries(plan, last_dir, workdir)

    info["duration_s"] = round(time.perf_counter() - started, 1)
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    render(figures, info, plan)
    payload = {
        "machine": info,
        "plan": asdict(plan),
        "figures": [f.to_json() for f in figures],
        "extras": extras,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {args.output} ({info['duration_s']}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
