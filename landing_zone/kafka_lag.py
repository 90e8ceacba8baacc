"""Kafka consumer lag of the bridge, read from librdkafka's statistics.

Lag is what the bridge still owes the landing zone: per assigned partition, the
broker's end offset minus the bridge's last *committed* offset (a message
counts as done only once its landing file is durable and its offset is
committed). The end offset is the last stable offset (the bridge reads with
``isolation.level=read_committed``), or the high watermark when the broker
reports no stable offset.

Both offsets come from the statistics librdkafka emits every
``statistics.interval.ms``: their watermarks are the ones carried by fetch
responses. Watermarks from a separate ListOffsets request are not used: some
Kafka-protocol brokers (tansu, used in the tests) answer those wrongly. A
partition whose end or committed offset is not known yet (no fetch response
since it was assigned, nothing committed by this group) has no lag figure:
"unknown" is never reported as zero.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

Position = tuple[str, int]

# librdkafka's "invalid offset" sentinels are all negative (-1001 unknown, -1 ...).
_UNKNOWN = -1


class StatisticsError(ValueError):
    """The statistics JSON of librdkafka could not be read."""


def parse_statistics(text: str) -> Mapping[str, Any]:
    """The statistics document librdkafka passes to ``stats_cb``."""
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StatisticsError(f"librdkafka statistics are not JSON: {exc}") from None
    if not isinstance(stats, dict):
        raise StatisticsError("librdkafka statistics are not a JSON object")
    return stats


def partition_lag(
    stats: Mapping[str, Any],
    committed: Mapping[Position, int],
    assigned: Collection[Position],
) -> dict[Position, int]:
    """Messages not yet landed and committed, per assigned partition whose lag is known.

    ``committed`` holds the offsets this bridge committed itself (the next offset to
    read); a partition missing there falls back to the group's committed offset as
    librdkafka last saw it. Lag never goes below zero: the statistics' end offset
    can trail a commit made after they were taken.
    """
    topics = stats.get("topics")
    if not isinstance(topics, Mapping):
        return {}
    lag: dict[Position, int] = {}
    for topic, partition in assigned:
        entry = _partition_entry(topics, topic, partition)
        if entry is None:
            continue
        end = _offset(entry, "ls_offset")
        if end <= _UNKNOWN:
            end = _offset(entry, "hi_offset")
        position = committed.get((topic, partition), _offset(entry, "committed_offset"))
        if end <= _UNKNOWN or position <= _UNKNOWN:
            continue
        lag[(topic, partition)] = max(0, end - position)
    return lag


def _partition_entry(
    topics: Mapping[str, Any], topic: str, partition: int
) -> Mapping[str, Any] | None:
    topic_stats = topics.get(topic)
    if not isinstance(topic_stats, Mapping):
        return None
    partitions = topic_stats.get("partitions")
    if not isinstance(partitions, Mapping):
        return None
    entry = partitions.get(str(partition))
    return entry if isinstance(entry, Mapping) else None


def _offset(entry: Mapping[str, Any], name: str) -> int:
    value = entry.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else _UNKNOWN - 1
