"""Prometheus metrics of the bridges: their counters and Kafka consumer lag."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Counters = Callable[[], Mapping[str, int]]
PartitionLag = Callable[[], Mapping[tuple[str, int], int]]


class BridgeCollector(Collector):
    """Exposes every counter of every running bridge as ``lakehouse_bridge_<name>_total``.

    Read at scrape time from the bridges' own counters, so nothing is counted twice.
    Consumer lag is ``lakehouse_bridge_consumer_lag_messages`` per bridge, topic and
    partition, only for partitions whose lag is known.
    """

    def __init__(
        self, bridges: Mapping[str, Counters], lags: Mapping[str, PartitionLag] | None = None
    ) -> None:
        self._bridges = bridges
        self._lags = lags or {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """One metric family per counter name, labelled by bridge; then the lag."""
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
        if self._lags:
            lag = GaugeMetricFamily(
                "lakehouse_bridge_consumer_lag_messages",
                "Messages the broker holds past the bridge's last committed offset "
                "(landed and committed = done); absent while unknown.",
                labels=["bridge", "topic", "partition"],
            )
            for bridge, read_lag in self._lags.items():
                for (topic, partition), messages in sorted(read_lag().items()):
                    lag.add_metric([bridge, topic, str(partition)], messages)
            yield lag
