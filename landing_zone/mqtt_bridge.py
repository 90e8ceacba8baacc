"""The MQTT bridge: subscribes to device topics and writes their messages as landing files.

Durability contract (DESIGN.md, "a writer acknowledges only after the rename is
durable"): messages are received with QoS 1 in a persistent MQTT 5 session
(``clean_start=False`` plus a session expiry), and paho's automatic PUBACK is
turned off (``manual_ack=True``). A message is acknowledged with
``client.ack(mid, qos)`` only after the landing file holding it (or its dead
letter) has been written, fsynced and renamed. Until then the broker keeps it in
our session's in-flight window and redelivers it after any reconnect, bridge
crash or broker restart. A redelivered copy (DUP set) of a message that was landed
but whose PUBACK the broker never read is recognised by the redelivery journal
(:mod:`landing_zone.mqtt_journal`, under ``<data_dir>/_meta/mqtt/``) and acknowledged
without being landed again: each message lands once, even one without a timestamp of
its own (stamped with its receive time, a copy would be a second reading in silver).

Two threads. The network thread, :meth:`MqttBridge.run`, drives paho's loop itself
(``client.loop``), so callbacks and acks never race and reconnection (exponential
back-off with jitter) is under our control; its message callback only queues the
message. A closed batch goes to the landing thread, which maps it in bulk
(:mod:`landing_zone.mqtt_batch`) and writes and fsyncs its files while the network
thread keeps receiving the next batch (the in-flight window holds two batches). The
network thread then acknowledges the landed batches, in order. Each batch carries the
connection it arrived on: messages of a connection since lost are never acknowledged
(the broker redelivers them to the new one), and a batch of a lost connection not yet
started is not written at all.

Run stand-alone (operations)::

    lakehouse bridge mqtt --config bridge.toml [--metrics-port 9101]
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from config.crash_hook import CrashHook
from landing_zone.formats import raw_frame
from landing_zone.layout import DEAD_LETTERS, LandingLayout
from landing_zone.mqtt_batch import Received, TopicMapper, map_batch
from landing_zone.mqtt_journal import (
    LandingRef,
    ReceiveWindow,
    RedeliveryJournal,
    journal_path,
)
from landing_zone.mqtt_topics import DEVICE_PATTERN, TopicPattern
from landing_zone.writer import LandingWriteError, LandingWriter, new_batch_id

log = structlog.get_logger(__name__)

# MQTT 5 Receive Maximum is a 16-bit field: the broker never has more unacknowledged
# QoS 1 messages out to us than this, so it also caps a batch.
MAX_RECEIVE_MAXIMUM = 65_535
MAX_SESSION_EXPIRY_S = 0xFFFF_FFFF  # "never expires" in MQTT 5
_POLL_S = 0.25  # longest wait in the network loop: bounds reaction to stop and latency flushes
# Wait in the network loop while a batch is being landed: bounds the delay of its acks.
_LANDING_POLL_S = 0.005
# Never subscribed: unsubscribing it is a harmless round trip (see MqttBridge._ack_barrier).
_BARRIER_FILTER = "$lakehouse/ack-barrier"
_BARRIER_TIMEOUT_S = 2.0
# LAKEHOUSE_CRASH_AT points of the landing thread (config.crash_hook), in batch order: the
# batch is closed; its journal record is durable; its landing files are durable (the
# PUBACKs not sent yet).
CRASH_POINTS = frozenset({"mqtt_before_journal", "mqtt_after_journal", "mqtt_after_landing"})


@dataclass(frozen=True)
class _Landing:
    """A closed batch handed to the landing thread; ``landed`` resolves to whether it is durable."""

    messages: list[Received]
    landed: Future[bool]


class _LastError(logging.Handler):
    """Keeps paho's last error message, which explains the disconnect that follows.

    paho reports socket and TLS errors only through its log. Its ``on_log`` callback
    would make paho format a debug line for every packet; a logger set to ERROR lets
    it skip them (``Logger.log`` checks the level before formatting).
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage().removeprefix("failed to receive on socket: ")

    def paho_logger(self) -> logging.Logger:
        """A private (unregistered) logger feeding only this handler."""
        logger = logging.Logger("paho.mqtt.client", logging.ERROR)
        logger.propagate = False
        logger.addHandler(self)
        return logger


class MqttConfigError(ValueError):
    """The bridge configuration cannot work (e.g. unreadable TLS files)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttTlsConfig(_Strict):
    """TLS towards the broker; with ``cert_file`` and ``key_file`` also mutual TLS."""

    ca_file: Path | None = Field(
        None, description="CA bundle that signed the broker's certificate (None: system CAs)."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key (PEM) of cert_file.")
    key_password: SecretStr | None = None
    insecure: bool = Field(
        False,
        description="Skip the broker host name check (the chain is still verified). Tests only.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be given together")
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"tls.{name}: {path} is not a readable file")
        return self


class MqttBridgeConfig(_Strict):
    """Everything the MQTT bridge needs: broker, identity, topics, batching, back-off."""

    host: str = Field("localhost", min_length=1)
    port: int = Field(1883, ge=1, le=65535, description="Usually 8883 with TLS.")
    client_id: str = Field(
        "lakehouse-mqtt-bridge",
        min_length=1,
        description="Names the persistent session: keep it stable, and unique per bridge.",
    )
    patterns: list[TopicPattern] = Field(
        default_factory=lambda: [DEVICE_PATTERN],
        min_length=1,
        description="Topic mappings, first match wins; their filters are subscribed.",
    )
    # QoS 1 only: QoS 0 is never redelivered, and with QoS 2 paho acknowledges
    # (PUBREC) before the application sees the message, so a crash would lose it.
    qos: Literal[1] = 1
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        le=MAX_SESSION_EXPIRY_S,
        description="How long the broker keeps our session (and queues for it) while we are away.",
    )
    username: str | None = None
    password: SecretStr | None = None
    tls: MqttTlsConfig | None = None
    batch_max_messages: int = Field(
        5000,
        ge=1,
        le=MAX_RECEIVE_MAXIMUM,
        description="Messages per landing file; the in-flight window (Receive Maximum) is "
        "twice this, capped at 65535. Fewer, larger files are cheaper for bronze.",
    )
    batch_max_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Payload bytes per batch.")
    batch_max_latency_ms: int = Field(1000, ge=0, le=600_000)
    reconnect_min_delay_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_delay_s: float = Field(30.0, gt=0, le=3600)
    keepalive_s: int = Field(60, ge=5, le=65535)
    connect_timeout_s: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _consistent(self) -> MqttBridgeConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        names = [p.name for p in self.patterns]
        if len(set(names)) != len(names):
            raise ValueError("pattern names must be unique")
        return self

    @property
    def filters(self) -> list[str]:
        """The distinct subscription filters of the patterns, in order."""
        return list(dict.fromkeys(p.filter for p in self.patterns))


def _tls_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """A client context verifying the broker (TLS >= 1.2) and presenting our certificate."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        if tls.cert_file is not None and tls.key_file is not None:
            password = tls.key_password.get_secret_value() if tls.key_password else None
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
    except (ssl.SSLError, OSError) as exc:
        raise MqttConfigError(f"cannot load the MQTT TLS files: {exc}") from exc
    return context


def _tls_hint(detail: str) -> str:
    """A plain-words cause for the usual TLS failures, appended to the raw SSL error."""
    lowered = detail.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return " (the broker's certificate is not trusted by tls.ca_file, or names another host)"
    # With TLS 1.3 the broker checks our certificate after our side of the handshake is
    # done: its refusal arrives as an alert, or (racing it) as a bare EOF.
    if "alert" in lowered or "eof occurred" in lowered:
        return (
            " (the broker aborted the handshake: it rejected or missed the client "
            "certificate; check tls.cert_file and that the broker's CA signed it)"
        )
    return ""


def _looks_like_tls(detail: str) -> bool:
    lowered = detail.lower()
    return "ssl" in lowered or "tls" in lowered or "certificate" in lowered


class MqttBridge:
    """Moves MQTT messages into landing files, acknowledging each only once it is durable.

    Counters are plain attributes, read without locking by a metrics endpoint:
    ``messages_in``, ``batches_written`` (landing files, dead-letter files included),
    ``records_landed``, ``dead_letters``, ``acked``, ``redelivered`` (arrived with DUP),
    ``skipped_redeliveries`` (copies of landed messages: acknowledged, not landed again),
    ``reconnects``, ``connect_failures``, ``write_failures``.
    """

    def __init__(
        self,
        config: MqttBridgeConfig,
        writer: LandingWriter,
        layout: LandingLayout,
        *,
        crash_at: str | None = None,
    ) -> None:
        """``writer`` writes the landing files, under ``layout``'s data directory, which
        also holds the redelivery journal; ``crash_at`` is ``Settings.crash_at`` (tests).

        Reads the journal: raises OSError if it cannot (the bridge cannot tell copies of
        what it landed before from new messages).
        """
        self._config = config
        self._writer = writer
        self._journal = RedeliveryJournal.open(
            journal_path(layout.data_dir, config.host, config.port, config.client_id),
            self._receive_maximum(),
            lambda ref: layout.batch_exists(ref.source, ref.batch_id),
        )
        self._crash = CrashHook(crash_at, "mqtt_", CRASH_POINTS)
        self._tls = _tls_context(config.tls) if config.tls is not None else None
        self._rng = random.Random()
        self._mapper = TopicMapper(config.patterns)
        # Received, not yet acknowledged messages of the open batch: the callback only
        # queues them, the landing thread maps the whole batch at once (_land).
        self._pending: list[Received] = []
        self._pending_dups: list[int] = []  # positions in _pending of messages with DUP set
        self._landing: deque[_Landing] = deque()  # handed to the landing thread, in order
        self._connection = 0  # bumped whenever a connection ends (see _land)
        self._failed_connection = -1  # a write failed for this one: land none of its batches
        self._pending_bytes = 0
        self._batch_started = 0.0
        self._link_up = False  # a socket is open (CONNACK may still be due)
        self._connected = False  # CONNACK accepted on the open socket
        self._link_opened = 0.0
        self._attempt: Literal["connecting", "accepted", "refused", "closing"] = "connecting"
        self._paho_errors = _LastError()
        self._ever_connected = False
        self._failures = 0  # consecutive failed attempts: drives the back-off
        self._barrier_mid: int | None = None
        self._barrier_passed = False
        # The journal's receive window (see _receive_window): QoS 0 messages received, the
        # current connection's number and the QoS 1 count when the broker accepted it.
        self._qos0_in = 0
        self._window = (0, 0)
        self._journal_reset_due = False  # the broker lost our session: clear it first
        self.subscribed = threading.Event()  # set once the broker confirmed the subscriptions
        self.messages_in = 0
        self.batches_written = 0
        self.records_landed = 0
        self.dead_letters = 0
        self.acked = 0
        self.redelivered = 0  # arrived with DUP set: sent before, never acknowledged
        self.skipped_redeliveries = 0  # ... and landed before: acknowledged, not landed again
        self.reconnects = 0
        self.connect_failures = 0
        self.write_failures = 0

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the current connection."""
        return self._connected

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters, for metrics and the stop log line."""
        names = (
            "messages_in",
            "batches_written",
            "records_landed",
            "dead_letters",
            "acked",
            "redelivered",
            "skipped_redeliveries",
            "reconnects",
            "connect_failures",
            "write_failures",
        )
        return {name: int(getattr(self, name)) for name in names}

    # -- main loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Bridge until ``stop`` is set, then flush and acknowledge the open batch and disconnect.

        Connection failures never end the loop: the bridge retries with exponential
        back-off and jitter until stopped.
        """
        client = self._new_client()
        lander = ThreadPoolExecutor(1, thread_name_prefix="mqtt-landing")
        cfg = self._config
        log.info(
            "mqtt.bridge_started",
            host=cfg.host,
            port=cfg.port,
            client_id=cfg.client_id,
            filters=cfg.filters,
            tls=cfg.tls is not None,
        )
        try:
            while not stop.is_set():
                if not self._link_up:
                    if self._failures and stop.wait(self._backoff_delay()):
                        break
                    self._open_link(client)
                    continue
                try:
                    rc = client.loop(timeout=self._poll_timeout())
                except OSError as exc:
                    # paho handles most socket errors itself; never let one end the bridge.
                    # (The next connect() closes the old socket.)
                    log.warning("mqtt.network_error", error=str(exc))
                    rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._link_lost()
                    continue
                if not self._connected and self._attempt == "connecting":
                    if time.monotonic() - self._link_opened > cfg.connect_timeout_s:
                        log.warning(
                            "mqtt.connect_failed",
                            error=f"no CONNACK from the broker within {cfg.connect_timeout_s}s",
                        )
                        self._close_link(client)
                        self._failures += 1
                        self.connect_failures += 1
                    continue
                if not self._acknowledge_landed(client):
                    # Not durable, so not acknowledged: drop the connection and let the
                    # broker redeliver the batch to our session after the back-off.
                    self._close_link(client)
                    self._failures += 1
                    continue
                if self._flush_due():
                    self._close_batch(lander)
        finally:
            self._shutdown(client, lander)
            lander.shutdown(wait=True)

    def _new_client(self) -> mqtt.Client:
        cfg = self._config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,  # PUBACK only after the landing file is durable (see module doc)
            reconnect_on_failure=False,  # we reconnect ourselves, with jitter
        )
        client.connect_timeout = cfg.connect_timeout_s
        if cfg.username is not None:
            secret = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, secret)
        if self._tls is not None and cfg.tls is not None:
            client.tls_set_context(self._tls)
            client.tls_insecure_set(cfg.tls.insecure)
            if cfg.tls.insecure:
                log.warning("mqtt.tls_insecure", detail="broker host name is not verified")
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.enable_logger(self._paho_errors.paho_logger())
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
        # Without an expiry an MQTT 5 session ends with the connection, and with it the
        # queue of messages published while we are away.
        props.SessionExpiryInterval = self._config.session_expiry_s
        # Unacknowledged messages wait in our open batch, so the in-flight window must
        # hold a whole batch, or batches could only ever be closed by latency; two
        # batches, so the broker sends the next one while this one is being landed.
        # (mosquitto 2 honours it for MQTT 5 clients, beyond its max_inflight_messages.)
        props.ReceiveMaximum = self._receive_maximum()
        return props

    def _receive_maximum(self) -> int:
        # Also the redelivery journal's bound: the broker never has more than this many
        # messages out to us unacknowledged (see landing_zone.mqtt_journal).
        return min(2 * self._config.batch_max_messages, MAX_RECEIVE_MAXIMUM)

    def _open_link(self, client: mqtt.Client) -> None:
        cfg = self._config
        self._attempt = "connecting"
        self._paho_errors.message = None
        self._link_opened = time.monotonic()
        try:
            rc = client.connect(
                cfg.host,
                cfg.port,
                keepalive=cfg.keepalive_s,
                clean_start=False,
                properties=self._connect_properties(),
            )
        except ssl.SSLError as exc:
            detail = str(exc)
            log.error(
                "mqtt.tls_failed",
                host=cfg.host,
                port=cfg.port,
                error=f"TLS handshake failed: {detail}{_tls_hint(detail)}",
            )
            rc = MQTTErrorCode.MQTT_ERR_TLS
        except OSError as exc:
            log.warning(
                "mqtt.connect_failed",
                host=cfg.host,
                port=cfg.port,
                error=f"cannot reach the broker at {cfg.host}:{cfg.port}: {exc}",
            )
            rc = MQTTErrorCode.MQTT_ERR_NO_CONN
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._link_up = True
            return
        # Failed before or while sending CONNECT (on_disconnect has logged the latter).
        self._failures += 1
        self.connect_failures += 1

    def _link_lost(self) -> None:
        """The network loop reported the connection gone (paho closed the socket)."""
        if self._attempt != "accepted":
            self.connect_failures += 1
        self._link_up = False
        self._connected = False
        self._failures += 1
        self._discard_pending("connection lost")

    def _close_link(self, client: mqtt.Client) -> None:
        """Send DISCONNECT (the session and its unacknowledged messages stay on the broker)."""
        self._attempt = "closing"
        if client.socket() is not None:
            client.disconnect()
            deadline = time.monotonic() + 2.0
            while client.socket() is not None and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._link_up = False
        self._connected = False
        self._discard_pending("connection closed")

    def _discard_pending(self, why: str) -> None:
        # Never acknowledged, so the broker still owns these messages: it redelivers them
        # to our session on reconnect. Writing them now would only add duplicates (and,
        # for payloads without a timestamp, duplicates with a different receive time).
        # The landing thread skips the closed batches of this connection it has not
        # started; one being written completes, and the redelivery journal recognises
        # its redelivered copies (acknowledged, not landed again).
        self._connection += 1
        unacknowledged = len(self._pending) + sum(len(b.messages) for b in self._landing)
        if unacknowledged:
            log.warning(
                "mqtt.batch_abandoned",
                messages=unacknowledged,
                reason=why,
                detail="not acknowledged; the broker redelivers them",
            )
        self._pending = []
        self._pending_dups = []
        self._pending_bytes = 0
        self._landing.clear()

    def _backoff_delay(self) -> float:
        """Exponential back-off with jitter (half to full step), so bridges don't stampede."""
        cfg = self._config
        doublings = min(max(self._failures - 1, 0), 32)  # a float overflows past ~2**1023
        step = min(cfg.reconnect_max_delay_s, cfg.reconnect_min_delay_s * 2**doublings)
        delay = self._rng.uniform(step / 2, step)
        log.info("mqtt.reconnect_wait", delay_s=round(delay, 3), attempt=self._failures)
        return delay

    def _poll_timeout(self) -> float:
        longest = _LANDING_POLL_S if self._landing else _POLL_S
        if not self._pending:
            return longest
        age = time.monotonic() - self._batch_started
        remaining = self._config.batch_max_latency_ms / 1000 - age
        return max(0.0, min(longest, remaining))

    def _shutdown(self, client: mqtt.Client, lander: ThreadPoolExecutor) -> None:
        if self._connected and self._pending:
            self._close_batch(lander)
        if self._connected and self._landing:
            # Durable first, then acknowledged, then confirmed, then DISCONNECT. The
            # network loop keeps running meanwhile, so the link stays serviced.
            while self._landing and self._link_up:
                if client.loop(timeout=_LANDING_POLL_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._link_lost()
                elif not self._acknowledge_landed(client):
                    break
            if self._link_up and not self._landing:
                self._ack_barrier(client)
        if self._link_up:
            self._close_link(client)
        self._discard_pending("bridge stopping")
        log.info("mqtt.bridge_stopped", **self.counters())

    def _ack_barrier(self, client: mqtt.Client) -> None:
        """Wait until the broker has read our last PUBACKs (at most _BARRIER_TIMEOUT_S).

        Written is not read: if a new bridge with our client id connects at once (a
        restart), mosquitto takes the session over and drops the old connection with
        whatever it had not read yet, so those messages come back as duplicates. The
        broker handles a connection's packets in order, so its answer to an UNSUBSCRIBE
        sent after the PUBACKs proves it has processed them. The filter was never
        subscribed: the session's subscriptions are untouched.
        """
        self._barrier_passed = False
        rc, mid = client.unsubscribe(_BARRIER_FILTER)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        self._barrier_mid = mid
        deadline = time.monotonic() + _BARRIER_TIMEOUT_S
        while not self._barrier_passed and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._link_lost()
                return

    # -- batches ---------------------------------------------------------------------

    def _flush_due(self) -> bool:
        if not self._pending:
            return False
        cfg = self._config
        return (
            len(self._pending) >= cfg.batch_max_messages
            or self._pending_bytes >= cfg.batch_max_bytes
            or time.monotonic() - self._batch_started >= cfg.batch_max_latency_ms / 1000
        )

    def _close_batch(self, lander: ThreadPoolExecutor) -> None:
        """Hand the open batch to the landing thread (acknowledged in _acknowledge_landed)."""
        batch = self._pending
        redelivered = self._pending_dups
        self._pending = []
        self._pending_dups = []
        self._pending_bytes = 0
        seen = self.messages_in - self._qos0_in
        landed = lander.submit(
            self._land, batch, self._connection, redelivered, seen, self._journal.epoch
        )
        self._landing.append(_Landing(batch, landed))

    def _receive_window(self) -> ReceiveWindow:
        """Landing thread: the journal's view of what the network thread has received."""
        # The count first: a connection accepted after reading it only moves the start
        # past it, which keeps more journal records, never fewer. (The network thread
        # counts a QoS 0 message before counting it in, for the same reason.)
        received = self.messages_in - self._qos0_in
        connection, start = self._window
        return ReceiveWindow(connection, start, received)

    def _land(
        self,
        batch: list[Received],
        connection: int,
        redelivered: Sequence[int] = (),
        seen: int = 0,
        epoch: int | None = None,
    ) -> bool:
        """Landing thread: write a batch (one file per source, one of dead letters).

        ``redelivered``: positions of the messages that arrived with DUP set; those the
        journal knows as landed are acknowledged but not landed again. ``seen``: QoS 1
        messages received up to the batch's last; ``epoch``: the journal's when the batch
        closed (default: now).

        Returns whether every file of the batch is durable; False (nothing may be
        acknowledged) when one (or the batch's journal record) could not be written, or
        when the batch belongs to a connection that is gone or failed a write (the broker
        redelivers it anyway).
        """
        if connection != self._connection or connection == self._failed_connection:
            return False
        journal = self._journal
        window = self._receive_window()
        size = len(batch)
        if redelivered and journal.batches:  # the journal is usually empty, copies rare
            known = journal.known(
                batch, redelivered, connection=connection, seen=seen, window=window
            )
            if known:
                self.skipped_redeliveries += len(known)
                log.debug(
                    "mqtt.redeliveries_skipped",
                    messages=len(known),
                    detail="copies of landed messages whose PUBACK the broker never read: "
                    "acknowledged, not landed again",
                )
                skip = set(known)
                batch = [m for i, m in enumerate(batch) if i not in skip]
                if not batch:
                    return True
        mapped = map_batch(batch, self._mapper)
        letters = mapped.dead_letters
        # Named up front, so the journal can record which file will hold each message
        # before any is written; the dead-letter file comes last (see mqtt_journal).
        files = {source: LandingRef(source, new_batch_id()) for source in mapped.sources}
        letters_file = LandingRef(DEAD_LETTERS, new_batch_id())
        try:
            self._crash.reached("mqtt_before_journal")
            journal.record(
                [(files[source], entries.messages) for source, entries in mapped.sources.items()]
                + [(letters_file, mapped.dead_letter_messages)],
                connection=connection,
                seen=seen,
                window=window,
                epoch=journal.epoch if epoch is None else epoch,
            )
            self._crash.reached("mqtt_after_journal")
            for source, entries in mapped.sources.items():
                try:
                    receipt = self._writer.write_frame(
                        source, raw_frame(entries.records), batch_id=files[source].batch_id
                    )
                except LandingWriteError:
                    raise
                except Exception as exc:
                    # Not the disk: something in these records cannot be written (a bug or
                    # an unforeseen shape). Redelivery would fail the same way forever, so
                    # set the messages aside as dead letters instead of wedging the session.
                    log.exception(
                        "mqtt.batch_unwritable", source=source, messages=len(entries.records)
                    )
                    error = f"cannot write a landing file for source {source!r}: {exc}"
                    letters.extend(entries.dead_letters(error))
                    continue
                journal.mark_written(files[source])
                self.batches_written += 1
                self.records_landed += receipt.records
            if letters:
                self._writer.write_dead_letters(raw_frame(letters), batch_id=letters_file.batch_id)
                journal.mark_written(letters_file)
                self.batches_written += 1
                self.dead_letters += len(letters)
        except LandingWriteError as exc:
            # Later batches of this connection must not land either: acknowledgements go
            # in order, so the broker redelivers them all after the reconnect.
            self._failed_connection = connection
            self.write_failures += 1
            log.error(
                "mqtt.landing_write_failed",
                messages=size,
                error=str(exc),
                detail="not acknowledged; reconnecting so the broker redelivers them",
            )
            return False
        self._crash.reached("mqtt_after_landing")
        log.debug(
            "mqtt.batch_landed",
            messages=size,
            skipped=size - len(batch),
            sources=sorted(mapped.sources),
            dead_letters=len(letters),
        )
        return True

    def _acknowledge_landed(self, client: mqtt.Client) -> bool:
        """Network thread: acknowledge the batches landed so far, in order.

        Every batch queued here arrived on the current connection (_discard_pending
        drops the others). Returns False when a batch could not be landed: the caller
        drops the connection, so that the broker redelivers it.
        """
        while self._landing and self._landing[0].landed.done():
            batch = self._landing.popleft()
            try:
                durable = batch.landed.result()
            except Exception:
                log.exception("mqtt.landing_failed", messages=len(batch.messages))
                durable = False
            if not durable:
                return False
            for mid, qos, _, _, _ in batch.messages:
                if qos > 0:
                    client.ack(mid, qos)
                    self.acked += 1
        return True

    # -- paho callbacks (called from client.loop, in the run thread) -----------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        cfg = self._config
        if reason_code.is_failure:
            self._attempt = "refused"
            log.error(
                "mqtt.connection_refused",
                host=cfg.host,
                port=cfg.port,
                reason_code=reason_code.value,
                error=f"mqtt connection refused: {str(reason_code).lower()}",
            )
            return
        if not flags.session_present or self._journal_reset_due:
            # The broker resends nothing of an earlier session, and numbers the new one's
            # packets afresh: the journal's records would only match messages never landed.
            # Cleared durably before subscribing, so before any message of the new session.
            self._journal_reset_due = True
            try:
                if self._journal.reset():
                    log.info("mqtt.journal_cleared", client_id=cfg.client_id)
            except OSError as exc:
                self._attempt = "refused"
                log.error(
                    "mqtt.journal_reset_failed",
                    path=str(self._journal.path),
                    error=str(exc),
                    detail="not subscribing before the redelivery journal is cleared; "
                    "retrying after the back-off",
                )
                client.disconnect()
                return
            self._journal_reset_due = False
        self._window = (self._connection, self.messages_in - self._qos0_in)
        self._attempt = "accepted"
        self._connected = True
        self._failures = 0
        if self._ever_connected:
            self.reconnects += 1
            if not flags.session_present:
                # Expired (we were away longer than session_expiry_s) or the broker lost
                # its state: whatever was published for us meanwhile is gone.
                log.error(
                    "mqtt.session_lost",
                    client_id=cfg.client_id,
                    detail="the broker had no session for us: messages published while "
                    "we were disconnected may be lost",
                )
        self._ever_connected = True
        log.info(
            "mqtt.connected",
            host=cfg.host,
            port=cfg.port,
            client_id=cfg.client_id,
            session_present=flags.session_present,
        )
        # Subscribing again on a resumed session is harmless and applies config changes;
        # retained messages are only sent for a *new* subscription, so reconnecting does
        # not re-ingest every retained value as a fresh reading.
        options = SubscribeOptions(
            qos=cfg.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
        )
        client.subscribe([(f, options) for f in cfg.filters])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for topic_filter, code in zip(self._config.filters, reason_codes, strict=False):
            if code.is_failure:
                log.error(
                    "mqtt.subscription_refused",
                    filter=topic_filter,
                    error=f"mqtt subscription refused: {str(code).lower()}",
                )
            elif code.value < 1:
                log.warning(
                    "mqtt.subscription_downgraded",
                    filter=topic_filter,
                    detail="granted QoS 0: these messages are not redelivered after a crash",
                )
            else:
                log.info("mqtt.subscribed", filter=topic_filter, qos=code.value)
        self.subscribed.set()

    def _on_unsubscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._barrier_mid:
            self._barrier_passed = True

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected = False
        cfg = self._config
        if self._attempt == "refused":
            return  # the CONNACK refusal was logged with its reason
        if self._attempt == "closing":
            log.info("mqtt.disconnected", host=cfg.host, port=cfg.port, reason="requested")
            return
        detail = self._paho_errors.message or str(reason_code)
        if self._attempt == "connecting":
            if cfg.tls is not None and _looks_like_tls(detail):
                log.error(
                    "mqtt.tls_failed",
                    host=cfg.host,
                    port=cfg.port,
                    error=f"TLS handshake failed: {detail}{_tls_hint(detail)}",
                )
            else:
                log.warning(
                    "mqtt.connect_failed",
                    host=cfg.host,
                    port=cfg.port,
                    error=f"connection closed before the broker accepted it: {detail}",
                )
            return
        log.warning(
            "mqtt.disconnected",
            host=cfg.host,
            port=cfg.port,
            reason=str(reason_code),
            detail=self._paho_errors.message,
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Runs once per message on the network thread: queue only, mapping is per batch
        # (_land). paho keeps the topic's bytes in ``_topic``: decoded later, and only
        # once per distinct topic (mqtt_batch.TopicMapper).
        payload = message.payload
        if not self._pending:
            self._batch_started = time.monotonic()
        self._pending.append(
            (message.mid, message.qos, message._topic, bytes(payload), message.timestamp)
        )
        self._pending_bytes += len(payload)
        if not message.qos:  # never redelivered, and outside the journal's receive window
            self._qos0_in += 1
        self.messages_in += 1
        if message.dup:
            self.redelivered += 1
            self._pending_dups.append(len(self._pending) - 1)
