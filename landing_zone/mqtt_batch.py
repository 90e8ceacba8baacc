"""A batch of received MQTT messages turned, in bulk, into landing frames and dead letters.

The MQTT bridge's network callback only queues each message; a whole batch is then
mapped here at once, which is what keeps the bridge close to a bare subscriber loop:

- topics are mapped through a memo (:class:`TopicMapper`), since a fleet publishes on a
  bounded set of topics and a topic's mapping depends on the topic alone;
- payloads take :func:`~landing_zone.mqtt_topics.decode_payload`'s fast path for plain
  JSON objects, the full checks only for anything unusual;
- records become one all-String frame per source, built column by column.

Every rule stays in :mod:`landing_zone.mqtt_topics`: a message maps here exactly as
:func:`~landing_zone.mqtt_topics.map_message` maps it, or becomes a dead letter carrying
its raw bytes and :class:`~landing_zone.mqtt_topics.MessageRejected`'s reason.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from landing_zone.mqtt_topics import (
    MessageRejected,
    RawRecord,
    TopicMatch,
    TopicPattern,
    iso_utc,
    map_topic,
    message_record,
)

log = structlog.get_logger(__name__)

# Distinct topics remembered (~1 KB each). A fleet with more simply maps the overflow
# without the memo after it is cleared; correctness never depends on it.
TOPIC_MEMO_SIZE = 32_768


# A received message as the bridge queues it: (mid, qos, topic bytes, payload, receive
# time by time.monotonic()). A plain tuple of atoms: cheap to make in the network callback,
# and invisible to the garbage collector, unlike paho's message objects.
Received = tuple[int, int, bytes, bytes, float]


@dataclass(frozen=True)
class MappedTopic:
    """A topic as received, decoded, and what it maps to (or why it cannot map)."""

    topic: str  # bytes that are not UTF-8 are shown backslash-escaped
    match: TopicMatch | None
    rejection: str | None  # set exactly when match is None


class TopicMapper:
    """:func:`~landing_zone.mqtt_topics.map_topic` memoised per topic (rejections too)."""

    def __init__(self, patterns: Iterable[TopicPattern], max_topics: int = TOPIC_MEMO_SIZE) -> None:
        self._patterns = list(patterns)
        self._max_topics = max_topics
        self._memo: dict[bytes, MappedTopic] = {}

    def map(self, raw_topic: bytes) -> MappedTopic:
        """The mapping of a topic, given as the bytes the broker sent."""
        found = self._memo.get(raw_topic)
        if found is None:
            found = self._map(raw_topic)
            if len(self._memo) >= self._max_topics:
                self._memo.clear()  # O(1) bound; a fleet this varied re-fills it as it goes
            self._memo[raw_topic] = found
        return found

    def _map(self, raw_topic: bytes) -> MappedTopic:
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:  # brokers should refuse these; never lose the bytes
            topic = raw_topic.decode("utf-8", errors="backslashreplace")
            return MappedTopic(topic, None, f"topic {topic!r} is not valid UTF-8")
        try:
            return MappedTopic(topic, map_topic(topic, self._patterns), None)
        except MessageRejected as exc:
            return MappedTopic(topic, None, exc.reason)


@dataclass
class SourceBatch:
    """The records of one landing source in a batch, and the messages they came from."""

    records: list[RawRecord] = field(default_factory=list)
    # (message, decoded topic, receive time) of each record, for dead_letters.
    origins: list[tuple[Received, str, datetime]] = field(default_factory=list)

    def dead_letters(self, error: str) -> list[dict[str, str]]:
        """Every message of this source as a dead letter with ``error`` (an unwritable batch)."""
        return [dead_letter(m[3], topic, at, error) for m, topic, at in self.origins]

    @property
    def messages(self) -> list[Received]:
        """The message of each record, in order."""
        return [m for m, _, _ in self.origins]


@dataclass
class MappedBatch:
    """A batch split into per-source records and dead letters, in arrival order."""

    sources: dict[str, SourceBatch]
    dead_letters: list[dict[str, str]]
    # The message of each dead letter, in the same order (the bridge's redelivery journal
    # records which file holds every message).
    dead_letter_messages: list[Received] = field(default_factory=list)


def map_batch(
    messages: Sequence[Received], mapper: TopicMapper, *, wall_offset: float | None = None
) -> MappedBatch:
    """Map every message of a batch; poison messages become dead letters, never errors.

    ``wall_offset`` (tests) turns a message's monotonic receive time into epoch seconds;
    by default it is taken from the clocks now.
    """
    if wall_offset is None:
        wall_offset = time.time() - time.monotonic()
    sources: dict[str, SourceBatch] = {}
    letters: list[dict[str, str]] = []
    rejected: list[Received] = []
    for message in messages:
        _, _, raw_topic, payload, at = message
        received_at = datetime.fromtimestamp(at + wall_offset, UTC)
        mapped = mapper.map(raw_topic)
        topic = mapped.topic
        if mapped.match is None:
            assert mapped.rejection is not None
            letters.append(dead_letter(payload, topic, received_at, mapped.rejection))
            rejected.append(message)
            continue
        try:
            record = message_record(mapped.match, topic, payload, received_at)
        except MessageRejected as exc:
            letters.append(dead_letter(payload, topic, received_at, exc.reason))
            rejected.append(message)
            continue
        except Exception as exc:
            # A mapping bug must not wedge the session by redelivering forever.
            log.exception("mqtt.mapping_failed", topic=topic)
            error = f"internal error mapping the message: {exc!r}"
            letters.append(dead_letter(payload, topic, received_at, error))
            rejected.append(message)
            continue
        source = mapped.match.pattern.source
        batch = sources.get(source)
        if batch is None:
            batch = sources[source] = SourceBatch()
        batch.records.append(record)
        batch.origins.append((message, topic, received_at))
    return MappedBatch(sources, letters, rejected)


def dead_letter(payload: bytes, topic: str, received_at: datetime, error: str) -> dict[str, str]:
    """The dead-letter row of a message: its topic, raw bytes (base64) and the error."""
    return {
        "origin": "mqtt",
        "topic": topic,
        "payload_base64": base64.b64encode(payload).decode("ascii"),
        "error": error,
        "received_at": iso_utc(received_at),
    }


__all__ = [
    "TOPIC_MEMO_SIZE",
    "MappedBatch",
    "MappedTopic",
    "Received",
    "SourceBatch",
    "TopicMapper",
    "dead_letter",
    "map_batch",
]
