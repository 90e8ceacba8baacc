#!/usr/bin/env python
"""Small files: after a long run of 1-second micro-batches, file counts and query latency
before and after maintenance (``lakehouse optimize``).

    .venv/bin/python bench/small_files_bench.py               # 300 s of 1 s micro-batches
    .venv/bin/python bench/small_files_bench.py --quick       # 30 s
    .venv/bin/python bench/small_files_bench.py --duration 1800 --rows-per-batch 5000

A real ``lakehouse up`` (subprocess, housekeeping pushed out of the run) receives one
POST of ``--rows-per-batch`` readings (200 devices x 5 sensors, current timestamps) per
second, and its processor makes one micro-batch of each: every table gets a commit a
second. Then, with the processor stopped: data files and log versions per table, and
the latency of DuckDB (``analytics.connect``) opening the views and running a gold and a
silver aggregate (median of ``--repeats`` executions after a warm-up). Then
``lakehouse optimize`` (compaction, checkpoint, log clean-up) and the same again.
"baseline" is the figure before maintenance, "value" after it: ratio = after / before.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
from common import (
    LAKEHOUSE,
    RESULTS_DIR,
    Figure,
    free_port,
    lakehouse_env,
    log,
    render,
    sigterm_as_exit,
    spawn,
    stop,
    tail,
    wait_for,
    write_results,
)

SECTION = "small_files"
SOURCE = "readings"
TABLES = [
    ("bronze", SOURCE),
    ("silver", SOURCE),
    ("gold", "readings_hourly"),
    ("gold", "readings_daily"),
    ("gold", "readings_latest"),
]
QUERIES = {
    "gold hourly -> daily": "SELECT device_id, sensor, date_trunc('day', window_start) AS day, "
    "sum(count) AS n, avg(avg) AS mean FROM gold.readings_hourly GROUP BY ALL",
    "silver aggregate": "SELECT device_id, sensor, count(*) AS n, avg(value) AS mean "
    "FROM silver.readings GROUP BY ALL",
}
SENSORS = ("temp", "hum", "pressure", "co2", "voltage")


def batch_body(index: int, rows: int) -> bytes:
    """``rows`` readings of 1,000 series stamped within the current second."""
    now = datetime.now(UTC).replace(microsecond=0)
    k = pl.int_range(0, rows, dtype=pl.Int64)
    frame = pl.select(
        ts=(pl.lit(now) + pl.duration(microseconds=(k // 1000) * 1000 + index % 1000)).dt.strftime(
            "%Y-%m-%dT%H:%M:%S%.6fZ"
        ),
        device_id=pl.lit("dev-") + (k % 200).cast(pl.String).str.zfill(4),
        sensor=((k // 200) % 5).replace_strict(dict(enumerate(SENSORS)), return_dtype=pl.String),
        value=((k * 7919 + index) % 10_000).cast(pl.Float64) / 100,
    )
    return frame.write_ndjson().encode()


def feed(base: str, token: str, args: argparse.Namespace, failures: list[str]) -> int:
    """One POST a second for ``args.duration`` seconds; return the rows acknowledged."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
    sent = 0
    start = time.monotonic()
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for index in range(int(args.duration)):
            delay = start + index - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            response = client.post(f"/v1/ingest/{SOURCE}", content=batch_body(index, args.rows))
            if response.status_code != 202:
                failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                break
            sent += args.rows
    return sent


def table_stats(data_dir: Path) -> dict[str, dict[str, int]]:
    from deltalake import DeltaTable

    out = {}
    for layer, name in TABLES:
        path = data_dir / layer / name
        if not (path / "_delta_log").is_dir():
            continue
        dt = DeltaTable(str(path))
        log_files = list((path / "_delta_log").glob("*.json"))
        out[f"{layer}.{name}"] = {
            "files": len(dt.file_uris()),
            "version": dt.version(),
            "log_json_files": len(log_files),
            "checkpoints": len(list((path / "_delta_log").glob("*.checkpoint*.parquet"))),
            "bytes": sum(
                p.stat().st_size for p in path.rglob("*.parquet") if "_delta_log" not in p.parts
            ),
        }
    return out


def query_latency(data_dir: Path, repeats: int) -> dict[str, float]:
    """Milliseconds: connect (views over every table), and each query (median)."""
    from analytics import connect

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        con = connect(data_dir)
        times.append((time.perf_counter() - start) * 1000)
        con.close()
    out = {"connect": statistics.median(times)}
    con = connect(data_dir)
    try:
        for label, sql in QUERIES.items():
            con.sql(sql).to_arrow_table()  # warm-up
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                con.sql(sql).to_arrow_table()
                runs.append((time.perf_counter() - start) * 1000)
            out[label] = statistics.median(runs)
    finally:
        con.close()
    return out


def silver_rows(data_dir: Path) -> int:
    path = data_dir / "silver" / SOURCE
    if not (path / "_delta_log").is_dir():
        return 0
    return int(pl.scan_delta(str(path)).select(pl.len()).collect().item())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="30 s of micro-batches")
    parser.add_argument("--duration", type=float, help="seconds of 1 s batches (default 300)")
    parser.add_argument("--rows", "--rows-per-batch", type=int, default=1000, dest="rows")
    parser.add_argument("--repeats", type=int, default=5, help="executions per query figure")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "small_files.json")
    args = parser.parse_args(argv)
    args.duration = args.duration or (30 if args.quick else 300)
    return args


def main(argv: list[str] | None = None) -> int:
    from api.tokens import TokenStore

    args = parse_args(argv)
    started = time.perf_counter()
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-small-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        data_dir = workdir / "dados"
        data_dir.mkdir()
        token = TokenStore(data_dir / "_meta" / "tokens.json").create("bench", [f"ingest:{SOURCE}"])
        port = free_port()
        up_log = workdir / "up.log"
        env = lakehouse_env(data_dir, LAKEHOUSE_MAINTENANCE_INTERVAL_S="86400")
        proc = spawn([*LAKEHOUSE, "up", "--port", str(port)], env, up_log)
        base = f"http://127.0.0.1:{port}"
        failures: list[str] = []
        try:

            def healthy() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"lakehouse up exited early:\n{tail(up_log)}")
                try:
                    return httpx.get(f"{base}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 60, "lakehouse up healthy", 0.1)
            log(f"feeding {args.rows:,} rows/s in 1 s micro-batches for {args.duration:g} s")
            sent = feed(base, token, args, failures)
            if failures:
                raise RuntimeError(failures[0])
            wait_for(lambda: silver_rows(data_dir) >= sent, 120, "silver caught up", 0.5)
            time.sleep(2)  # gold follows silver in the same cycle; let the cycle finish
        finally:
            stop(proc)
        before = table_stats(data_dir)
        latency_before = query_latency(data_dir, args.repeats)
        log(f"before maintenance: {before}, latency {latency_before}")
        start = time.perf_counter()
        result = subprocess.run(
            [*LAKEHOUSE, "optimize"],
            cwd=str(Path(__file__).parent.parent),
            env=lakehouse_env(data_dir),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        optimize_s = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"lakehouse optimize failed:\n{result.stdout}\n{result.stderr}")
        after = table_stats(data_dir)
        latency_after = query_latency(data_dir, args.repeats)
        log(f"after maintenance ({optimize_s:.1f}s): {after}, latency {latency_after}")

    figures: list[Figure] = []
    for table, stats in before.items():
        figures.append(
            Figure(
                SECTION,
                f"{table} data files",
                "files",
                [float(after[table]["files"])],
                [float(stats["files"])],
                higher_is_better=False,
                baseline_name="before",
                detail={"before": stats, "after": after[table]},
            )
        )
    figures.append(
        Figure(
            SECTION,
            "Delta log JSON files (all tables)",
            "files",
            [float(sum(s["log_json_files"] for s in after.values()))],
            [float(sum(s["log_json_files"] for s in before.values()))],
            higher_is_better=False,
            baseline_name="before",
        )
    )
    for label, ms in latency_before.items():
        name = "connect (views over every table)" if label == "connect" else f"query: {label}"
        figures.append(
            Figure(
                SECTION,
                name,
                "ms",
                [latency_after[label]],
                [ms],
                higher_is_better=False,
                baseline_name="before",
            )
        )
    figures.append(
        Figure(
            SECTION,
            "lakehouse optimize (all tables)",
            "s",
            [optimize_s],
            [],
            higher_is_better=False,
            detail={"output": result.stdout[-2000:]},
        )
    )
    notes = [
        f"{args.duration:g} s of 1 s micro-batches of {args.rows:,} rows through `lakehouse "
        f"up` ({sent:,} rows); value = after `lakehouse optimize`, baseline = before it",
    ]
    render("Small files: file counts and query latency before/after maintenance", figures, notes)
    write_results(
        args.output,
        SECTION,
        figures,
        started,
        config={"duration_s": args.duration, "rows_per_batch": args.rows, "repeats": args.repeats},
        tables_before=before,
        tables_after=after,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
