#!/usr/bin/env python
"""Lifetime: does one processor's micro-batch get slower the longer it runs?

    .venv/bin/python bench/lifetime_bench.py               # 500 cycles
    .venv/bin/python bench/lifetime_bench.py --quick       # 200 cycles
    .venv/bin/python bench/lifetime_bench.py --cycles 2000

One ``Processor`` (as ``lakehouse up`` keeps one for its whole life) takes one small
landing file per ``run_once()`` (20 readings and one that breaks the contract, so
bronze, silver, quarantine, quality and the three gold tables all commit each cycle).
"value" is the median cycle time of the last ``--window`` cycles, "baseline" that of
the first ``--window``: a ratio well above 1 means cost grows with the commits a
process has made (in the fifth session: deltalake's table objects slowed down with
every commit they moved through, 224 -> 622 ms over 500 cycles before they were
reloaded). Housekeeping does not run here, so the log grows throughout: some growth
(deltalake lists the whole log on every commit) is expected and is what the log
retention bounds in production.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from common import RESULTS_DIR, Figure, Target, log, render, sigterm_as_exit, write_results

SECTION = "lifetime"
SOURCE = "readings"


def landing_body(step: int) -> bytes:
    """One micro-batch: 20 readings of instant ``step`` and one unparseable value."""
    at = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(seconds=step)
    rows: list[dict[str, object]] = [
        {"ts": at.isoformat(), "device_id": f"d{i}", "sensor": "t", "value": float(step)}
        for i in range(20)
    ]
    rows.append({"ts": at.isoformat(), "device_id": "bad", "sensor": "t", "value": "n/a"})
    return b"\n".join(json.dumps(row).encode() for row in rows)


def run_cycles(data_dir: Path, cycles: int) -> list[float]:
    """Seconds of each ``run_once()`` of one processor, one landing file per cycle."""
    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor
    from landing_zone.formats import decode_batch
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter

    settings = load_settings(data_dir=data_dir, trigger_latency_ms=0, file_settle_ms=0)
    writer = LandingWriter(LandingLayout(data_dir))
    processor = Processor(settings, load_contracts())
    times = []
    for step in range(cycles):
        writer.write_frame(SOURCE, decode_batch(landing_body(step), "ndjson"))
        started = time.perf_counter()
        report = processor.run_once()
        times.append(time.perf_counter() - started)
        if report.failures:
            raise RuntimeError(f"cycle {step} failed: {report.failures}")
        if step and step % 100 == 0:
            log(f"cycle {step}: last {statistics.median(times[-20:]) * 1e3:.0f} ms")
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="200 cycles")
    parser.add_argument("--cycles", type=int, help="micro-batches (default 500; quick 200)")
    parser.add_argument("--window", type=int, default=50, help="cycles per median (50)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "lifetime.json")
    args = parser.parse_args(argv)
    args.cycles = args.cycles or (200 if args.quick else 500)
    if args.cycles < 2 * args.window:
        parser.error("--cycles must be at least twice --window")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-lifetime-", dir=args.workdir) as tmp,
    ):
        times = run_cycles(Path(tmp), args.cycles)
    first, last = times[: args.window], times[-args.window :]
    figure = Figure(
        SECTION,
        f"one small file per cycle: cycles {args.cycles - args.window + 1}-{args.cycles} "
        f"vs 1-{args.window}",
        "ms",
        [statistics.median(last) * 1e3],
        [statistics.median(first) * 1e3],
        higher_is_better=False,
        baseline_name=f"first {args.window} cycles",
        target=Target("ratio", "<=", 1.5),
        detail={"cycle_ms": [round(t * 1e3, 1) for t in times]},
    )
    notes = [
        "one Processor, run_once() per landing file (20 readings + 1 quarantined row); "
        "no housekeeping, so the Delta logs grow throughout"
    ]
    render(f"Processor lifetime ({args.cycles} cycles)", [figure], notes)
    write_results(args.output, SECTION, [figure], started, config=vars(args) | {"output": None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
