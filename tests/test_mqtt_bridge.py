"""The MQTT bridge: topic mapping (unit) and delivery guarantees against a real mosquitto.

Integration tests run the bridge in a thread, or as a real subprocess where it must be
killed (``lakehouse bridge mqtt``); the broker is a real mosquitto with a
plain, an mTLS and a password listener (tests/mqtt_broker.py).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from config.contracts import load_contracts
from config.settings import Settings
from delta_processing.processor import Processor
from landing_zone.layout import LandingLayout
from landing_zone.mqtt_bridge import MqttBridge, MqttBridgeConfig, MqttTlsConfig
from landing_zone.mqtt_topics import (
    DEVICE_PATTERN,
    MessageRejected,
    TopicPattern,
    decode_payload,
    map_message,
    normalize_mac,
    topic_matches,
)
from landing_zone.writer import LandingReceipt, LandingWriteError, LandingWriter
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, wait_until
from tests.mqtt_broker import BROKER_PASSWORD, BROKER_USER, MOSQUITTO, MosquittoBroker

RECEIVED = datetime(2026, 11, 22, 10, 30, 0, 123456, tzinfo=UTC)
RECEIVED_ISO = "2026-11-22T10:30:00.123456Z"
BASE = datetime(2026, 11, 1, tzinfo=UTC)
TOPIC = "tele/f2-AA:BB:CC:DD:EE:FF/live/c1/temperature"

needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None,
    reason="the mosquitto binary is not installed (`apt-get install mosquitto`; make installs it)",
)


# -- unit: topics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["aabbccddeeff", "AABBCCDDEEFF", "aa:bb:cc:dd:ee:ff", "AA:BB:CC:DD:EE:FF",
     "aa-bb-cc-dd-ee-ff", "Aa-bB-cC-Dd-eE-Ff"],
)  # fmt: skip
def test_mac_spellings_normalise_to_lowercase_colons(spelling: str) -> None:
    assert normalize_mac(spelling) == "aa:bb:cc:dd:ee:ff"
    topic = f"tele/f2-{spelling}/live/c1/temperature"
    _, record = map_message(topic, b"1", RECEIVED, [DEVICE_PATTERN])
    assert record["device_id"] == "aa:bb:cc:dd:ee:ff"


@pytest.mark.parametrize(
    "spelling",
    ["aabbccddeef", "aabbccddeeff0", "aabbccddeefg", "aa:bb-cc:dd:ee:ff", "aa:bbcc:dd:ee:ff",
     "aa:bb:cc:dd:ee:ff:", "aa.bb.cc.dd.ee.ff", "aabb.ccdd.eeff", "aa bb cc dd ee ff"],
)  # fmt: skip
def test_invalid_macs_are_rejected_naming_topic_and_mac(spelling: str) -> None:
    assert normalize_mac(spelling) is None
    topic = f"tele/f2-{spelling}/live/c1/temperature"
    with pytest.raises(MessageRejected) as caught:
        map_message(topic, b"1", RECEIVED, [DEVICE_PATTERN])
    assert caught.value.reason == (
        f"topic {topic!r}: invalid MAC address {spelling!r}: expected 12 hex digits, "
        "optionally in pairs separated by ':' or '-'"
    )


@pytest.mark.parametrize("kind", ["cmnd", "stat", "tele"])
def test_device_topic_and_json_object_become_one_reading(kind: str) -> None:
    topic = f"{kind}/f2-AA-BB-CC-DD-EE-01/live/c1/temperature"
    payload = json.dumps(
        {"ts": "2026-11-01T10:00:00Z", "value": 21.5, "unit": "C", "meta": {"fw": [1, 2]},
         "ok": True, "note": None}
    ).encode()  # fmt: skip
    source, record = map_message(topic, payload, RECEIVED, [DEVICE_PATTERN])
    assert source == "readings"
    assert record == {
        "mqtt_topic": topic,
        "device_id": "aa:bb:cc:dd:ee:01",
        "sensor": "c1/temperature",
        "mqtt_type": kind,
        "mqtt_mode": "live",
        "ts": "2026-11-01T10:00:00Z",
        "value": "21.5",
        "unit": "C",
        "meta": '{"fw":[1,2]}',
        "ok": "true",
        "note": None,
    }


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"21.5", "21.5"), (b" 42 \n", "42"), (b"-3", "-3"), (b"0", "0"), (b"1e3", "1000.0"),
     (b"+5", "5"), (b"007", "7"), (b".5", "0.5"), (b"7.", "7.0"), (b"-2.50", "-2.5"),
     (b"123456789012345678901", "123456789012345678901")],
)  # fmt: skip
def test_numeric_payloads_become_value_with_receive_time(payload: bytes, value: str) -> None:
    _, record = map_message(TOPIC, payload, RECEIVED, [DEVICE_PATTERN])
    assert record == {
        "mqtt_topic": TOPIC,
        "device_id": "aa:bb:cc:dd:ee:ff",
        "sensor": "c1/temperature",
        "mqtt_type": "tele",
        "mqtt_mode": "live",
        "value": value,
        "ts": RECEIVED_ISO,
    }


def test_ts_defaults_to_receive_time_in_utc() -> None:
    naive = datetime(2026, 11, 22, 10, 30, 0, 123456)  # taken as UTC
    shifted = RECEIVED.astimezone(timezone(timedelta(hours=2)))
    for received in (RECEIVED, naive, shifted):
        _, record = map_message(TOPIC, b'{"value": 1, "ts": null}', received, [DEVICE_PATTERN])
        assert record["ts"] == RECEIVED_ISO
    _, record = map_message(TOPIC, b'{"value": 1, "ts": 1700000000000}', RECEIVED, [DEVICE_PATTERN])
    assert record["ts"] == "1700000000000"  # epoch ms, as sent: silver parses it


def test_payload_field_contradicting_the_topic_is_kept_beside_it() -> None:
    payload = b'{"device_id": "other", "sensor": "c1/temperature", "value": 2}'
    _, record = map_message(TOPIC, payload, RECEIVED, [DEVICE_PATTERN])
    assert record["device_id"] == "aa:bb:cc:dd:ee:ff"
    assert record["payload_device_id"] == "other"
    assert "payload_sensor" not in record  # it agreed with the topic
    clash = b'{"device_id": "other", "payload_device_id": "x"}'
    with pytest.raises(MessageRejected, match="'payload_device_id' is taken"):
        map_message(TOPIC, clash, RECEIVED, [DEVICE_PATTERN])


AT = f"topic {TOPIC!r}: "
WANT = "expected a JSON object or a number"
OUT = "out of the float range"
REJECTIONS = [
    ("a/b", b"1", "topic 'a/b' matches no configured topic filter"),
    ("tele/aabbccddeeff/live/c1/t", b"1",
     "topic 'tele/aabbccddeeff/live/c1/t' does not match pattern 'device' "
     "({type}/f2-{mac}/{mode}/{connector}/{component})"),
    ("info/f2-aabbccddeeff/live/c1/t", b"1",
     "topic 'info/f2-aabbccddeeff/live/c1/t': type 'info' is not one of cmnd, stat, tele"),
    ("tele/f2-xx/live/c1/t", b"1", "topic 'tele/f2-xx/live/c1/t': invalid MAC address 'xx'"),
    (TOPIC, b"\xff\xfe", AT + "payload is not valid UTF-8 (byte 0)"),
    (TOPIC, b'{"v": "\xc3"}', AT + "payload is not valid UTF-8 (byte 7)"),
    (TOPIC, b"", AT + "empty payload"),
    (TOPIC, b"  \n", AT + "empty payload"),
    (TOPIC, b"[1, 2]", AT + "payload is a JSON array; " + WANT),
    (TOPIC, b'"21.5"', AT + "payload is a JSON string; " + WANT),
    (TOPIC, b"true", AT + "payload is a JSON boolean; " + WANT),
    (TOPIC, b"null", AT + "payload is a JSON null; " + WANT),
    (TOPIC, b"NaN", AT + "NaN is not a finite number"),
    (TOPIC, b"-Infinity", AT + "-Infinity is not a finite number"),
    (TOPIC, b"nan", AT + "nan is not a finite number"),
    (TOPIC, b"inf", AT + "inf is not a finite number"),
    (TOPIC, b'{"value": NaN}', AT + "NaN is not a finite number"),
    (TOPIC, b"1e999", AT + "field 'value' holds a number " + OUT),
    (TOPIC, b'{"value": 1e999}', AT + "field 'value' holds a number " + OUT),
    (TOPIC, b"{bad", AT + "payload is neither JSON nor a number: Expecting property "
                     "name enclosed in double quotes (line 1, column 2)"),
    (TOPIC, b"on", AT + "payload is neither JSON nor a number: Expecting value "
                   "(line 1, column 1)"),
    (TOPIC, b"[" * 100_000, AT + "JSON payload nested too deeply"),
]  # fmt: skip


@pytest.mark.parametrize(("topic", "payload", "reason"), REJECTIONS)
def test_every_rejection_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(MessageRejected) as caught:
        map_message(topic, payload, RECEIVED, [DEVICE_PATTERN])
    assert caught.value.reason.startswith(reason), caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_custom_patterns_regex_templates_and_first_match_wins() -> None:
    meters = TopicPattern(
        name="meters",
        filter="site/+/meter/#",
        pattern=r"^site/(?P<site>[a-z]+)/meter/(?P<meter>\d+)(?:/(?P<rest>.+))?$",
        source="meters",
        fields={"meter_id": "{site}-{meter}"},
        value_field="kwh",
        time_field="at",
    )
    catch_all = TopicPattern(name="any", filter="#", pattern="^(?P<t>.*)$", source="misc",
                             time_field=None)  # fmt: skip
    patterns = [meters, DEVICE_PATTERN, catch_all]
    source, record = map_message("site/lyon/meter/7/x", b"12.5", RECEIVED, patterns)
    assert (source, record) == (
        "meters",
        {
            "mqtt_topic": "site/lyon/meter/7/x",
            "meter_id": "lyon-7",
            "kwh": "12.5",
            "at": RECEIVED_ISO,
        },
    )
    # The meters pattern's filter matches but its regex does not: the next pattern is tried.
    assert map_message("site/LYON/meter/7", b"1", RECEIVED, patterns)[0] == "misc"
    assert map_message(TOPIC, b"1", RECEIVED, patterns)[0] == "readings"
    assert map_message("x", b'{"a": 1}', RECEIVED, patterns) == (
        "misc", {"mqtt_topic": "x", "a": "1"},
    )  # fmt: skip
    assert decode_payload("t", b"5", "kwh") == {"kwh": "5"}


@pytest.mark.parametrize(
    ("changes", "error"),
    [({"filter": "a/#/b"}, "'#' must be the last level"),
     ({"filter": "a/b+"}, "'+' must fill a level"),
     ({"filter": ""}, "non-empty"),
     ({"source": "../etc"}, "invalid source name"),
     ({"pattern": "^(?P<x>"}, "not a valid regex"),
     ({"fields": {"device_id": "{nope}"}}, "group 'nope' is not captured"),
     ({"mac_groups": ("nope",)}, "group 'nope' is not captured"),
     ({"allowed": {"nope": ("a",)}}, "group 'nope' is not captured")],
)  # fmt: skip
def test_invalid_topic_patterns_are_refused(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        TopicPattern.model_validate({**DEVICE_PATTERN.model_dump(), **changes})


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [("+/+/+/+/+", TOPIC, True), ("+/+/+/+/+", "a/b/c/d", False), ("tele/#", TOPIC, True),
     ("#", "$SYS/broker/uptime", False), ("$SYS/#", "$SYS/broker/uptime", True),
     ("$share/grp/tele/+/+/+/+", TOPIC, True), ("a/+", "a/", True), ("a/#", "a", True)],
)  # fmt: skip
def test_topic_filter_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected
    assert topic_matches(topic_filter, topic) == mqtt.topic_matches_sub(
        topic_filter.removeprefix("$share/grp/"), topic
    )


def test_bridge_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="password given without username"):
        MqttBridgeConfig.model_validate({"password": "x"})
    with pytest.raises(ValidationError, match="must be given together"):
        MqttTlsConfig(cert_file=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="is not a readable file"):
        MqttTlsConfig(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValidationError, match="pattern names must be unique"):
        MqttBridgeConfig(patterns=[DEVICE_PATTERN, DEVICE_PATTERN])
    with pytest.raises(ValidationError):
        MqttBridgeConfig.model_validate({"qos": 2})  # QoS 2 cannot defer its acknowledgement
    config = MqttBridgeConfig.model_validate_json(json.dumps({"host": "broker", "port": 8883}))
    assert config.filters == ["+/+/+/+/+"] and config.patterns[0] == DEVICE_PATTERN


def test_reconnect_backoff_is_exponential_jittered_and_capped(tmp_path: Path) -> None:
    config = MqttBridgeConfig(reconnect_min_delay_s=0.5, reconnect_max_delay_s=30)
    bridge = MqttBridge(config, writer_for(tmp_path), LandingLayout(tmp_path))
    for failures, step in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (5000, 30.0)]:
        bridge._failures = failures
        delays = [bridge._backoff_delay() for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays), (failures, delays)
        assert len(set(delays)) > 1  # jittered: bridges restarted together spread out


# -- integration: a real broker -----------------------------------------------------


def bridge_config(broker: MosquittoBroker, **changes: Any) -> MqttBridgeConfig:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": f"bridge-{uuid.uuid4().hex[:8]}",
        "batch_max_messages": 50,
        "batch_max_latency_ms": 100,
        "reconnect_min_delay_s": 0.1,
        "reconnect_max_delay_s": 1.0,
    }
    values.update(changes)
    return MqttBridgeConfig.model_validate(values)


@contextmanager
def running_bridge(
    config: MqttBridgeConfig, writer: LandingWriter, *, wait_subscribed: bool = True
) -> Iterator[MqttBridge]:
    bridge = MqttBridge(config, writer, writer._layout)
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    try:
        if wait_subscribed:
            assert bridge.subscribed.wait(15), "the bridge never subscribed"
        yield bridge
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the bridge did not stop"


def publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]], pace_s: float = 0) -> None:
    """Publish with QoS 1 and wait until the broker acknowledged every message."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(100)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = []
        for topic, payload in messages:
            infos.append(client.publish(topic, payload, qos=1))
            if pace_s:
                time.sleep(pace_s)
        for info in infos:
            info.wait_for_publish(timeout=15)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def reading(i: int) -> tuple[str, bytes]:
    """Message ``i``: a distinct (device, sensor, ts) key and value ``i``."""
    mac = f"AA:BB:CC:00:00:{i % 5:02X}"
    ts = (BASE + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
    return f"tele/f2-{mac}/live/c{i % 3}/temp", json.dumps({"ts": ts, "value": i}).encode()


def landed(data_dir: Path, source: str = "readings") -> pl.DataFrame:
    files = sorted((data_dir / "landing" / source).glob("*.parquet"))
    return (
        pl.concat([pl.read_parquet(f) for f in files], how="diagonal") if files else pl.DataFrame()
    )


def landed_values(data_dir: Path) -> list[int]:
    frame = landed(data_dir)
    return sorted(int(v) for v in frame["value"]) if frame.height else []


def dead_letters(data_dir: Path) -> pl.DataFrame:
    files = sorted((data_dir / "landing" / ".dead_letters").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def writer_for(data_dir: Path) -> LandingWriter:
    return LandingWriter(LandingLayout(data_dir))


def start_bridge_process(
    config: MqttBridgeConfig, data_dir: Path, work: Path, name: str, **env: str
) -> subprocess.Popen[bytes]:
    config_file = work / f"{name}.json"
    config_file.write_text(config.model_dump_json())
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [*LAKEHOUSE, "bridge", "mqtt", "--config", str(config_file)],
        cwd=REPO,
        env=lakehouse_env(data_dir, LAKEHOUSE_LOG_LEVEL="INFO", **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def wait_logged(path: Path, event: str, count: int = 1, timeout: float = 30) -> None:
    wait_until(lambda: path.read_text().count(f'"event": "{event}"') >= count, timeout=timeout)


@needs_mosquitto
def test_published_messages_land_with_exact_records(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    messages = [
        ("tele/f2-AA:BB:CC:DD:EE:01/live/c1/temperature",
         b'{"ts":"2026-11-01T10:00:00Z","value":21.5,"unit":"C","meta":{"fw":"1.2"}}'),
        ("stat/f2-aabbccddee02/status/c2/humidity", b"42"),
        ("cmnd/f2-AA-BB-CC-DD-EE-03/set/relay/state", b"7.25"),
    ]  # fmt: skip
    before = datetime.now(UTC)
    with running_bridge(bridge_config(broker), writer_for(data_dir)) as bridge:
        publish(broker, messages)
        wait_until(lambda: landed(data_dir).height == 3, timeout=15)
        # The acks go out after the landing file is durable: visible a moment earlier.
        wait_until(lambda: bridge.acked == 3, timeout=15)
        assert bridge.acked == 3 and bridge.messages_in == 3 and bridge.dead_letters == 0
    after = datetime.now(UTC)
    frame = landed(data_dir)
    assert set(frame.schema.dtypes()) == {pl.String}  # raw, like every landing file
    rows = {r["mqtt_topic"]: r for r in frame.to_dicts()}
    assert rows[messages[0][0]] == {
        "mqtt_topic": messages[0][0], "device_id": "aa:bb:cc:dd:ee:01",
        "sensor": "c1/temperature", "mqtt_type": "tele", "mqtt_mode": "live",
        "ts": "2026-11-01T10:00:00Z", "value": "21.5", "unit": "C", "meta": '{"fw":"1.2"}',
    }  # fmt: skip
    for (topic, _), device, sensor, kind, mode, value in [
        (messages[1], "aa:bb:cc:dd:ee:02", "c2/humidity", "stat", "status", "42"),
        (messages[2], "aa:bb:cc:dd:ee:03", "relay/state", "cmnd", "set", "7.25"),
    ]:
        row = rows[topic]
        received = datetime.fromisoformat(str(row.pop("ts")))
        assert before <= received <= after
        assert row == {
            "mqtt_topic": topic, "device_id": device, "sensor": sensor, "mqtt_type": kind,
            "mqtt_mode": mode, "value": value, "unit": None, "meta": None,
        }  # fmt: skip


@needs_mosquitto
def test_messages_published_while_the_bridge_is_down_arrive_after_restart(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    config = bridge_config(broker)
    with running_bridge(config, writer_for(data_dir)):
        pass  # creates the persistent session and its subscription, then leaves cleanly
    publish(broker, [reading(i) for i in range(120)])  # more than one batch
    assert landed(data_dir).height == 0
    with capture_logs() as logs, running_bridge(config, writer_for(data_dir)) as bridge:
        wait_until(lambda: landed_values(data_dir) == list(range(120)), timeout=20)
        assert bridge.batches_written >= 3  # batch_max_messages=50
    connected = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected and connected[0]["session_present"] is True


@needs_mosquitto
def test_unwritable_batch_is_not_acknowledged_and_is_redelivered(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    class DiskFullOnce(LandingWriter):
        failed = False

        def write_frame(
            self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
        ) -> LandingReceipt:
            if not self.failed:
                self.failed = True
                raise LandingWriteError(28, "cannot write landing file: No space left on device")
            return super().write_frame(source, frame, batch_id=batch_id)

    writer = DiskFullOnce(LandingLayout(data_dir))
    with running_bridge(bridge_config(broker), writer) as bridge:
        publish(broker, [reading(i) for i in range(30)])
        # Had the failed batch been acknowledged, its messages would be gone for good.
        wait_until(lambda: landed_values(data_dir) == list(range(30)), timeout=20)
        assert bridge.write_failures == 1 and bridge.reconnects >= 1


@needs_mosquitto
def test_stop_flushes_and_acknowledges_the_open_batch(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    # The batch can only close on shutdown: latency and size limits are out of reach.
    config = bridge_config(broker, batch_max_latency_ms=600_000, batch_max_messages=10_000)
    with running_bridge(config, writer_for(data_dir)) as bridge:
        publish(broker, [reading(i) for i in range(10)])
        wait_until(lambda: bridge.messages_in == 10, timeout=10)
        assert landed(data_dir).height == 0 and bridge.acked == 0  # held, unacknowledged
    assert bridge.acked == 10
    assert landed_values(data_dir) == list(range(10))
    assert len(list((data_dir / "landing" / "readings").glob("*.parquet"))) == 1
    # Acknowledged before DISCONNECT: the session holds nothing to redeliver.
    quick = config.model_copy(update={"batch_max_latency_ms": 50})
    with running_bridge(quick, writer_for(data_dir)) as again:
        time.sleep(0.5)
        assert again.messages_in == 0
    assert landed_values(data_dir) == list(range(10))


@needs_mosquitto
def test_sigterm_ends_the_bridge_process_cleanly_without_loss_or_duplicates(
    broker: MosquittoBroker, data_dir: Path, tmp_path: Path
) -> None:
    config = bridge_config(broker, batch_max_latency_ms=600_000, batch_max_messages=10_000)
    proc = start_bridge_process(config, data_dir, tmp_path, "term")
    try:
        wait_logged(tmp_path / "term.log", "mqtt.subscribed")
        publish(broker, [reading(i) for i in range(10)])
        time.sleep(0.5)  # (normally) delivered by now, waiting in the open batch
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = json.loads((tmp_path / "term.log").read_text().strip().splitlines()[-1])
    assert stopped["event"] == "mqtt.bridge_stopped"
    # Whatever it had received was landed and acknowledged before it left...
    assert stopped["acked"] == stopped["records_landed"] == stopped["messages_in"]
    assert landed(data_dir).height == stopped["messages_in"]
    # ... so a restart brings exactly the rest: no duplicates, nothing lost.
    quick = config.model_copy(update={"batch_max_latency_ms": 50})
    with running_bridge(quick, writer_for(data_dir)):
        wait_until(lambda: len(landed_values(data_dir)) >= 10, timeout=10)
        time.sleep(0.3)
    assert landed_values(data_dir) == list(range(10))


@needs_mosquitto
def test_sigkill_mid_stream_loses_nothing_and_silver_counts_each_reading_once(
    broker: MosquittoBroker, data_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    total = 600
    # The first bridge closes batches by count only, so at the kill its open batch holds
    # received but unacknowledged messages; the second one also closes them by latency.
    config = bridge_config(broker, batch_max_messages=40, batch_max_latency_ms=150)
    proc = start_bridge_process(
        config.model_copy(update={"batch_max_latency_ms": 600_000}), data_dir, tmp_path, "first"
    )
    wait_logged(tmp_path / "first.log", "mqtt.subscribed")
    publisher = threading.Thread(
        target=publish, args=(broker, [reading(i) for i in range(total)], 0.004)
    )
    publisher.start()
    try:
        wait_until(lambda: landed(data_dir).height >= 120, timeout=20)
        time.sleep(0.06)  # ~15 messages into the next batch
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert publisher.is_alive(), "the stream should still be running at the kill"
        time.sleep(0.3)  # messages keep arriving at the broker for the offline session
        proc = start_bridge_process(config, data_dir, tmp_path, "second")
        publisher.join(timeout=30)
        wait_until(lambda: set(landed_values(data_dir)) == set(range(total)), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        publisher.join(timeout=30)
    stopped = json.loads((tmp_path / "second.log").read_text().strip().splitlines()[-1])
    assert stopped["event"] == "mqtt.bridge_stopped"
    assert stopped["redelivered"] >= 1  # the killed bridge's open batch came back
    # Every message exactly once, even in the landing zone: copies of a landed batch whose
    # PUBACKs the killed bridge had not sent (or the broker had not read) are recognised.
    assert landed_values(data_dir) == list(range(total))
    assert stopped["skipped_redeliveries"] <= stopped["redelivered"]
    Processor(settings, load_contracts()).run_once()
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert silver.height == total  # ... and exactly once in silver
    assert sorted(silver["value"].to_list()) == [float(i) for i in range(total)]
    assert silver.select("device_id", "sensor", "ts").n_unique() == total


@needs_mosquitto
def test_broker_restart_mid_stream_is_survived(broker: MosquittoBroker, data_dir: Path) -> None:
    # A long latency keeps the first messages in the bridge's open (unacknowledged) batch
    # when the broker goes down: only the broker's persisted session can bring them back.
    # After the restart the 100 redelivered and 100 new messages close one batch by count.
    config = bridge_config(broker, batch_max_latency_ms=10_000, batch_max_messages=200)
    with running_bridge(config, writer_for(data_dir)) as bridge:
        publish(broker, [reading(i) for i in range(100)])
        wait_until(lambda: bridge.messages_in == 100, timeout=10)
        broker.restart()
        assert landed(data_dir).height == 0, "the batch was flushed before the restart"
        wait_until(lambda: bridge.reconnects >= 1 and bridge.connected, timeout=20)
        publish(broker, [reading(i) for i in range(100, 200)])
        wait_until(lambda: set(landed_values(data_dir)) == set(range(200)), timeout=20)
    assert bridge.messages_in >= 300 and bridge.redelivered >= 100  # the first 100 came back


@needs_mosquitto
def test_malformed_messages_go_to_dead_letters_with_bytes_and_error(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    good = reading(1)
    bad = [
        ("tele/f2-AABBCCDDEEGG/live/c1/temp", b"1", "invalid MAC address 'AABBCCDDEEGG'"),
        ("info/f2-aabbccddeeff/live/c1/temp", b"1", "type 'info' is not one of"),
        ("tele/no-mac/live/c1/temp", b"1", "does not match pattern 'device'"),
        ("tele/f2-aabbccddeeff/live/c1/temp", b"\xff\x00\x80", "payload is not valid UTF-8"),
        ("tele/f2-aabbccddeeff/live/c1/temp", b"[1,2]", "payload is a JSON array"),
        ("tele/f2-aabbccddeeff/live/c1/temp", b'{"value": NaN}', "NaN is not a finite number"),
        ("tele/f2-aabbccddeeff/live/c1/temp", b"hot", "payload is neither JSON nor a number"),
        ("tele/f2-aabbccddeeff/live/c1/temp", b"", "empty payload"),
    ]
    before = datetime.now(UTC)
    with running_bridge(bridge_config(broker), writer_for(data_dir)) as bridge:
        publish(broker, [good] + [(t, p) for t, p, _ in bad])
        wait_until(lambda: dead_letters(data_dir).height == len(bad), timeout=15)
        wait_until(lambda: landed(data_dir).height == 1, timeout=15)
        wait_until(lambda: bridge.acked == len(bad) + 1, timeout=15)  # after the files
        assert bridge.dead_letters == len(bad) and bridge.acked == len(bad) + 1
    letters = dead_letters(data_dir)
    assert letters.columns == ["origin", "topic", "payload_base64", "error", "received_at"]
    rows = letters.to_dicts()
    for (topic, payload, reason), row in zip(bad, rows, strict=True):  # arrival order kept
        assert row["origin"] == "mqtt" and row["topic"] == topic
        assert base64.b64decode(row["payload_base64"]) == payload
        assert reason in row["error"] and repr(topic) in row["error"]
        assert datetime.fromisoformat(row["received_at"]) >= before
    assert landed_values(data_dir) == [1]


@needs_mosquitto
def test_mutual_tls_trusted_certificate_delivers_untrusted_is_refused(
    broker: MosquittoBroker, data_dir: Path, tmp_path: Path
) -> None:
    tls = broker.tls
    trusted = MqttTlsConfig(ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    config = bridge_config(broker, port=broker.tls_port, tls=trusted)
    with running_bridge(config, writer_for(data_dir)) as bridge:
        assert bridge.connected
        publish(broker, [reading(i) for i in range(5)])
        wait_until(lambda: landed_values(data_dir) == list(range(5)), timeout=15)

    untrusted = trusted.model_copy(update={"cert_file": tls.untrusted_cert,
                                           "key_file": tls.untrusted_key})  # fmt: skip
    config = bridge_config(broker, port=broker.tls_port, tls=untrusted)
    other_dir = tmp_path / "other"
    with capture_logs() as logs, running_bridge(config, writer_for(other_dir),
                                                wait_subscribed=False) as bridge:  # fmt: skip
        wait_until(lambda: [e for e in logs if e["event"] == "mqtt.tls_failed"], timeout=15)
        assert not bridge.connected and bridge.connect_failures >= 1
    failure = next(e for e in logs if e["event"] == "mqtt.tls_failed")
    assert failure["log_level"] == "error"
    assert failure["error"].startswith("TLS handshake failed: ")
    # TLS 1.3: the broker's refusal reaches us as its alert or, racing it, as a bare EOF.
    assert "alert unknown ca" in failure["error"] or "EOF occurred" in failure["error"]
    assert "rejected or missed the client certificate" in failure["error"]
    assert not other_dir.exists() or not list(other_dir.rglob("*.parquet"))

    # Without any client certificate the mTLS listener refuses too.
    anonymous = MqttTlsConfig(ca_file=tls.ca)
    config = bridge_config(broker, port=broker.tls_port, tls=anonymous)
    with capture_logs() as logs, running_bridge(config, writer_for(other_dir),
                                                wait_subscribed=False):  # fmt: skip
        wait_until(lambda: [e for e in logs if e["event"] == "mqtt.tls_failed"], timeout=15)


@needs_mosquitto
def test_username_password_accepted_and_wrong_password_refused_clearly(
    broker: MosquittoBroker, data_dir: Path
) -> None:
    good = bridge_config(broker, port=broker.password_port, username=BROKER_USER,
                         password=BROKER_PASSWORD)  # fmt: skip
    with running_bridge(good, writer_for(data_dir)) as bridge:
        assert bridge.connected
    bad = bridge_config(broker, port=broker.password_port, username=BROKER_USER,
                        password="wrong")  # fmt: skip
    with capture_logs() as logs, running_bridge(bad, writer_for(data_dir),
                                                wait_subscribed=False) as bridge:  # fmt: skip
        wait_until(lambda: len([e for e in logs if e["event"] == "mqtt.connection_refused"]) >= 2,
                   timeout=15)  # fmt: skip
        assert not bridge.connected
    refused = next(e for e in logs if e["event"] == "mqtt.connection_refused")
    assert refused["error"] == "mqtt connection refused: not authorized"
    assert refused["log_level"] == "error"
