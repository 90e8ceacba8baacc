#!/usr/bin/env python
"""Pipeline throughput on a backlog: rows/s from landing to gold, and peak RSS.

    .venv/bin/python bench/backlog_bench.py                  # 10M rows, Parquet + NDJSON, 3 runs
    .venv/bin/python bench/backlog_bench.py --quick          # 1M rows, Parquet, 1 run
    .venv/bin/python bench/backlog_bench.py --rows 20000000 --formats ndjson --runs 1

A backlog of ``--rows`` readings (1,000 series, one reading a minute each: the data of
``bench/pipeline_bench.py``) waits in ``landing/readings/`` as files of
``--rows-per-file`` rows, then ``lakehouse process --once`` (a subprocess: the real
command) drains it through bronze, silver and gold. Its wall time (interpreter start
included) gives rows/s; ``wait4`` gives its own peak RSS.

Landing formats (``--formats``):

- ``parquet``: what every writer (API, MQTT, Kafka) lands: ``LandingWriter.write_frame``
  files (raw strings, zstd Parquet);
- ``ndjson``: the same rows as hand-dropped ``.ndjson`` files (numeric values, as devices
  send them), the raw format the issue's ceiling names.

Ceiling, same files, same format: a child process that reads them with
``polars.read_parquet`` / ``polars.read_ndjson`` in chunks of the processor's bronze
micro-batch bounds (``LAKEHOUSE_BATCH_MAX_FILES`` / ``_BYTES``) and appends each chunk to
one Delta table with ``write_deltalake``: no typing, no de-duplication, no gold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
from common import (
    LAKEHOUSE,
    RESULTS_DIR,
    Figure,
    Target,
    lakehouse_env,
    log,
    render,
    sigterm_as_exit,
    spawn,
    wait_with_rusage,
    write_results,
)

SECTION = "backlog"
SOURCE = "readings"
CHILD_TIMEOUT_S = 3 * 3600.0
GIB = 1024.0


def seed(directory: Path, fmt: str, rows: int, rows_per_file: int) -> dict[str, Any]:
    """Write the backlog once; each run hard-links it into a fresh data dir."""
    from pipeline_bench import readings_frame

    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter

    start = time.perf_counter()
    target = directory / "landing" / SOURCE
    target.mkdir(parents=True)
    writer = LandingWriter(LandingLayout(directory))
    chunk = max(rows_per_file, (1_000_000 // rows_per_file) * rows_per_file)
    files = 0
    for first in range(0, rows, chunk):
        frame = readings_frame(first, min(chunk, rows - first))
        if fmt == "ndjson":
            frame = frame.with_columns(pl.col("value").cast(pl.Float64))
        for offset in range(0, frame.height, rows_per_file):
            part = frame.slice(offset, rows_per_file)
            if fmt == "parquet":
                writer.write_frame(SOURCE, part)
            else:
                part.write_ndjson(target / f"backlog-{files:07d}.ndjson")
            files += 1
    landed = sorted(p for p in target.iterdir() if p.is_file())
    return {
        "files": len(landed),
        "bytes": sum(p.stat().st_size for p in landed),
        "seed_seconds": round(time.perf_counter() - start, 1),
    }


def link_landing(seed_dir: Path, data_dir: Path) -> None:
    target = data_dir / "landing" / SOURCE
    target.mkdir(parents=True)
    for path in sorted((seed_dir / "landing" / SOURCE).iterdir()):
        if path.is_file():
            os.link(path, target / path.name)


def table_rows(data_dir: Path) -> dict[str, int]:
    out = {}
    for layer, name in (
        ("bronze", SOURCE),
        ("silver", SOURCE),
        ("quarantine", SOURCE),
        ("gold", "readings_hourly"),
    ):
        if (data_dir / layer / name / "_delta_log").is_dir():
            out[f"{layer}.{name}"] = int(
                pl.scan_delta(str(data_dir / layer / name)).select(pl.len()).collect().item()
            )
    return out


def run_lakehouse(
    seed_dir: Path, workdir: Path, run: int, rss_limit_mib: float, extra_env: dict[str, str]
) -> tuple[float, float, dict[str, Any]]:
    """``lakehouse process --once`` over the backlog: seconds, peak RSS MiB, table rows."""
    data_dir = workdir / f"lakehouse-{run}"
    link_landing(seed_dir, data_dir)
    log_path = workdir / f"process-{run}.log"
    env = lakehouse_env(data_dir, LAKEHOUSE_FILE_SETTLE_MS="0", **extra_env)
    start = time.perf_counter()
    proc = spawn([*LAKEHOUSE, "process", "--once"], env, log_path)
    rss = wait_with_rusage(
        proc, CHILD_TIMEOUT_S, "lakehouse process --once", log_path, rss_limit_mib
    )
    seconds = time.perf_counter() - start
    rows = table_rows(data_dir)
    left = list((data_dir / "landing" / SOURCE).iterdir())
    shutil.rmtree(data_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"{len(left)} landing files left after process --once")
    return seconds, rss, rows


def run_ceiling(
    seed_dir: Path, workdir: Path, run: int, fmt: str, extra_env: dict[str, str]
) -> tuple[float, float, dict[str, Any]]:
    table = workdir / f"ceiling-{run}"
    result = workdir / f"ceiling-{run}.json"
    log_path = workdir / f"ceiling-{run}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ceiling-child",
        str(seed_dir / "landing" / SOURCE),
        str(table),
        fmt,
        str(result),
    ]
    start = time.perf_counter()
    proc = spawn(cmd, lakehouse_env(workdir, **extra_env), log_path)
    rss = wait_with_rusage(proc, CHILD_TIMEOUT_S, "ceiling", log_path)
    seconds = time.perf_counter() - start
    shutil.rmtree(table, ignore_errors=True)
    return seconds, rss, json.loads(result.read_text())


def ceiling_child(landing: Path, table: Path, fmt: str, result: Path) -> None:
    """Child: read the files in bronze-sized chunks, append each chunk to one Delta table."""
    from deltalake import write_deltalake

    from config.settings import load_settings
    from delta_processing.bronze import estimated_rows

    settings = load_settings(data_dir=table.parent)
    files = sorted(p for p in landing.iterdir() if p.is_file())
    chunks: list[list[Path]] = [[]]
    size = count = 0
    for path in files:
        length = path.stat().st_size
        estimate = estimated_rows(path, length)
        if chunks[-1] and (
            len(chunks[-1]) >= settings.batch_max_files
            or size + length > settings.batch_max_bytes
            or count + estimate > settings.batch_max_rows
        ):
            chunks.append([])
            size = count = 0
        chunks[-1].append(path)
        size += length
        count += estimate
    rows = 0
    for chunk in chunks:
        names = [str(p) for p in chunk]
        frame = pl.read_parquet(names) if fmt == "parquet" else pl.read_ndjson(names)
        rows += frame.height
        write_deltalake(
            str(table), frame.to_arrow(compat_level=pl.CompatLevel.oldest()), mode="append"
        )
        del frame
    result.write_text(json.dumps({"rows": rows, "chunks": len(chunks)}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1M rows, Parquet only, 1 run")
    parser.add_argument("--rows", type=int, help="backlog rows (default 10M; quick 1M)")
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--formats", help="parquet,ndjson (default both; quick parquet)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument(
        "--rss-limit-mib",
        type=float,
        default=8192,
        help="kill the processor (and fail) past this resident set (default 8192)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="LAKEHOUSE_X=V",
        help="setting for the processor and the ceiling's batch bounds (repeatable), "
        "e.g. LAKEHOUSE_BATCH_MAX_FILES=100",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "backlog.json")
    parser.add_argument("--ceiling-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    args.formats = [
        f.strip()
        for f in (args.formats or ("parquet" if args.quick else "parquet,ndjson")).split(",")
    ]
    if set(args.formats) - {"parquet", "ndjson"}:
        parser.error(f"unknown format in {args.formats}")
    args.runs = args.runs or (1 if args.quick else 3)
    pairs = [item.partition("=") for item in args.env]
    if any(not k.startswith("LAKEHOUSE_") or not eq for k, eq, _ in pairs):
        parser.error("--env takes LAKEHOUSE_NAME=VALUE")
    args.env = {k: v for k, _, v in pairs}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ceiling_child:
        landing, table, fmt, result = args.ceiling_child
        ceiling_child(Path(landing), Path(table), fmt, Path(result))
        return 0
    started = time.perf_counter()
    figures: list[Figure] = []
    extras: dict[str, Any] = {}
    notes: list[str] = []
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-backlog-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        for fmt in args.formats:
            seed_dir = workdir / f"seed-{fmt}"
            info = seed(seed_dir, fmt, args.rows, args.rows_per_file)
            log(
                f"seeded {args.rows:,} rows as {info['files']} {fmt} files "
                f"({info['bytes'] / 2**20:.0f} MiB) in {info['seed_seconds']}s"
            )
            ours: list[tuple[float, float, dict[str, Any]]] = []
            base: list[tuple[float, float, dict[str, Any]]] = []
            for run in range(args.runs):
                ours.append(run_lakehouse(seed_dir, workdir, run, args.rss_limit_mib, args.env))
                seconds, rss, rows = ours[-1]
                log(
                    f"{fmt} run {run + 1}/{args.runs} lakehouse: {seconds:.1f}s "
                    f"({args.rows / seconds:,.0f} rows/s), peak RSS {rss:.0f} MiB, {rows}"
                )
                if rows.get("silver.readings") != args.rows:
                    raise RuntimeError(f"silver holds {rows} rows, expected {args.rows}")
                base.append(run_ceiling(seed_dir, workdir, run, fmt, args.env))
                seconds, rss, info_c = base[-1]
                log(
                    f"{fmt} run {run + 1}/{args.runs} ceiling: {seconds:.1f}s "
                    f"({args.rows / seconds:,.0f} rows/s), peak RSS {rss:.0f} MiB, {info_c}"
                )
            shutil.rmtree(seed_dir, ignore_errors=True)
            reader = "read_parquet" if fmt == "parquet" else "read_ndjson"
            label = f"{fmt} landing, {args.rows:,} rows in {info['files']} files"
            figures.append(
                Figure(
                    SECTION,
                    f"{label}: landing -> gold",
                    "rows/s",
                    [args.rows / s for s, _, _ in ours],
                    [args.rows / s for s, _, _ in base],
                    higher_is_better=True,
                    baseline_name=f"{reader}+write_deltalake",
                    target=Target("ratio", ">=", 0.5),
                    detail={
                        "seconds": [s for s, _, _ in ours],
                        "ceiling_seconds": [s for s, _, _ in base],
                        "tables": ours[-1][2],
                        **info,
                    },
                )
            )
            figures.append(
                Figure(
                    SECTION,
                    f"{label}: peak RSS",
                    "MiB",
                    [r for _, r, _ in ours],
                    [r for _, r, _ in base],
                    higher_is_better=False,
                    baseline_name=f"{reader}+write_deltalake",
                    target=Target("value", "<=", GIB),
                )
            )
            extras[fmt] = info
    notes.append(
        "lakehouse = wall time of `lakehouse process --once` (subprocess, start-up included) "
        "over the backlog; ceiling = a subprocess reading the same files in the processor's "
        "bronze batch bounds and appending them raw to one Delta table"
    )
    render(f"Pipeline throughput on a backlog ({args.runs} run(s))", figures, notes)
    write_results(
        args.output,
        SECTION,
        figures,
        started,
        config={
            "env": args.env,
            "rows": args.rows,
            "rows_per_file": args.rows_per_file,
            "formats": args.formats,
            "runs": args.runs,
        },
        extras=extras,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
