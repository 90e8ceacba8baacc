#!/usr/bin/env python
"""Gold age: does a micro-batch cost more the older (larger) the gold tables are?

    .venv/bin/python bench/gold_age_bench.py            # 7, 90 and 365 days of history
    .venv/bin/python bench/gold_age_bench.py --quick    # 7 and 60 days
    .venv/bin/python bench/gold_age_bench.py --days 7,30 --series 100 --cycles 10

For each history length, one ``Processor`` takes a history of hourly readings of
``--series`` device/sensor pairs in one landing file, then ``--cycles`` micro-batches
of one new reading per series and one late reading per series for the history's last
hour (the streaming case: batches straddle hours, devices report late, so stored
windows are updated every cycle). "value" is the median ``run_once()`` of those micro-batches
with window gold tables partitioned by ``_window_date`` (the default), "baseline"
the same with ``partitioning.gold = "none"``: a MERGE rewrites every file holding a
row it updates, and an unpartitioned window table is one such file. The last figure
compares the partitioned cycle at the longest history with the shortest: it should
stay flat.
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

SECTION = "gold_age"
SOURCE = "readings"
START = datetime(2025, 1, 1, tzinfo=UTC)


def history_body(days: int, series: int) -> bytes:
    """One reading per hour per series over ``days`` days from ``START``."""
    lines = []
    for hour in range(days * 24):
        ts = (START + timedelta(hours=hour)).isoformat()
        for i in range(series):
            record = {"ts": ts, "device_id": f"d{i // 2}", "sensor": f"s{i % 2}",
                      "value": float(hour % 97 + i)}  # fmt: skip
            lines.append(json.dumps(record).encode())
    return b"\n".join(lines)


def cycle_body(days: int, series: int, step: int) -> bytes:
    """One reading per series in the hour after the history (minute ``step``), and a
    late one per series in the history's last hour, as a batch straddling two hours or
    a device reporting late brings: the stored windows of that hour are updated."""
    now = START + timedelta(days=days, minutes=step)
    late = now - timedelta(minutes=60 - 30 / 60)  # within the history's last hour
    return b"\n".join(
        json.dumps(
            {
                "ts": ts.isoformat(),
                "device_id": f"d{i // 2}",
                "sensor": f"s{i % 2}",
                "value": float(step),
            }
        ).encode()
        for ts in (now, late)
        for i in range(series)
    )


def cycle_times(
    data_dir: Path, gold_layout: str, days: int, series: int, cycles: int
) -> list[float]:
    """Seconds of each micro-batch's ``run_once()`` after a history of ``days`` days."""
    from config.contracts import ContractRegistry, load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor
    from landing_zone.formats import decode_batch
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingWriter

    readings = load_contracts()[SOURCE]
    partitioning = readings.partitioning.model_copy(update={"gold": gold_layout})
    contracts = ContractRegistry(
        {SOURCE: readings.model_copy(update={"partitioning": partitioning})}
    )
    settings = load_settings(data_dir=data_dir, trigger_latency_ms=0, file_settle_ms=0)
    writer = LandingWriter(LandingLayout(data_dir))
    processor = Processor(settings, contracts)
    writer.write_frame(SOURCE, decode_batch(history_body(days, series), "ndjson"))
    if processor.run_once().failures:
        raise RuntimeError("the history failed")
    times = []
    for step in range(cycles):
        writer.write_frame(SOURCE, decode_batch(cycle_body(days, series, step), "ndjson"))
        started = time.perf_counter()
        report = processor.run_once()
        times.append(time.perf_counter() - started)
        if report.failures:
            raise RuntimeError(f"cycle {step} failed: {report.failures}")
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="7 and 60 days")
    parser.add_argument("--days", help="comma-separated history lengths (default 7,90,365)")
    parser.add_argument("--series", type=int, default=100, help="device/sensor pairs (100)")
    parser.add_argument("--cycles", type=int, default=15, help="micro-batches measured (15)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gold_age.json")
    args = parser.parse_args(argv)
    days = args.days or ("7,60" if args.quick else "7,90,365")
    args.days = [int(d) for d in days.split(",")]
    if len(args.days) < 2 or min(args.days) < 1:
        parser.error("--days needs at least two lengths of 1 day or more")
    if not 1 <= args.cycles < 60:  # cycle n is at minute n: later ones leave the hour
        parser.error("--cycles must be between 1 and 59")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    runs: dict[tuple[str, int], list[float]] = {}
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-gold-age-", dir=args.workdir) as tmp,
    ):
        for days in args.days:
            for layout in ("window_date", "none"):
                data_dir = Path(tmp) / f"{layout}-{days}"
                times = cycle_times(data_dir, layout, days, args.series, args.cycles)
                runs[(layout, days)] = [t * 1e3 for t in times]
                log(f"{days} days, gold {layout}: {statistics.median(times) * 1e3:.0f} ms/cycle")
    rows = args.series * 24
    figures = [
        Figure(
            SECTION,
            f"micro-batch after {days} days ({days * rows:,} hourly windows)",
            "ms",
            runs[("window_date", days)],
            runs[("none", days)],
            higher_is_better=False,
            baseline_name="gold unpartitioned",
        )
        for days in args.days
    ]
    shortest, longest = min(args.days), max(args.days)
    figures.append(
        Figure(
            SECTION,
            f"partitioned micro-batch: {longest} vs {shortest} days of history",
            "ms",
            runs[("window_date", longest)],
            runs[("window_date", shortest)],
            higher_is_better=False,
            baseline_name=f"{shortest} days",
            target=Target("ratio", "<=", 1.5),
        )
    )
    notes = [
        f"{args.series} series, one reading per hour of history, then {args.cycles} "
        "run_once() micro-batches (median) of one reading per series in the next hour and "
        "one late reading per series for the history's last hour"
    ]
    render("Gold micro-batch cost vs table age", figures, notes)
    write_results(args.output, SECTION, figures, started, config=vars(args) | {"output": None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
