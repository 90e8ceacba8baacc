"""Shared plumbing of the bench scripts: figures with targets, subprocesses, tables, JSON.

Every script in ``bench/`` measures figures beside a baseline taken in the same run,
each the median of N runs, and reports value, baseline, ratio, target and pass/fail.
``bench/run_all.py`` merges the JSON of every script into ``bench/results/latest.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO) not in sys.path:  # scripts run as `python bench/x.py`: make the repo importable
    sys.path.insert(0, str(REPO))

LAKEHOUSE = [sys.executable, "-m", "cli.main"]


# ---------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Target:
    """A goal on the figure's ``value`` or on its ``ratio`` to the baseline."""

    on: Literal["value", "ratio"]
    op: Literal["<=", ">="]
    limit: float

    def met(self, figure: Figure) -> bool | None:
        got = figure.value if self.on == "value" else figure.ratio
        if got != got:  # NaN: no baseline
            return None
        return got <= self.limit if self.op == "<=" else got >= self.limit

    def describe(self, unit: str) -> str:
        return f"{self.on} {self.op} {self.limit:g}" + (f" {unit}" if self.on == "value" else "")


@dataclass
class Figure:
    """One measured figure beside its baseline, both the median of N runs."""

    section: str
    name: str
    unit: str
    runs: list[float]
    baseline_runs: list[float]
    higher_is_better: bool
    baseline_name: str = ""
    target: Target | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def baseline(self) -> float:
        return statistics.median(self.baseline_runs) if self.baseline_runs else float("nan")

    @property
    def ratio(self) -> float:
        """Figure divided by its baseline (NaN without one)."""
        base = self.baseline
        return self.value / base if base and base == base else float("nan")

    @property
    def passed(self) -> bool | None:
        return self.target.met(self) if self.target else None

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if x != x else x

        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "value": num(self.value),
            "baseline": num(self.baseline),
            "baseline_name": self.baseline_name,
            "ratio": num(self.ratio),
            "higher_is_better": self.higher_is_better,
            "target": self.target.describe(self.unit) if self.target else None,
            "passed": self.passed,
            "runs": self.runs,
            "baseline_runs": self.baseline_runs,
            **({"detail": self.detail} if self.detail else {}),
        }


def fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def render(title: str, figures: list[Figure], notes: Sequence[str] = ()) -> None:
    """Print ``figures`` as one table: value, baseline, ratio, target, pass/fail."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160, highlight=False)
    table = Table(title=title, box=box.ASCII2, title_justify="left")
    for header in ("measure", "unit", "value", "baseline", "ratio", "target", "pass"):
        table.add_column(header, justify="right" if header in {"value", "ratio"} else "left")
    for figure in figures:
        passed = figure.passed
        table.add_row(
            figure.name,
            figure.unit,
            fmt(figure.value),
            f"{fmt(figure.baseline)} ({figure.baseline_name})" if figure.baseline_runs else "-",
            fmt(figure.ratio),
            figure.target.describe(figure.unit) if figure.target else "-",
            "-" if passed is None else ("PASS" if passed else "FAIL"),
        )
    console.print(table)
    for note in notes:
        console.print(f"  {note}")


def write_results(
    path: Path, section: str, figures: list[Figure], started: float, **extra: Any
) -> None:
    payload = {
        "section": section,
        "machine": machine_info(),
        "duration_s": round(time.perf_counter() - started, 1),
        "figures": [f.to_json() for f in figures],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")


# ---------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def lakehouse_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment without the caller's LAKEHOUSE_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env.update(LAKEHOUSE_DATA_DIR=str(data_dir), LAKEHOUSE_LOG_LEVEL="WARNING", COLUMNS="200")
    env.update(extra)
    return env


def machine_info() -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{
            p: version(p) for p in ("polars", "deltalake", "duckdb", "paho-mqtt", "confluent-kafka")
        },
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def spawn(
    cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as handle:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a no-op for a finished process."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MiB; NaN if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def current_rss_mib(pid: int) -> float:
    """VmRSS of a running process, in MiB; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_with_rusage(
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    log_path: Path | None = None,
    rss_limit_mib: float | None = None,
) -> float:
    """Wait for ``proc``; its exit must be 0. Returns its own peak RSS in MiB (wait4).

    With ``rss_limit_mib``, the process is killed (and this raises) once its resident set
    grows past it: a benchmark must not take a shared machine's memory."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} took more than {timeout}s")
            if rss_limit_mib and (rss := current_rss_mib(proc.pid)) > rss_limit_mib:
                raise MemoryError(
                    f"{what}: RSS {rss:.0f} MiB over the {rss_limit_mib:.0f} MiB limit"
                )
            time.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:] if log_path else ""
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    return usage.ru_maxrss / 1024  # Linux: KiB


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so every ``finally`` (subprocesses, temp dirs) runs."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for(probe: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not reached within {timeout}s")
