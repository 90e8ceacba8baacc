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
offsets in increasing order. Positions are those of one incarnation of a topic
(``kafka_topic_id``): a topic deleted and created again starts its offsets at 0
again, and bronze keeps the two apart (:mod:`landing_zone.kafka_topic_ids`).

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
``kafka_topic_id``
    the topic's id (Kafka's topic UUID, base64 as Kafka prints it), learned from the
    cluster when partitions are assigned; null where the cluster did not name one.
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

Throughput
----------
The thread in :meth:`KafkaBridge.run` consumes (up to a thousand messages per
call), keeps only their fields (:class:`~landing_zone.kafka_batch.MessageColumns`),
lands batches and commits. Turning a batch into frames
(:func:`~landing_zone.kafka_batch.prepare_batch`: one JSON parse per batch,
lineage columns built in bulk) runs in a second thread, overlapping the
consumption of the next batch; at most two batches are in flight, and they are
landed and committed strictly in the order they were consumed, each commit
before the next landing write. librdkafka's fetch back-off is shortened
(:data:`FETCH_DEFAULTS`, overridable through ``kafka_options``) so a backlog
drains without stalls. The preparing thread is warmed up while the group is
joined (:func:`~landing_zone.kafka_batch.warm_up`), so the first batch does not
pay for one-off start-up.

A batch is closed when it reaches ``batch_max_messages`` or ``batch_max_bytes``,
when its first message is ``batch_max_latency_ms`` old, or, for a batch filled
from a backlog (at least :data:`_BACKLOG_FULL_CALLS` consume calls went into it
whole: ten thousand messages), as soon as a poll (``poll_timeout_ms``) brings no
more messages: the backlog is drained, and the latency bound would only delay
its tail. A burst (a fleet of devices publishing on the minute) is no backlog:
it waits for the latency bound like a trickle, so a long bound still means few
files.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.contracts import is_valid_source_name
from landing_zone.kafka_batch import (
    KAFKA_LINEAGE_COLUMNS,
    RAW_PAYLOAD_COLUMNS,
    MessageColumns,
    Position,
    PreparedBatch,
    prepare_batch,
    warm_up,
)
from landing_zone.kafka_lag import StatisticsError, parse_statistics, partition_lag
from landing_zone.kafka_topic_ids import TopicIds
from landing_zone.writer import LandingWriteError, LandingWriter

log = structlog.get_logger(__name__)

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

# librdkafka fetch settings the bridge defaults (``kafka_options`` override them).
# librdkafka stops fetching a partition while its prefetch queue holds
# queued.min.messages, and then waits fetch.queue.backoff.ms (default 1 s) before it
# looks again. A consumer that drains the queue in batches faster than one fetch
# refills it hits that wait over and over: a backlog drained at ~0.2M msg/s instead
# of >1M msg/s. A short backoff resumes fetching as soon as there is room; the queue
# stays bounded by queued.min.messages and queued.max.messages.kbytes.
FETCH_DEFAULTS: dict[str, str | int | float | bool] = {
    "fetch.queue.backoff.ms": 10,
}

_INVALID_SOURCE_CHARS = re.compile(r"[^a-z0-9_]")
_WRITE_RETRY_MAX_S = 30.0
_COMMIT_RETRY_S = 1.0
_ERROR_LOG_EVERY_S = 10.0
# Batches cut and handed to the preparing thread but not landed yet; one more waits.
_MAX_BATCHES_IN_FLIGHT = 2
# Messages taken per consume call: few enough that they die before the cyclic garbage
# collector promotes them (see MessageColumns), many enough to amortise the call.
_CONSUME_CHUNK = 1000
# Longest consume wait while a batch is being prepared: it is landed this soon after it
# is ready even when no message comes (a consume call cannot be woken up).
_PREPARING_POLL_S = 0.01
# Whole consume calls (of _CONSUME_CHUNK messages) that make a batch a backlog, landed
# as soon as it is drained instead of after batch_max_latency_ms. A burst of a few
# thousand messages (devices publishing on the minute) fills a call or two; landing it
# at once would make a file per burst of a user who set a long latency bound to get
# few files. Ten thousand messages are a backlog no latency bound is meant to hold.
_BACKLOG_FULL_CALLS = 10
# Least time between two attempts to learn the id of a topic the cluster did not name.
_TOPIC_ID_RETRY_S = 30.0

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
    # Large enough that a backlog drains in few files: each costs two fsyncs and a
    # bronze commit, whatever its size. Below capacity, batch_max_latency_ms cuts first.
    batch_max_messages: int = Field(default=50_000, ge=1, le=1_000_000)
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
class _InFlight:
    """A batch cut from the buffer: being prepared (another thread), then landed here."""

    prepared: Future[PreparedBatch]
    taken: MessageColumns  # what it was made of (to rewind to, if it must be dropped)

    @property
    def messages(self) -> int:
        """How many messages the batch holds."""
        return len(self.taken)


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
        self._buffer = MessageColumns.empty()
        self._buffer_bytes = 0
        self._buffer_since = 0.0
        self._buffer_full_calls = 0  # consume calls that filled a whole chunk of the buffer
        self._last_message_at = 0.0
        self._pending: list[_InFlight] = []  # oldest first
        self._preparer: ThreadPoolExecutor | None = None
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
        self._topic_ids: dict[str, str | None] = {}  # see landing_zone.kafka_topic_ids
        self._topic_ids_asked_at = 0.0
        self._topic_ids_missing: set[str] = set()  # warned about
        self._topic_id_lookup: TopicIds | None = None
        self._landed_next: dict[Position, int] = {}  # next offset after what was landed
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
            **FETCH_DEFAULTS,
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
        self._topic_id_lookup = TopicIds(self.librdkafka_config())
        # One thread turns batches into frames while this one consumes and lands (the
        # JSON parse releases the GIL). A second one measured no faster on two cores.
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="kafka-bridge-prepare")
        # While the group is joined: the first batch must not pay for one-off start-up.
        self._preparer.submit(_warm_up)
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
            self._preparer.shutdown(wait=True, cancel_futures=True)
            self._preparer = None
            log.info("kafka_bridge.stopped", messages_in=self.messages_in, commits=self.commits)

    # -------------------------------------------------------------- main loop

    def _step(self, consumer: Consumer) -> None:
        if self._fatal is not None:
            raise KafkaBridgeError(f"fatal Kafka consumer error: {self._fatal}")
        now = time.monotonic()
        self._check_backlog()
        if self._pending and now >= self._write_retry_at:
            self._land(wait=False)
        if self._uncommitted and not self._pending and now >= self._commit_retry_at:
            self._commit()
        timeout = self.config.poll_timeout_ms / 1000
        if self._buffer:
            due = self._buffer_since + self.config.batch_max_latency_ms / 1000
            timeout = max(0.0, min(timeout, due - now))
        if self._pending and not self._write_backoff:
            # The oldest batch is still being prepared (_land above wrote any that was
            # ready): look again soon. Not while a failed write waits for its retry: that
            # batch stays pending for up to _WRITE_RETRY_MAX_S.
            timeout = min(timeout, _PREPARING_POLL_S)
        room = max(1, min(_CONSUME_CHUNK, self.config.batch_max_messages - len(self._buffer)))
        messages = consumer.consume(num_messages=room, timeout=timeout)
        taken = len(messages)
        kept = self._take(messages) if messages else 0
        del messages  # let the Message objects die young (see MessageColumns)
        if kept == room:  # data messages only: error events fill no batch
            self._buffer_full_calls += 1
        retry_due = not self._pending or time.monotonic() >= self._write_retry_at
        if self._buffer and retry_due and (self._batch_due() or self._drained()):
            self._cut()
            # Under a backlog (a full consume) the next batch is consumed while this one
            # is prepared; caught up, there is nothing to overlap, so land it now.
            caught_up = taken < room
            self._land(wait=True, keep=0 if caught_up else _MAX_BATCHES_IN_FLIGHT)

    def _take(self, messages: list[Message]) -> int:
        """Add the data messages to the buffer (error events are reported); how many."""
        # Whole-batch passes over the C accessors: no Python code runs per message.
        if any(map(Message.error, messages)):
            kept = []
            for message in messages:
                error = message.error()
                if error is None:
                    kept.append(message)
                else:
                    self._on_error(error)
            messages = kept
            if not messages:
                return 0
        try:
            columns = MessageColumns.of(messages)
        except ValueError as exc:  # only error events lack a position, and they are out
            raise KafkaBridgeError(str(exc)) from exc
        now = time.monotonic()
        if not self._buffer:
            self._buffer_since = now
        self._last_message_at = now
        self._buffer.extend(columns)
        self._buffer_bytes += columns.payload_bytes()
        self.messages_in += len(columns)
        return len(columns)

    def _batch_due(self) -> bool:
        return (
            len(self._buffer) >= self.config.batch_max_messages
            or self._buffer_bytes >= self.config.batch_max_bytes
            or time.monotonic() - self._buffer_since >= self.config.batch_max_latency_ms / 1000
        )

    def _drained(self) -> bool:
        """Whether the open batch was filled from a backlog that is now drained.

        Such a batch is landed at once: the consumer has caught up, and waiting for
        ``batch_max_latency_ms`` would only delay it. Filled from a backlog: at least
        :data:`_BACKLOG_FULL_CALLS` whole consume calls went into it. Drained: a whole
        poll (``poll_timeout_ms``) brought no message. A trickle or a burst (fewer
        whole calls) still waits for the latency bound, or a long bound would no
        longer mean few files.
        """
        if self._buffer_full_calls < _BACKLOG_FULL_CALLS:
            return False
        return time.monotonic() - self._last_message_at >= self.config.poll_timeout_ms / 1000

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

    def _cut(self) -> None:
        """Hand the buffer to the preparing thread as the next batch."""
        if not self._buffer:
            return
        assert self._preparer is not None, "batches are cut only while run() runs"
        received_at = datetime.now(UTC).isoformat()
        unknown = [t for t, i in self._topic_ids.items() if i is None]
        if unknown and time.monotonic() - self._topic_ids_asked_at >= _TOPIC_ID_RETRY_S:
            self._learn_topic_ids(unknown)
        prepared = self._preparer.submit(
            prepare_batch,
            self._buffer,
            self.config.payload_format,
            self._source_of,
            received_at,
            dict(self._topic_ids),
        )
        self._pending.append(_InFlight(prepared, self._buffer))
        self._buffer = MessageColumns.empty()
        self._buffer_bytes = 0
        self._buffer_full_calls = 0

    def _flush(self, *, commit: bool = True) -> bool:
        """Land the buffer and every batch in flight (waiting for them), then commit.

        Returns False when a landing write failed: the batch stays pending,
        consumption is paused and the write is retried with back-off.
        """
        self._cut()
        return self._land(wait=True, commit=commit)

    def _land(self, *, wait: bool, commit: bool = True, keep: int = 0) -> bool:
        """Write the prepared batches, oldest first, committing after each one.

        It stops at the first batch still being prepared: without ``wait`` at once,
        with ``wait`` once at most ``keep`` batches are left (waiting for all of them
        would leave the preparing thread idle until the next batch is cut). Returns
        False when a landing write failed (see :meth:`_flush`).
        """
        while self._pending:
            head = self._pending[0]
            if not head.prepared.done() and (not wait or len(self._pending) <= keep):
                break
            batch = head.prepared.result()
            try:
                self._check_incarnations(batch)
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
                self._landed_next[position] = offset
            # Commit before the next write: a crash then re-delivers at most one batch.
            if commit and self._uncommitted:
                self._commit()
        if self._write_backoff:
            self._write_backoff = 0.0
            self._set_paused("landing_write_failed", False)
        return True

    def _write(self, batch: PreparedBatch) -> None:
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

    def _check_incarnations(self, batch: PreparedBatch) -> None:
        """Re-stamp a batch whose topic turns out to have been deleted and created again.

        A partition whose offsets go back below what this bridge already landed is
        either re-delivered (a rebalance before a commit: the same topic) or a new
        topic under the old name (its offsets start again at 0). Only the topic's id
        tells them apart, and bronze must see the new one, or it would drop the new
        messages as already held (see :mod:`landing_zone.kafka_topic_ids`).
        """
        regressed = {
            topic
            for (topic, partition), lowest in batch.lowest.items()
            if lowest < self._landed_next.get((topic, partition), 0)
        }
        if not regressed:
            return
        for topic, topic_id in self._learn_topic_ids(regressed).items():
            if topic_id is not None and topic_id != batch.topic_ids.get(topic):
                log.warning(
                    "kafka_bridge.topic_recreated",
                    topic=topic,
                    old_topic_id=batch.topic_ids.get(topic),
                    topic_id=topic_id,
                    note="its offsets start again; bronze keeps them apart by topic id",
                )
                batch.restamp(topic, topic_id)
                for position in [p for p in self._landed_next if p[0] == topic]:
                    del self._landed_next[position]

    def _learn_topic_ids(self, topics: Iterable[str]) -> dict[str, str | None]:
        """Ask the cluster for the ids of ``topics`` and remember them (unknown: None)."""
        self._topic_ids_asked_at = time.monotonic()
        lookup = self._topic_id_lookup
        learned = lookup.describe(topics) if lookup is not None else dict.fromkeys(topics)
        for topic, topic_id in learned.items():
            if topic_id is not None or topic not in self._topic_ids:
                self._topic_ids[topic] = topic_id
        missing = sorted(t for t, i in learned.items() if i is None and self._topic_ids[t] is None)
        if missing and not set(missing) <= self._topic_ids_missing:
            log.warning(
                "kafka_bridge.topic_id_unknown",
                topics=missing,
                retry_in_s=_TOPIC_ID_RETRY_S,
                note="their records carry no kafka_topic_id, so bronze cannot tell a "
                "topic deleted and created again from re-delivery",
            )
        self._topic_ids_missing = set(missing)
        return learned

    def _source_of(self, topic: str) -> str | None:
        # Runs in the preparing thread only, which alone touches the memo.
        if topic not in self._sources:
            source = self._sources[topic] = self.config.source_for(topic)
            if source is None:
                log.warning("kafka_bridge.unmapped_topic", topic=topic)
        return self._sources[topic]

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
        # The open batch was landed on revoke, so new ids stamp only new messages.
        self._learn_topic_ids({tp.topic for tp in partitions})
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
        for held in [*(batch.taken for batch in self._pending), self._buffer]:
            for position, offset in held.first_offsets().items():
                firsts[position] = min(offset, firsts.get(position, offset))
        dropped = sum(batch.messages for batch in self._pending) + len(self._buffer)
        self._pending = []
        self._buffer = MessageColumns.empty()
        self._buffer_bytes = 0
        self._buffer_full_calls = 0
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


# ------------------------------------------------------------------ helpers


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]


def _warm_up() -> None:
    try:
        warm_up()
    except Exception:  # only a first batch a little slower: never a reason to stop
        log.exception("kafka_bridge.warm_up_failed")


__all__ = [
    "KAFKA_LINEAGE_COLUMNS",
    "RAW_PAYLOAD_COLUMNS",
    "RESERVED_OPTIONS",
    "KafkaBridge",
    "KafkaBridgeConfig",
    "KafkaBridgeError",
    "default_source_name",
]
