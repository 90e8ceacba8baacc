#!/usr/bin/env python
"""Run every benchmark section and merge their results into bench/results/latest.json.

    .venv/bin/python bench/run_all.py                       # `make bench`: every section
    .venv/bin/python bench/run_all.py --quick               # `make bench-quick`
    .venv/bin/python bench/run_all.py --sections freshness,bridges

Sections (script): api, pipeline, query (pipeline_bench.py); freshness
(freshness_bench.py); backlog (backlog_bench.py); bridges (bridges_bench.py);
small_files (small_files_bench.py); lifetime (lifetime_bench.py); gold_age
(gold_age_bench.py). Each script runs as a subprocess, prints its own table and
writes its own JSON; this merges them (``sections`` per script, ``figures`` all
together, each with its target and pass/fail) and prints a summary. A script that
fails is recorded under ``failed`` and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO, RESULTS_DIR, fmt, log, machine_info, sigterm_as_exit

SCRIPTS: dict[str, tuple[str, ...]] = {  # script -> the sections it measures
    "pipeline_bench.py": ("api", "pipeline", "query"),
    "freshness_bench.py": ("freshness",),
    "backlog_bench.py": ("backlog",),
    "bridges_bench.py": ("bridges",),
    "small_files_bench.py": ("small_files",),
    "lifetime_bench.py": ("lifetime",),
    "gold_age_bench.py": ("gold_age",),
}
ALL_SECTIONS = [s for sections in SCRIPTS.values() for s in sections]
QUERY_TARGET = "ratio <= 1.2"  # issue 7: gold queries at most 1.2x plain Parquet


def annotate(figure: dict[str, Any]) -> dict[str, Any]:
    """Targets of the issue for figures whose script does not state one."""
    if (
        "target" not in figure
        and figure.get("section") == "query"
        and not figure["name"].startswith("connect")
    ):
        figure["target"] = QUERY_TARGET
        ratio = figure.get("ratio")
        figure["passed"] = None if ratio is None else ratio <= 1.2
    return figure


def summary(figures: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="All benchmark figures (value vs baseline)", box=box.ASCII2, title_justify="left"
    )
    for header in ("section", "measure", "unit", "value", "baseline", "ratio", "target", "pass"):
        table.add_column(
            header, justify="right" if header in {"value", "baseline", "ratio"} else "left"
        )
    for f in figures:
        passed = f.get("passed")
        table.add_row(
            f["section"],
            f["name"],
            f["unit"],
            fmt(f.get("value")),
            fmt(f.get("baseline")),
            fmt(f.get("ratio")),
            f.get("target") or "-",
            "-" if passed is None else ("PASS" if passed else "FAIL"),
        )
    Console(width=170, highlight=False).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="every script in quick mode")
    parser.add_argument(
        "--sections",
        default=",".join(ALL_SECTIONS),
        help=f"comma-separated subset of {','.join(ALL_SECTIONS)}",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directories")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := wanted - set(ALL_SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    if "query" in wanted:
        wanted.add("pipeline")  # the query section reads the pipeline's tables

    started = time.perf_counter()
    info = machine_info()
    sections: dict[str, Any] = {}
    failed: dict[str, str] = {}
    figures: list[dict[str, Any]] = []
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for script, provides in SCRIPTS.items():
            chosen = [s for s in provides if s in wanted]
            if not chosen:
                continue
            output = Path(tmp) / f"{script.removesuffix('.py')}.json"
            cmd = [sys.executable, str(BENCH_DIR / script), "--output", str(output)]
            if args.quick:
                cmd.append("--quick")
            if script == "pipeline_bench.py":
                cmd += ["--sections", ",".join(chosen)]
            if args.workdir:
                cmd += ["--workdir", str(args.workdir)]
            log(f"running {script} ({', '.join(chosen)})")
            begun = time.perf_counter()
            code = subprocess.call(cmd, cwd=REPO)
            elapsed = round(time.perf_counter() - begun, 1)
            if code != 0 or not output.exists():
                failed[script] = f"exit code {code} after {elapsed}s"
                log(f"{script} FAILED ({failed[script]})")
                continue
            payload = json.loads(output.read_text())
            payload["wall_s"] = elapsed
            sections[script.removesuffix(".py")] = payload
            for figure in payload.get("figures", []):
                figures.append({"script": script, **annotate(figure)})

    merged = {
        "machine": info,
        "mode": "quick" if args.quick else "normal",
        "sections_requested": sorted(wanted),
        "duration_s": round(time.perf_counter() - started, 1),
        "loadavg_1m_at_end": machine_info()["loadavg_1m"],
        "figures": figures,
        "sections": sections,
        "failed": failed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    summary(figures)
    log(
        f"wrote {args.output} ({merged['duration_s']}s in all)"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
