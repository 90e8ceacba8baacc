"""The MQTT bridge: subscribes to device topics and writes their messages as landing files.

Durability contract (DESIGN.md, "a writer acknowledges only after the rename is
durable"): messages are received with QoS 1 in a persistent MQTT 5 session
(``clean_start=False`` plus a session expiry), and paho's automatic PUBACK is
turned off (``manual_ack=True``). A message is acknowledged with
``client.ack(mid, qos)`` only after the landing file holding it (or its dead
letter) has been written, fsynced and renamed. Until then the broker keeps it in
our session's in-flight window and redelivers it after any reconnect, bridge
crash or broker restart; so a message is landed *at least once* and silver's key
de-duplication makes it count once.

The bridge runs one thread: :meth:`MqttBridge.run` drives paho's network loop
itself (``client.loop``), so message callbacks, batch flushes and acks never race,
and reconnection (exponential back-off with jitter) is under our control.

Run stand-alone (tests, operations)::

    python -m landing_zone.mqtt_bridge bridge.json dados/
"""

from __future__ import annotations

import base64
import random
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import polars as pl
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from landing_zone.mqtt_topics import (
    DEVICE_PATTERN,
    MessageRejected,
    RawRecord,
    TopicPattern,
    iso_utc,
    map_message,
)
from landing_zone.writer import LandingWriteError, LandingWriter

log = structlog.get_logger(__name__)

# MQTT 5 Receive Maximum is a 16-bit field: the broker never has more unacknowledged
# QoS 1 messages out to us than this, so it also caps a batch.
MAX_RECEIVE_MAXIMUM = 65_535
MAX_SESSION_EXPIRY_S = 0xFFFF_FFFF  # "never expires" in MQTT 5
_POLL_S = 0.25  # longest wait in the network loop: bounds reaction to stop and latency flushes
# Never subscribed: unsubscribing it is a harmless round trip (see MqttBridge._ack_barrier).
_BARRIER_FILTER = "$lakehouse/ack-barrier"
_BARRIER_TIMEOUT_S = 2.0


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
    batch_max_messages: int = Field(1000, ge=1, le=MAX_RECEIVE_MAXIMUM)
    batch_max_bytes: int = Field(4 * 1024 * 1024, ge=1)
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


@dataclass
class _Pending:
    """A received, not yet acknowledged message and what it becomes."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: datetime
    source: str | None  # None: a dead letter
    record: RawRecord | None
    error: str | None

    def dead_letter(self, error: str | None = None) -> dict[str, str]:
        return {
            "origin": "mqtt",
            "topic": self.topic,
            "payload_base64": base64.b64encode(self.payload).decode("ascii"),
            "error": error or self.error or "unknown error",
            "received_at": iso_utc(self.received_at),
        }


def records_frame(rows: Sequence[Mapping[str, str | None]]) -> pl.DataFrame:
    """Raw records as an all-String frame; fields missing from a record are null."""
    columns: dict[str, list[str | None]] = {}
    for index, row in enumerate(rows):
        for name, value in row.items():
            columns.setdefault(name, [None] * index).append(value)
        for column in columns.values():
            if len(column) == index:
                column.append(None)
    return pl.DataFrame(columns, schema=dict.fromkeys(columns, pl.String))


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
    ``reconnects``, ``connect_failures``, ``write_failures``.
    """

    def __init__(self, config: MqttBridgeConfig, writer: LandingWriter) -> None:
        self._config = config
        self._writer = writer
        self._tls = _tls_context(config.tls) if config.tls is not None else None
        self._rng = random.Random()
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._batch_started = 0.0
        self._link_up = False  # a socket is open (CONNACK may still be due)
        self._connected = False  # CONNACK accepted on the open socket
        self._link_opened = 0.0
        self._attempt: Literal["connecting", "accepted", "refused", "closing"] = "connecting"
        self._last_error: str | None = None
        self._ever_connected = False
        self._failures = 0  # consecutive failed attempts: drives the back-off
        self._barrier_mid: int | None = None
        self._barrier_passed = False
        self.subscribed = threading.Event()  # set once the broker confirmed the subscriptions
        self.messages_in = 0
        self.batches_written = 0
        self.records_landed = 0
        self.dead_letters = 0
        self.acked = 0
        self.redelivered = 0  # arrived with DUP set: sent before, never acknowledged
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
                if self._flush_due() and not self._flush(client):
                    # Not durable, so not acknowledged: drop the connection and let the
                    # broker redeliver the batch to our session after the back-off.
                    self._close_link(client)
                    self._failures += 1
        finally:
            self._shutdown(client)

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
        client.on_log = self._on_log
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
        # Without an expiry an MQTT 5 session ends with the connection, and with it the
        # queue of messages published while we are away.
        props.SessionExpiryInterval = self._config.session_expiry_s
        # Unacknowledged messages wait in our open batch, so the in-flight window must
        # hold a whole batch, or batches could only ever be closed by latency; two
        # batches, so the broker sends the next one while this one is being written.
        props.ReceiveMaximum = min(2 * self._config.batch_max_messages, MAX_RECEIVE_MAXIMUM)
        return props

    def _open_link(self, client: mqtt.Client) -> None:
        cfg = self._config
        self._attempt = "connecting"
        self._last_error = None
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
        if self._pending:
            log.warning(
                "mqtt.batch_abandoned",
                messages=len(self._pending),
                reason=why,
                detail="not acknowledged; the broker redelivers them",
            )
        self._pending = []
        self._pending_bytes = 0

    def _backoff_delay(self) -> float:
        """Exponential back-off with jitter (half to full step), so bridges don't stampede."""
        cfg = self._config
        doublings = min(max(self._failures - 1, 0), 32)  # a float overflows past ~2**1023
        step = min(cfg.reconnect_max_delay_s, cfg.reconnect_min_delay_s * 2**doublings)
        delay = self._rng.uniform(step / 2, step)
        log.info("mqtt.reconnect_wait", delay_s=round(delay, 3), attempt=self._failures)
        return delay

    def _poll_timeout(self) -> float:
        if not self._pending:
            return _POLL_S
        age = time.monotonic() - self._batch_started
        remaining = self._config.batch_max_latency_ms / 1000 - age
        return max(0.0, min(_POLL_S, remaining))

    def _shutdown(self, client: mqtt.Client) -> None:
        if self._connected and self._pending and self._flush(client):
            # Durable first, then acknowledged, then confirmed, then DISCONNECT.
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

    def _flush(self, client: mqtt.Client) -> bool:
        """Write the open batch (one landing file per source, one of dead letters), then ack.

        Every message of the batch is acknowledged, in arrival order as MQTT requires,
        only after *all* its files are durable. Returns False (nothing acknowledged)
        when a file could not be written.
        """
        batch = self._pending
        self._pending = []
        self._pending_bytes = 0
        by_source: dict[str, list[_Pending]] = {}
        letters: list[dict[str, str]] = []
        for entry in batch:
            if entry.source is not None:
                by_source.setdefault(entry.source, []).append(entry)
            else:
                letters.append(entry.dead_letter())
        try:
            for source, entries in by_source.items():
                rows = [e.record for e in entries if e.record is not None]
                try:
                    receipt = self._writer.write_frame(source, records_frame(rows))
                except LandingWriteError:
                    raise
                except Exception as exc:
                    # Not the disk: something in these records cannot be written (a bug or
                    # an unforeseen shape). Redelivery would fail the same way forever, so
                    # set the messages aside as dead letters instead of wedging the session.
                    log.exception("mqtt.batch_unwritable", source=source, messages=len(entries))
                    error = f"cannot write a landing file for source {source!r}: {exc}"
                    letters.extend(e.dead_letter(error) for e in entries)
                    continue
                self.batches_written += 1
                self.records_landed += receipt.records
            if letters:
                self._writer.write_dead_letters(records_frame(letters))
                self.batches_written += 1
                self.dead_letters += len(letters)
        except LandingWriteError as exc:
            self.write_failures += 1
            log.error(
                "mqtt.landing_write_failed",
                messages=len(batch),
                error=str(exc),
                detail="not acknowledged; reconnecting so the broker redelivers them",
            )
            return False
        for entry in batch:
            if entry.qos > 0:
                client.ack(entry.mid, entry.qos)
                self.acked += 1
        log.debug(
            "mqtt.batch_acknowledged",
            messages=len(batch),
            sources=sorted(by_source),
            dead_letters=len(letters),
        )
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
        detail = self._last_error or str(reason_code)
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
            detail=self._last_error,
        )

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # paho reports socket and TLS errors only through its log; keep the last one to
        # explain the disconnect that follows.
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = buf.removeprefix("failed to receive on socket: ")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received_at = datetime.now(UTC)
        self.messages_in += 1
        if message.dup:
            self.redelivered += 1
        payload = bytes(message.payload)
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers should refuse these; never lose the bytes
            topic = message._topic.decode("utf-8", errors="backslashreplace")
        entry = _Pending(message.mid, message.qos, topic, payload, received_at, None, None, None)
        try:
            entry.source, entry.record = map_message(
                topic, payload, received_at, self._config.patterns
            )
        except MessageRejected as exc:
            entry.error = exc.reason
        except Exception as exc:
            # A mapping bug must not wedge the session by redelivering forever.
            log.exception("mqtt.mapping_failed", topic=topic)
            entry.error = f"internal error mapping the message: {exc!r}"
        if not self._pending:
            self._batch_started = time.monotonic()
        self._pending.append(entry)
        self._pending_bytes += len(payload) + len(topic)
