"""Prometheus metrics of the processor: per-stage batches, rows and latency, quality
outcomes, end-to-end freshness of gold, and maintenance runs.

The metric objects live in this collector, not in the global registry: whoever
serves ``/metrics`` (the API inside ``lakehouse up``, or ``lakehouse process
--metrics-port``) registers it, and tests get fresh counters per processor.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Stage = str  # "bronze" | "silver" | "gold"

# Micro-batches take milliseconds to tens of seconds; freshness seconds to minutes.
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 900, 3600)


class PipelineMetrics(Collector):
    """The processor's counters; pass one to :class:`~delta_processing.processor.Processor`."""

    def __init__(self) -> None:
        self.stage_seconds = Histogram(
            "lakehouse_stage_batch_seconds",
            "Time one micro-batch took in a stage (only batches that did work).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=None,
        )
        self.stage_batches = Counter(
            "lakehouse_stage_batches",
            "Micro-batches committed per stage and source (gold: per table).",
            ["stage", "source"],
            registry=None,
        )
        self.stage_rows = Counter(
            "lakehouse_stage_rows",
            "Rows written per stage and source (gold: groups recomputed per table).",
            ["stage", "source"],
            registry=None,
        )
        self.quality_rows = Counter(
            "lakehouse_quality_rows",
            "Silver outcomes per source: rows in, upserted, quarantined.",
            ["source", "outcome"],
            registry=None,
        )
        self.quarantined_files = Counter(
            "lakehouse_quarantined_files",
            "Landing files bronze could not read and set aside.",
            ["source"],
            registry=None,
        )
        self.stage_failures = Counter(
            "lakehouse_stage_failures",
            "Processing failures per source (the source is retried next cycle).",
            ["source"],
            registry=None,
        )
        self.storage_unavailable = Counter(
            "lakehouse_storage_unavailable",
            "Processing cycles ended early because the table storage could not be reached "
            "(retried with back-off; no input is given up).",
            registry=None,
        )
        self.end_to_end = Histogram(
            "lakehouse_end_to_end_seconds",
            "From a landing file being written (the writer's acknowledgement) to its rows "
            "being in gold; observed for the oldest file of each batch.",
            ["source"],
            buckets=_FRESHNESS_BUCKETS,
            registry=None,
        )
        self.maintenance_runs = Counter(
            "lakehouse_maintenance_runs",
            "Maintenance work done: compaction, checkpoint, log_cleanup, vacuum, retention.",
            ["operation"],
            registry=None,
        )
        self.housekeeping_seconds = Gauge(
            "lakehouse_housekeeping_last_seconds",
            "Duration of the last housekeeping pass.",
            registry=None,
        )
        # gold table -> landing time (epoch seconds) of the newest data it holds
        self._gold_data_as_of: dict[str, float] = {}

    def record_gold_data(self, table: str, landed_at: datetime) -> None:
        """``table`` now holds data that landed at ``landed_at`` (keeps the newest)."""
        stamp = landed_at.timestamp()
        if stamp > self._gold_data_as_of.get(table, 0.0):
            self._gold_data_as_of[table] = stamp

    def observe_end_to_end(self, source: str, landed_at: Iterable[datetime]) -> None:
        """Record how long the given landing files took to reach gold (now)."""
        now = datetime.now(UTC)
        for stamp in landed_at:
            self.end_to_end.labels(source).observe(max(0.0, (now - stamp).total_seconds()))

    def _metrics(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
            self.stage_seconds,
            self.stage_batches,
            self.stage_rows,
            self.quality_rows,
            self.quarantined_files,
            self.stage_failures,
            self.storage_unavailable,
            self.end_to_end,
            self.maintenance_runs,
            self.housekeeping_seconds,
        )

    def collect(self) -> Iterator[Metric]:
        """Every metric above, plus the gold freshness gauge computed at scrape time."""
        for metric in self._metrics():
            yield from metric.collect()
        freshness = GaugeMetricFamily(
            "lakehouse_gold_freshness_seconds",
            "Age of the newest landed data each gold table holds (now - its landing time).",
            labels=["table"],
        )
        now = time.time()
        for table, stamp in sorted(self._gold_data_as_of.items()):
            freshness.add_metric([table], max(0.0, now - stamp))
        yield freshness
