"""Kafka bridge: a consumer group whose messages become landing files.

Delivery contract
-----------------
*At least once into landing.* Offsets are stored and committed by the bridge
only (``enable.auto.commit`` and ``enable.auto.offset.store`` are off). A batch
of messages is first made durable as landing files (temp name, fsync, rename:
:class:`~landing_zone.writer.LandingWriter`), and only then are exactly the
consumed positions (``offset + 1`` per partition) committed, synchronously. A
crash between the two re-delivers the batch, so landing may hold a message
twice. On a partition revoke the open batch is landed and committed before the
callback returns; on shutdown likewise, then the consumer is closed. When
partitions are *lost* (session expired, broker gone) the open batch is landed
but not committed: the new owner re-delivers it. A commit that fails (broker
unreachable) is retried every second; its batch is already durable.

*Exactly once into bronze* is bronze's part: every record carries its Kafka
position (``kafka_topic``, ``kafka_partition``, ``kafka_offset``) and bronze
drops positions it already holds. Within one partition the bridge lands
offsets in increasing order.

Records
-------
Each topic maps to a landing source (``sources``; by default the topic name,
lower-cased, with every character outside ``[a-z0-9_]`` turned into ``_``, when
that is a valid source name). ``payload_format="json"``: a message value must
be one JSON object; its fields become raw (string) columns as in every other
landing batch. ``payload_format="raw"``: the value lands as ``payload_base64``
(the exact bytes, base64; null for a null value) and ``payload_text`` (the
value as UTF-8 text, null when it is not valid UTF-8). Every record, and every
dead letter, also carries the lineage columns of :data:`KAFKA_LINEAGE_COLUMNS`
(all strings):

``kafka_topic``
    the topic name.
``kafka_partition`` / ``kafka_offset``
    decimal text.
``kafka_key``
    the key as UTF-8 text; base64 of its bytes when they are not valid UTF-8;
    null when the message has no key.
``kafka_key_base64``
    ``"true"`` when ``kafka_key`` holds base64, else ``"false"``.
``kafka_timestamp``
    the message timestamp, ISO-8601 UTC with milliseconds
    (``2026-11-22T12:12:23.386Z``); null when the broker reports none.
``kafka_headers``
    a JSON object text: header name → value (UTF-8 text; ``{"base64": ...}``
    for bytes that are not UTF-8; ``null`` for a null value). A name sent more
    than once maps to a JSON array of its values, in order. ``"{}"`` when there
    are none.

A payload field whose name collides with a lineage column is kept under
``payload_<name>`` (the lineage column wins the name).

Poison messages (JSON mode: a null or empty value, invalid UTF-8, invalid
JSON, JSON that is not an object; any mode: a topic with no valid source name)
are written with :meth:`LandingWriter.write_dead_letters`: ``origin="kafka"``,
``topic``, ``payload_base64``, ``error``, ``received_at`` plus the lineage
columns. Their offsets are committed like any other: the stream goes on.

Back-pressure: while ``landing_backlog()`` (landing files waiting for bronze)
exceeds ``max_landing_backlog_files``, every assigned partition is paused; they
are resumed once it is back at or under the bound. Consumption is also paused
while a landing write keeps failing (e.g. disk full); the batch is retried with
back-off and nothing is committed until it is durable.

Consumer lag (:meth:`KafkaBridge.lag`): per assigned partition, the messages
not yet landed and committed, measured from librdkafka's statistics every
``lag_interval_ms`` (:mod:`landing_zone.kafka_lag`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.contracts import is_valid_source_name
from landing_zone.formats import MalformedBatch, decode_batch
from landing_zone.kafka_lag import StatisticsError, parse_statistics, partition_lag
from landing_zone.writer import LandingWriteError, LandingWriter

log = structlog.get_logger(__name__)

ORIGIN = "kafka"
KAFKA_LINEAGE_COLUMNS = (
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_key",
    "kafka_key_base64",
    "kafka_timestamp",
    "kafka_headers",
)
RAW_PAYLOAD_COLUMNS = ("payload_base64", "payload_text")

# librdkafka settings the bridge owns: changing them would break the delivery contract
# or duplicate a field of the config.
RESERVED_OPTIONS = {
    "enable.auto.commit": "the bridge commits offsets itself, after the landing file is durable",
    "enable.auto.offset.store": "the bridge commits exactly the positions it has landed",
    "bootstrap.servers": "use the bootstrap_servers field",
    "group.id": "use the group_id field",
    "auto.offset.reset": "use the auto_offset_reset field",
    "enable.partition.eof": "partition EOF events carry no data for the bridge",
    "statistics.interval.ms": "use the lag_interval_ms field",
}

_INVALID_SOURCE_CHARS = re.compile(r"[^a-z0-9_]")
_LINE_PREFIX = re.compile(r"^line \d+: ")
_WRITE_RETRY_MAX_S = 30.0
_COMMIT_RETRY_S = 1.0
_ERROR_LOG_EVERY_S = 10.0

Position = tuple[str, int]
HeaderValue = str | bytes | None
Headers = dict[str, HeaderValue] | list[tuple[str, HeaderValue]]
OptionValue = str | int | float | bool


def default_source_name(topic: str) -> str | None:
    """The landing source of an unmapped ``topic``: lower-cased, other characters -> ``_``.

    ``None`` when the result is still not a valid source name (e.g. it starts with a
    digit or ``_``, or is longer than 63 characters): map such a topic explicitly.
    """
    candidate = _INVALID_SOURCE_CHARS.sub("_", topic.lower())
    return candidate if is_valid_source_name(candidate) else None


class KafkaBridgeConfig(BaseModel):
    """What the Kafka bridge consumes, where it lands, and how it batches.

    Exactly one of ``topics`` and ``topic_regex`` is set. ``kafka_options`` go to
    librdkafka verbatim (``security.protocol``, ``sasl.mechanism``, ``sasl.username``,
    ``sasl.password``, ``ssl.ca.location``, ``session.timeout.ms``, ...), except the
    keys in :data:`RESERVED_OPTIONS`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port...]")
    group_id: str = Field(default="lakehouse-kafka-bridge", min_length=1)
    client_id: str = Field(default="lakehouse-kafka-bridge", min_length=1)
    topics: list[str] = Field(default_factory=list, description="Topics to subscribe to.")
    topic_regex: str | None = Field(
        default=None, description="Subscription pattern, '^'-prefixed (librdkafka regex syntax)."
    )
    sources: Mapping[str, str] = Field(
        default_factory=dict, description="topic -> landing source; others use the default."
    )
    payload_format: Literal["json", "raw"] = "json"
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a group with no committed offset starts."
    )
    batch_max_messages: int = Field(default=10_000, ge=1, le=1_000_000)
    batch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    batch_max_latency_ms: int = Field(default=1000, ge=0, le=600_000)
    max_landing_backlog_files: int = Field(
        default=1000, ge=1, description="Pause consumption while more landing files wait."
    )
    backlog_check_interval_ms: int = Field(default=500, ge=10, le=60_000)
    poll_timeout_ms: int = Field(default=100, ge=1, le=10_000)
    lag_interval_ms: int = Field(
        default=5000, ge=0, le=600_000, description="How often consumer lag is measured; 0: never."
    )
    kafka_options: Mapping[str, OptionValue] = Field(default_factory=dict, repr=False)

    @field_validator("topics")
    @classmethod
    def _plain_topics(cls, topics: list[str]) -> list[str]:
        for topic in topics:
            if not topic:
                raise ValueError("topic names must not be empty")
            if topic.startswith("^"):
                raise ValueError(f"{topic!r} is a pattern: put it in topic_regex")
        return topics

    @field_validator("topic_regex")
    @classmethod
    def _anchored_regex(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        if not pattern.startswith("^"):
            raise ValueError("topic_regex must start with '^' (librdkafka subscribes by pattern)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"topic_regex {pattern!r} does not compile: {exc}") from None
        return pattern

    @field_validator("sources")
    @classmethod
    def _valid_sources(cls, sources: Mapping[str, str]) -> Mapping[str, str]:
        for topic, source in sources.items():
            if not is_valid_source_name(source):
                raise ValueError(
                    f"topic {topic!r} maps to invalid source name {source!r}: use 1-63 "
                    "lowercase letters, digits or '_', starting with a letter"
                )
        return sources

    @field_validator("kafka_options")
    @classmethod
    def _no_reserved_options(cls, options: Mapping[str, OptionValue]) -> Mapping[str, OptionValue]:
        for key in options:
            if key in RESERVED_OPTIONS:
                raise ValueError(f"kafka_options may not set {key!r}: {RESERVED_OPTIONS[key]}")
        return options

    @model_validator(mode="after")
    def _one_subscription(self) -> KafkaBridgeConfig:
        if bool(self.topics) == (self.topic_regex is not None):
            raise ValueError("set exactly one of topics and topic_regex")
        return self

    @property
    def subscription(self) -> list[str]:
        """What the consumer subscribes to: the topic list, or the one pattern."""
        return [self.topic_regex] if self.topic_regex is not None else list(self.topics)

    def source_for(self, topic: str) -> str | None:
        """The landing source of ``topic`` (``None``: no valid name; its messages dead-letter)."""
        return self.sources.get(topic) or default_source_name(topic)


class KafkaBridgeError(RuntimeError):
    """The consumer hit an error it cannot recover from (librdkafka fatal error)."""


@dataclass
class _Batch:
    """Messages whose landing files are prepared; committed once all are written."""

    writes: list[tuple[str | None, pl.DataFrame]]  # (source, frame); None: dead letters
    positions: dict[Position, int]  # next offset to consume, per partition
    first_offsets: dict[Position, int]  # to rewind to if the batch must be dropped
    messages: int


class KafkaBridge:
    """Consumes Kafka topics into landing files; see the module docstring for the contract.

    ``landing_backlog`` returns how many landing files wait for bronze; it is
    called at most every ``backlog_check_interval_ms``. Counters are plain
    attributes, safe to read from other threads.
    """

    def __init__(
        self,
        config: KafkaBridgeConfig,
        writer: LandingWriter,
        landing_backlog: Callable[[], int],
    ) -> None:
        self.config = config
        self._writer = writer
        self._landing_backlog = landing_backlog
        # Counters.
        self.messages_in = 0
        self.records_landed = 0
        self.batches_written = 0  # landing files written (records and dead letters)
        self.dead_letters = 0
        self.commits = 0
        self.commit_failures = 0
        self.write_failures = 0
        self.paused = 0  # times consumption was paused
        self.rebalances = 0
        # State, owned by the thread in run() (callbacks run inside its poll calls).
        self._consumer: Consumer | None = None
        self._buffer: list[Message] = []
        self._buffer_bytes = 0
        self._buffer_since = 0.0
        self._pending: list[_Batch] = []
        self._uncommitted: dict[Position, int] = {}
        self._committed: dict[Position, int] = {}
        self._lag: dict[Position, int] = {}  # replaced whole, so other threads read a snapshot
        self._assignment: set[Position] = set()
        self._pause_reasons: set[str] = set()
        self._write_retry_at = 0.0
        self._write_backoff = 0.0
        self._commit_retry_at = 0.0
        self._backlog_checked_at = 0.0
        self._fatal: KafkaError | None = None
        self._error_logged: dict[int, float] = {}
        self._sources: dict[str, str | None] = {}
        options = config.kafka_options
        self._incremental = (
            "cooperative" in str(options.get("partition.assignment.strategy", ""))
            or str(options.get("group.protocol", "classic")) == "consumer"
        )

    # ----------------------------------------------------------------- public

    @property
    def is_paused(self) -> bool:
        """Whether consumption is paused now (landing backlog, or failing landing writes)."""
        return bool(self._pause_reasons)

    @property
    def assignment(self) -> list[Position]:
        """The ``(topic, partition)`` pairs currently assigned to this bridge."""
        return sorted(self._assignment)

    def librdkafka_config(self) -> dict[str, OptionValue]:
        """The consumer configuration handed to librdkafka (callbacks aside)."""
        conf: dict[str, OptionValue] = {
            "bootstrap.servers": self.config.bootstrap_servers,
            "group.id": self.config.group_id,
            "client.id": self.config.client_id,
            "auto.offset.reset": self.config.auto_offset_reset,
            "isolation.level": "read_committed",
        }
        conf.update(self.config.kafka_options)
        conf.update({"enable.auto.commit": False, "enable.auto.offset.store": False})
        conf["enable.partition.eof"] = False
        return conf

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters, for metrics."""
        names = (
            "messages_in",
            "records_landed",
            "batches_written",
            "dead_letters",
            "commits",
            "commit_failures",
            "write_failures",
            "paused",
            "rebalances",
        )
        return {name: int(getattr(self, name)) for name in names}

    def lag(self) -> dict[Position, int]:
        """Messages per assigned partition not yet landed and committed, where known.

        Measured every ``lag_interval_ms`` (see :mod:`landing_zone.kafka_lag`); a
        partition without a figure has an unknown lag, not a zero one.
        """
        return dict(self._lag)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then land, commit and close the consumer.

        Raises :class:`KafkaBridgeError` on a fatal consumer error (after closing);
        whatever was landed but not committed is re-delivered on the next start.
        """
        conf: dict[str, Any] = dict(self.librdkafka_config())
        conf["error_cb"] = self._on_error
        if self.config.lag_interval_ms:
            conf["statistics.interval.ms"] = self.config.lag_interval_ms
            conf["stats_cb"] = self._on_statistics
        conf["logger"] = logging.getLogger(f"{__name__}.librdkafka")
        consumer = Consumer(conf)
        self._consumer = consumer
        log.info(
            "kafka_bridge.started",
            subscription=self.config.subscription,
            group_id=self.config.group_id,
            payload_format=self.config.payload_format,
        )
        try:
            consumer.subscribe(
                self.config.subscription,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._check_backlog(force=True)
            while not stop.is_set():
                self._step(consumer)
            self._shutdown()
        finally:
            consumer.close()  # leaves the group; a revoke with an empty batch may run
            self._consumer = None
            log.info("kafka_bridge.stopped", messages_in=self.messages_in, commits=self.commits)

    # -------------------------------------------------------------- main loop

    def _step(self, consumer: Consumer) -> None:
        if self._fatal is not None:
            raise KafkaBridgeError(f"fatal Kafka consumer error: {self._fatal}")
        now = time.monotonic()
        self._check_backlog()
        if self._pending and now >= self._write_retry_at:
            self._flush()
        if self._uncommitted and not self._pending and now >= self._commit_retry_at:
            self._commit()
        timeout = self.config.poll_timeout_ms / 1000
        if self._buffer:
            due = self._buffer_since + self.config.batch_max_latency_ms / 1000
            timeout = max(0.0, min(timeout, due - now))
        room = max(1, self.config.batch_max_messages - len(self._buffer))
        for message in consumer.consume(num_messages=room, timeout=timeout):
            self._take(message)
        retry_due = not self._pending or time.monotonic() >= self._write_retry_at
        if self._buffer and retry_due and self._batch_due():
            self._flush()

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            self._on_error(error)
            return
        if not self._buffer:
            self._buffer_since = time.monotonic()
        self._buffer.append(message)
        self._buffer_bytes += len(message.value() or b"") + len(message.key() or b"")
        self.messages_in += 1

    def _batch_due(self) -> bool:
        return (
            len(self._buffer) >= self.config.batch_max_messages
            or self._buffer_bytes >= self.config.batch_max_bytes
            or time.monotonic() - self._buffer_since >= self.config.batch_max_latency_ms / 1000
        )

    def _shutdown(self) -> None:
        if self._flush() and self._uncommitted:
            self._commit()
        if self._pending or self._uncommitted:
            log.warning(
                "kafka_bridge.stopped_uncommitted",
                unlanded_messages=sum(b.messages for b in self._pending),
                uncommitted_partitions=len(self._uncommitted),
                note="re-delivered on the next start",
            )

    # --------------------------------------------------------- landing + commit

    def _flush(self, *, commit: bool = True) -> bool:
        """Land the buffer (and any batch waiting for a retry), then commit.

        Returns False when a landing write failed: the batch stays pending,
        consumption is paused and the write is retried with back-off.
        """
        if self._buffer:
            self._pending.append(self._prepare(self._buffer))
            self._buffer = []
            self._buffer_bytes = 0
        while self._pending:
            batch = self._pending[0]
            try:
                self._write(batch)
            except (LandingWriteError, OSError) as exc:
                self.write_failures += 1
                self._write_backoff = min(_WRITE_RETRY_MAX_S, max(0.5, self._write_backoff * 2))
                self._write_retry_at = time.monotonic() + self._write_backoff
                log.error(
                    "kafka_bridge.landing_write_failed",
                    error=str(exc),
                    retry_in_s=self._write_backoff,
                    unlanded_messages=sum(b.messages for b in self._pending),
                )
                self._set_paused("landing_write_failed", True)
                return False
            self._pending.pop(0)
            for position, offset in batch.positions.items():
                self._uncommitted[position] = max(offset, self._uncommitted.get(position, 0))
        if self._write_backoff:
            self._write_backoff = 0.0
            self._set_paused("landing_write_failed", False)
        if commit and self._uncommitted:
            self._commit()
        return True

    def _write(self, batch: _Batch) -> None:
        while batch.writes:
            source, frame = batch.writes[0]
            if source is None:
                self._writer.write_dead_letters(frame)
                self.dead_letters += frame.height
            else:
                self._writer.write_frame(source, frame)
                self.records_landed += frame.height
            batch.writes.pop(0)  # durable: a retry must not write it again
            self.batches_written += 1

    def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._uncommitted:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(self._uncommitted.items())]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.commit_failures += 1
            self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            log.warning(
                "kafka_bridge.commit_failed",
                error=str(exc.args[0] if exc.args else exc),
                partitions=len(offsets),
                note="landed already; retried, or re-delivered and de-duplicated by bronze",
            )
            return
        failed = {(tp.topic, tp.partition) for tp in result or [] if tp.error is not None}
        for tp in offsets:
            position = (tp.topic, tp.partition)
            if position not in failed:
                self._committed[position] = tp.offset
                if self._uncommitted.get(position) == tp.offset:
                    del self._uncommitted[position]
        if failed:
            self.commit_failures += 1
            self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            log.warning("kafka_bridge.commit_partly_failed", partitions=sorted(failed))
        else:
            self.commits += 1

    # ------------------------------------------------------------- rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:  # cooperative rebalancing: nothing new for this member
            return
        self.rebalances += 1
        self._assignment.update((tp.topic, tp.partition) for tp in partitions)
        log.info("kafka_bridge.assigned", partitions=_names(partitions))
        if self._pause_reasons:
            # Assign here (instead of after the callback) so the new partitions are paused
            # before any fetch: a paused bridge must not take in new messages.
            if self._incremental:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Land the open batch and commit it while the partitions are still ours."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        log.info("kafka_bridge.revoked", partitions=_names(partitions))
        try:
            landed = self._flush(commit=True)
        except Exception:  # never let an exception escape into librdkafka's rebalance
            log.exception("kafka_bridge.revoke_flush_failed")
            landed = False
        if not landed:
            self._discard_unlanded(consumer, revoked)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a clean revoke: land what we hold, commit nothing."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        log.warning("kafka_bridge.partitions_lost", partitions=_names(partitions))
        try:
            landed = self._flush(commit=False)
        except Exception:
            log.exception("kafka_bridge.lost_flush_failed")
            landed = False
        if not landed:
            self._discard_unlanded(consumer, lost)
        self._forget(lost)

    def _forget(self, positions: set[Position]) -> None:
        for position in positions:
            self._uncommitted.pop(position, None)
            self._committed.pop(position, None)
        self._assignment.difference_update(positions)
        self._lag = {p: n for p, n in self._lag.items() if p not in positions}

    def _discard_unlanded(self, consumer: Consumer, revoked: set[Position]) -> None:
        """Drop batches that could not be landed; nothing of them was committed.

        Revoked partitions are re-delivered to their next owner. A partition we keep
        (cooperative rebalancing) is rewound to its first dropped offset.
        """
        firsts: dict[Position, int] = {}
        for batch in self._pending:
            for position, offset in batch.first_offsets.items():
                firsts[position] = min(offset, firsts.get(position, offset))
        for message in self._buffer:
            topic, partition, offset = _position(message)
            firsts[(topic, partition)] = min(offset, firsts.get((topic, partition), offset))
        dropped = sum(batch.messages for batch in self._pending) + len(self._buffer)
        self._pending = []
        self._buffer = []
        self._buffer_bytes = 0
        self._write_backoff = 0.0
        self._set_paused("landing_write_failed", False)
        for (topic, partition), offset in firsts.items():
            if (topic, partition) not in revoked and (topic, partition) in self._assignment:
                consumer.seek(TopicPartition(topic, partition, offset))
        log.warning("kafka_bridge.unlanded_dropped", messages=dropped, note="re-delivered")

    # ------------------------------------------------------------ back-pressure

    def _check_backlog(self, *, force: bool = False) -> None:
        now = time.monotonic()
        interval = self.config.backlog_check_interval_ms / 1000
        if not force and now - self._backlog_checked_at < interval:
            return
        self._backlog_checked_at = now
        try:
            backlog = self._landing_backlog()
        except Exception:
            log.exception("kafka_bridge.backlog_check_failed")
            return
        behind = backlog > self.config.max_landing_backlog_files
        if behind != ("landing_backlog" in self._pause_reasons):
            self._set_paused("landing_backlog", behind, backlog=backlog)

    def _set_paused(self, reason: str, active: bool, **context: object) -> None:
        was_paused = bool(self._pause_reasons)
        if active:
            self._pause_reasons.add(reason)
        else:
            self._pause_reasons.discard(reason)
        if bool(self._pause_reasons) == was_paused:
            return
        consumer = self._consumer
        partitions = consumer.assignment() if consumer is not None else []
        if self._pause_reasons:
            self.paused += 1
            if consumer is not None and partitions:
                consumer.pause(partitions)
            log.warning(
                "kafka_bridge.paused",
                reason=reason,
                limit=self.config.max_landing_backlog_files,
                **context,
            )
        else:
            if consumer is not None and partitions:
                consumer.resume(partitions)
            log.info("kafka_bridge.resumed", reason=reason, **context)

    # ----------------------------------------------------------------- errors

    def _on_statistics(self, text: str) -> None:
        try:
            stats = parse_statistics(text)
        except StatisticsError as exc:
            log.warning("kafka_bridge.statistics_unreadable", error=str(exc))
            return
        self._lag = partition_lag(stats, self._committed, self._assignment)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
            log.error("kafka_bridge.fatal_error", error=str(error))
            return
        now = time.monotonic()
        code = error.code()
        if now - self._error_logged.get(code, -_ERROR_LOG_EVERY_S) >= _ERROR_LOG_EVERY_S:
            self._error_logged[code] = now
            log.warning("kafka_bridge.kafka_error", error=str(error), retriable=error.retriable())

    # ------------------------------------------------------------ frame making

    def _prepare(self, messages: Sequence[Message]) -> _Batch:
        """Turn consumed messages into landing frames (one per source) and dead letters."""
        received_at = datetime.now(UTC).isoformat()
        positions: dict[Position, int] = {}
        first_offsets: dict[Position, int] = {}
        by_source: dict[str, list[int]] = {}
        letters: list[tuple[int, str]] = []
        for index, message in enumerate(messages):
            topic, partition, offset = _position(message)
            position = (topic, partition)
            positions[position] = max(offset + 1, positions.get(position, 0))
            first_offsets.setdefault(position, offset)
            if topic in self._sources:
                source = self._sources[topic]
            else:
                source = self._sources[topic] = self.config.source_for(topic)
                if source is None:
                    log.warning("kafka_bridge.unmapped_topic", topic=topic)
            if source is None:
                letters.append((index, _unmapped_error(topic)))
            else:
                by_source.setdefault(source, []).append(index)
        writes: list[tuple[str | None, pl.DataFrame]] = []
        for source, indexes in by_source.items():
            chosen = [messages[i] for i in indexes]
            frame: pl.DataFrame | None
            if self.config.payload_format == "raw":
                frame = _raw_payload_frame(chosen)
            else:
                frame, errors = _json_payload_frame(chosen)
                letters.extend((indexes[i], error) for i, error in errors.items())
            if frame is not None and frame.height:
                writes.append((source, frame))
        if letters:
            letters.sort()
            writes.append((None, _dead_letter_frame(messages, letters, received_at)))
        return _Batch(
            writes=writes,
            positions=positions,
            first_offsets=first_offsets,
            messages=len(messages),
        )


# ------------------------------------------------------------------ helpers


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]


def _position(message: Message) -> tuple[str, int, int]:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:  # only error events lack them
        raise KafkaBridgeError(f"consumed a message without a position: {message!r}")
    return topic, partition, offset


def _unmapped_error(topic: str) -> str:
    return (
        f"topic {topic!r} has no valid landing source name: map it in the bridge's "
        "'sources' (topic -> lowercase identifier)"
    )


def _key_text(key: bytes | None) -> tuple[str | None, str]:
    if key is None:
        return None, "false"
    try:
        return key.decode("utf-8"), "false"
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii"), "true"


def _header_value(value: bytes | str | None) -> object:
    if value is None or isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


def _headers_json(headers: Headers | None) -> str:
    if not headers:
        return "{}"
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    out: dict[str, object] = {}
    repeated: set[str] = set()
    for name, raw in pairs:
        value = _header_value(raw)
        if name not in out:
            out[name] = value
        elif name in repeated:
            held = out[name]
            assert isinstance(held, list)
            held.append(value)
        else:
            out[name] = [out[name], value]
            repeated.add(name)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _lineage_frame(messages: Sequence[Message]) -> pl.DataFrame:
    # Hot path (every message): comprehensions over the C accessors, no per-message calls
    # of our own except for the rare non-UTF-8 key and the header sets (memoised).
    raw_keys = [message.key() for message in messages]
    keys: list[str | None] = []
    flags: list[str] = []
    for key in raw_keys:
        if key is None:
            keys.append(None)
            flags.append("false")
        else:
            text, flag = _key_text(key)
            keys.append(text)
            flags.append(flag)
    stamps = [message.timestamp() for message in messages]
    encoded_headers: dict[object, str] = {}  # most messages repeat a few header sets
    headers = [_cached_headers(message.headers(), encoded_headers) for message in messages]
    return pl.DataFrame(
        {
            "kafka_topic": pl.Series([m.topic() for m in messages], dtype=pl.String),
            "kafka_partition": pl.Series([m.partition() for m in messages], dtype=pl.Int64).cast(
                pl.String
            ),
            "kafka_offset": pl.Series([m.offset() for m in messages], dtype=pl.Int64).cast(
                pl.String
            ),
            "kafka_key": pl.Series(keys, dtype=pl.String),
            "kafka_key_base64": pl.Series(flags, dtype=pl.String),
            # kind 0: TIMESTAMP_NOT_AVAILABLE
            "kafka_timestamp": pl.Series(
                [None if kind == 0 else stamp for kind, stamp in stamps], dtype=pl.Int64
            )
            .cast(pl.Datetime("ms", "UTC"))
            .dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ"),
            "kafka_headers": pl.Series(headers, dtype=pl.String),
        }
    )


def _cached_headers(raw: Headers | None, memo: dict[object, str]) -> str:
    if not raw:
        return "{}"
    key = tuple(raw) if isinstance(raw, list) else None
    text = memo.get(key) if key is not None else None
    if text is None:
        text = _headers_json(raw)
        if key is not None:
            memo[key] = text
    return text


def _with_lineage(payload: pl.DataFrame, messages: Sequence[Message]) -> pl.DataFrame:
    """Payload columns, then the lineage columns (colliding payload names get a prefix)."""
    lineage = _lineage_frame(messages)
    if not payload.width:
        return lineage
    taken = set(payload.columns) | set(KAFKA_LINEAGE_COLUMNS)
    renames: dict[str, str] = {}
    for name in payload.columns:
        if name in KAFKA_LINEAGE_COLUMNS:
            new = f"payload_{name}"
            while new in taken:
                new = f"payload_{new}"
            taken.add(new)
            renames[name] = new
    return pl.concat([payload.rename(renames), lineage], how="horizontal")


def _raw_payload_frame(messages: Sequence[Message]) -> pl.DataFrame:
    encoded: list[str | None] = []
    texts: list[str | None] = []
    for message in messages:
        value = message.value()
        if value is None:
            encoded.append(None)
            texts.append(None)
            continue
        encoded.append(base64.b64encode(value).decode("ascii"))
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    payload = pl.DataFrame(
        {"payload_base64": encoded, "payload_text": texts},
        schema=dict.fromkeys(RAW_PAYLOAD_COLUMNS, pl.String),
    )
    return _with_lineage(payload, messages)


def _json_payload_frame(
    messages: Sequence[Message],
) -> tuple[pl.DataFrame | None, dict[int, str]]:
    """Records of the JSON-object messages, and the error of each other one (by index)."""
    values = [message.value() for message in messages]
    errors: dict[int, str] = {}
    for index, value in enumerate(values):
        if value is None:
            errors[index] = "message has a null value (tombstone), not a JSON object"
        elif not value or value.isspace():
            errors[index] = "empty message value, not a JSON object"
    good = [i for i in range(len(values)) if i not in errors]
    if not good:
        return None, errors
    payload = _decode_objects([values[i] or b"" for i in good])
    if payload is None:
        # Some value is poison: find each one (in Python, only on this slow path).
        for index in good:
            error = _json_error(values[index] or b"")
            if error is not None:
                errors[index] = error
        good = [i for i in good if i not in errors]
        if not good:
            return None, errors
        payload = _decode_objects([values[i] or b"" for i in good])
        if payload is None:  # formats disagrees with the check above: decode one by one
            payload, more = _decode_each([values[i] or b"" for i in good])
            errors.update((good[i], error) for i, error in more.items())
            good = [g for i, g in enumerate(good) if i not in more]
            if payload is None:
                return None, errors
    return _with_lineage(payload, [messages[i] for i in good]), errors


def _decode_objects(values: list[bytes]) -> pl.DataFrame | None:
    """One raw frame row per value (each one JSON object), or None if any is not one."""
    # A raw newline can only be insignificant whitespace in valid JSON (strings must
    # escape it), so flattening each value onto one line keeps one line per message.
    lines = [v.replace(b"\n", b" ") if b"\n" in v else v for v in values]
    try:
        frame = decode_batch(b"\n".join(lines), "ndjson")
    except MalformedBatch:
        return None
    return frame if frame.height == len(values) else None


def _decode_each(values: list[bytes]) -> tuple[pl.DataFrame | None, dict[int, str]]:
    frames: list[pl.DataFrame] = []
    errors: dict[int, str] = {}
    for index, value in enumerate(values):
        try:
            frame = decode_batch(value.replace(b"\n", b" "), "ndjson")
        except MalformedBatch as exc:
            errors[index] = _LINE_PREFIX.sub("", str(exc))
            continue
        if frame.height != 1:
            errors[index] = "expected exactly one JSON object"
            continue
        frames.append(frame if frame.width else pl.DataFrame({"__empty": [None]}))
    if not frames:
        return None, errors
    merged = pl.concat(frames, how="diagonal")
    if "__empty" in merged.columns:
        merged = merged.drop("__empty")
    return merged, errors


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _json_error(value: bytes) -> str | None:
    """Why ``value`` is not one JSON object (None when it is)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}: {exc.reason}"
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(parsed, dict):
        return f"expected a JSON object, got {_json_kind(parsed)}"
    return None


def _dead_letter_frame(
    messages: Sequence[Message], letters: list[tuple[int, str]], received_at: str
) -> pl.DataFrame:
    chosen = [messages[i] for i, _ in letters]
    payloads: list[str | None] = []
    for message in chosen:
        value = message.value()
        payloads.append(None if value is None else base64.b64encode(value).decode("ascii"))
    lineage = _lineage_frame(chosen)
    head = pl.DataFrame(
        {
            "origin": [ORIGIN] * len(chosen),
            "topic": lineage.get_column("kafka_topic"),
            "payload_base64": payloads,
            "error": [error for _, error in letters],
            "received_at": [received_at] * len(chosen),
        },
        schema=dict.fromkeys(
            ("origin", "topic", "payload_base64", "error", "received_at"), pl.String
        ),
    )
    return pl.concat([head, lineage], how="horizontal")


__all__ = [
    "KAFKA_LINEAGE_COLUMNS",
    "RAW_PAYLOAD_COLUMNS",
    "RESERVED_OPTIONS",
    "KafkaBridge",
    "KafkaBridgeConfig",
    "KafkaBridgeError",
    "default_source_name",
]
