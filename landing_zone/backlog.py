"""The landing backlog: files written and acknowledged but not yet in bronze.

Measured from the landing directories themselves (pending files plus batches
bronze has claimed but not committed), so it is right whichever process reads
it: the API for ``/ready`` and ``/metrics``, a bridge for back-pressure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from landing_zone.layout import LandingLayout, is_landing_name


@dataclass(frozen=True)
class SourceBacklog:
    """Waiting landing files of one source."""

    files: int
    bytes: int
    oldest_arrival: float | None  # epoch seconds (the file's ctime: its rename into landing)

    def oldest_age_s(self, now: float | None = None) -> float:
        """Seconds the oldest waiting file has waited (0 when none waits)."""
        if self.oldest_arrival is None:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - self.oldest_arrival)


def measure_backlog(layout: LandingLayout) -> dict[str, SourceBacklog]:
    """Per source: landing files not yet committed to bronze (pending or claimed).

    One ``stat`` per file (the directory entry's type needs none): a landing zone holds
    tens of thousands of files after an outage of the processor, and this runs in the
    API and the bridges, beside their hot paths.
    """
    backlog: dict[str, SourceBacklog] = {}
    for source in layout.sources_with_files():
        directories = [layout.source_dir(source)]
        directories += [claim for _, claim in layout.inflight_batches(source)]
        files, size, oldest = 0, 0, None
        for directory in directories:
            for stat in _landing_file_stats(directory):
                files += 1
                size += stat.st_size
                oldest = stat.st_ctime if oldest is None else min(oldest, stat.st_ctime)
        if files:
            backlog[source] = SourceBacklog(files, size, oldest)
    return backlog


def _landing_file_stats(directory: Path) -> Iterator[os.stat_result]:
    try:  # bronze removes claim directories as it finishes them
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            if not is_landing_name(entry.name):
                continue
            try:
                if entry.is_file():
                    yield entry.stat()
            except FileNotFoundError:  # claimed or archived meanwhile
                continue


class BacklogCollector(Collector):
    """``/metrics``: files, bytes and oldest age of the landing backlog, per source.

    Measured at scrape time, unless the last scan ended less than ``reuse_factor``
    times its own duration ago (and at most ``max_reuse_s``): then that scan answers.
    A small landing zone is scanned in microseconds, so every scrape sees it as it is;
    a backlog of many thousand files takes a good part of a second, and frequent
    scrapes (several Prometheus servers, a dashboard polling) could otherwise keep a
    bridge's or the API's threads scanning it most of the time.
    """

    def __init__(
        self, layout: LandingLayout, reuse_factor: float = 10.0, max_reuse_s: float = 5.0
    ) -> None:
        self._layout = layout
        self._reuse_factor = reuse_factor
        self._max_reuse_s = max_reuse_s
        # (when the last scan ended, how long it took, what it found)
        self._measured: tuple[float, float, dict[str, SourceBacklog]] | None = None

    def _backlog(self) -> dict[str, SourceBacklog]:
        measured = self._measured
        if measured is not None:
            ended, took, backlog = measured
            if time.monotonic() - ended < min(took * self._reuse_factor, self._max_reuse_s):
                return backlog
        started = time.monotonic()
        backlog = measure_backlog(self._layout)
        ended = time.monotonic()
        self._measured = (ended, ended - started, backlog)
        return backlog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The backlog's gauges; the totals keep their historical names."""
        backlog = self._backlog()
        now = time.time()
        files = GaugeMetricFamily(
            "lakehouse_landing_backlog_files",
            "Landing files waiting for bronze.",
            value=sum(b.files for b in backlog.values()),
        )
        size = GaugeMetricFamily(
            "lakehouse_landing_backlog_bytes",
            "Bytes of landing files waiting for bronze.",
            value=sum(b.bytes for b in backlog.values()),
        )
        oldest = GaugeMetricFamily(
            "lakehouse_landing_backlog_oldest_seconds",
            "Age of the oldest landing file waiting for bronze (0: none waits).",
            value=max((b.oldest_age_s(now) for b in backlog.values()), default=0.0),
        )
        per_source = {
            name: GaugeMetricFamily(
                f"lakehouse_landing_source_backlog_{name}", help_text, labels=["source"]
            )
            for name, help_text in (
                ("files", "Landing files waiting for bronze, per source."),
                ("bytes", "Bytes waiting for bronze, per source."),
                ("oldest_seconds", "Age of the oldest waiting file, per source."),
            )
        }
        for source, waiting in sorted(backlog.items()):
            per_source["files"].add_metric([source], waiting.files)
            per_source["bytes"].add_metric([source], waiting.bytes)
            per_source["oldest_seconds"].add_metric([source], waiting.oldest_age_s(now))
        yield files
        yield size
        yield oldest
        yield from per_source.values()
