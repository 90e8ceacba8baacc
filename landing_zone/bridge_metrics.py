"""Prometheus metrics of the bridges: their counters, and the landing backlog."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Counters = Callable[[], Mapping[str, int]]


class BridgeCollector(Collector):
    """Exposes every counter of every running bridge as ``lakehouse_bridge_<name>_total``.

    Read at scrape time from the bridges' own counters, so nothing is counted twice.
    """

    def __init__(self, bridges: Mapping[str, Counters], backlog: Callable[[], int]) -> None:
        self._bridges = bridges
        self._backlog = backlog

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """One metric family per counter name, labelled by bridge."""
        families: dict[str, CounterMetricFamily] = {}
        for bridge, read in self._bridges.items():
            for name, value in read().items():
                family = families.setdefault(
                    name,
                    CounterMetricFamily(
                        f"lakehouse_bridge_{name}", f"Bridge counter {name}.", labels=["bridge"]
                    ),
                )
                family.add_metric([bridge], value)
        yield from families.values()
        yield GaugeMetricFamily(
            "lakehouse_landing_backlog_files",
            "Landing files waiting for bronze.",
            value=self._backlog(),
        )
