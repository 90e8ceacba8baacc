"""Bulk mapping of MQTT batches (landing_zone/mqtt_batch.py) and the bridge's landing thread.

The batch path must map every message exactly as the per-message reference
(``map_message``, ``checked_payload_fields``) does; these tests compare the two on
hand-picked and generated messages, then check the bridge's pipelined landing:
acknowledgements wait for the landing file, and batches of a lost or failed
connection are never landed.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landing_zone.formats import raw_frame
from landing_zone.layout import LandingLayout
from landing_zone.mqtt_batch import Received, TopicMapper, map_batch
from landing_zone.mqtt_bridge import MqttBridge, MqttBridgeConfig
from landing_zone.mqtt_topics import (
    DEVICE_PATTERN,
    MessageRejected,
    TopicPattern,
    checked_payload_fields,
    map_message,
    plain_object_fields,
)
from landing_zone.writer import LandingReceipt, LandingWriteError, LandingWriter
from tests.helpers import wait_until
from tests.mqtt_broker import MOSQUITTO, MosquittoBroker
from tests.test_mqtt_bridge import landed_values, publish, reading

RECEIVED_AT = 1_795_000_000.25  # epoch seconds
RECEIVED = datetime.fromtimestamp(RECEIVED_AT, UTC)
TOPIC = "tele/f2-aabbccddeeff/live/c1/temp"
METERS = TopicPattern(
    name="meters", filter="site/+/meter", pattern="site/{site}/meter", source="meters",
    fields={"site": "{site}"}, value_field="kwh",
)  # fmt: skip


def received(topic: str | bytes, payload: bytes, mid: int = 1) -> Received:
    raw = topic.encode() if isinstance(topic, str) else topic
    return (mid, 1, raw, payload, RECEIVED_AT)  # with wall_offset=0: received at RECEIVED


# -- the payload fast path ------------------------------------------------------------

FAST_CASES = [
    b'{"ts": "2026-11-01T10:00:00Z", "value": 21.5}',
    b'{"value": 1e3, "n": -0, "big": 123456789012345678901234567890, "f": 0.1}',
    b'{"ok": true, "no": false, "none": null, "s": "\\u00e9t\xc3\xa9"}',
    b'{"meta": {"fw": [1, 2.50, {"a": null}]}, "list": []}',
    b'{"a": 1, "a": 2, "b": {"c": 1, "c": 2}}',  # repeated keys: the first wins
    b'{"e": "\xf0\x9f\x98\x80", "x": 1}  \n',
]
CHECKED_ONLY = [
    b'{"a": "\\ud800"}',  # lone surrogate escape
    b'{"e": "\\ud83d\\ude00"}',  # any surrogate escape, even a valid pair
    b'{"v": NaN}',
    b'{"v": 1e999}',
    b'{"v": [1e999]}',
    b'{"v": "\xc3"}',  # not UTF-8
    b"{bad",
    b'{"a": 1} trailing',
    b' {"a": 1}',  # leading whitespace: the fast path leaves it to the checked one
    b"21.5",
    b"[1, 2]",
]


@pytest.mark.parametrize("payload", FAST_CASES)
def test_fast_path_takes_plain_objects_and_agrees_with_the_checked_path(payload: bytes) -> None:
    fields = plain_object_fields(payload)
    assert fields is not None
    assert fields == checked_payload_fields(TOPIC, payload)
    assert list(fields) == list(checked_payload_fields(TOPIC, payload))  # same column order


@pytest.mark.parametrize("payload", CHECKED_ONLY)
def test_fast_path_leaves_everything_unusual_to_the_checked_path(payload: bytes) -> None:
    assert plain_object_fields(payload) is None


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.text(st.characters(codec=None, categories=["Cs", "Ll"]), max_size=3),  # surrogates
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(st.text(max_size=5), json_values), max_size=6),
    reading=st.one_of(st.floats(allow_nan=False), st.integers(), st.decimals(places=4)),
    spacing=st.sampled_from([(",", ":"), (", ", ": ")]),
    ascii_only=st.booleans(),
    trailing=st.sampled_from(["", " ", "\n"]),
)
def test_fast_and_checked_paths_agree_on_any_json_object(
    pairs: list[tuple[str, object]],
    reading: object,
    spacing: tuple[str, str],
    ascii_only: bool,
    trailing: str,
) -> None:
    # Built by hand so that keys may repeat, as devices sometimes send them, and numbers
    # keep any spelling (1E+2, 0.5000, -0) a device may print.
    comma, colon = spacing
    members = [f'"value"{colon}{reading}'] + [
        json.dumps(k, ensure_ascii=ascii_only) + colon + json.dumps(v, ensure_ascii=ascii_only)
        for k, v in pairs
    ]
    text = "{" + comma.join(members) + "}" + trailing
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError:
        return  # a raw lone surrogate: no MQTT payload can carry it
    fast = plain_object_fields(payload)
    try:
        checked = checked_payload_fields(TOPIC, payload)
    except MessageRejected:
        assert fast is None
        return
    if fast is not None:
        assert fast == checked and list(fast) == list(checked)


# -- map_batch against map_message ----------------------------------------------------


def test_a_batch_maps_like_each_message_alone_with_poison_as_dead_letters() -> None:
    patterns = [METERS, DEVICE_PATTERN]
    messages = [
        received(TOPIC, b'{"value": 1, "unit": "C"}', 1),
        received("site/lyon/meter", b"12.5", 2),
        received("tele/f2-xx/live/c1/temp", b"1", 3),  # bad MAC
        received(TOPIC, b'{"device_id": "other", "value": 2}', 4),  # kept beside as payload_*
        received(TOPIC, b"[1]", 5),
        received(b"tele/f2-aabbccddeeff/live/c1/\xff", b"1", 6),  # topic not UTF-8
        received("a/b", b"1", 7),  # no filter matches
        received(TOPIC, b'{"value": 3, "ts": null}', 8),
        received(TOPIC, b'{"value": 4, "device_id": "x", "payload_device_id": "y"}', 9),
    ]
    mapper = TopicMapper(patterns)
    batch = map_batch(messages, mapper, wall_offset=0.0)

    expected: dict[str, list[dict[str, str | None]]] = {}
    expected_letters = []
    for _, _, raw, payload, _ in messages:
        try:
            topic = raw.decode("utf-8")
        except UnicodeDecodeError:
            topic = raw.decode("utf-8", errors="backslashreplace")
            expected_letters.append((topic, payload, f"topic {topic!r} is not valid UTF-8"))
            continue
        try:
            source, record = map_message(topic, payload, RECEIVED, patterns)
        except MessageRejected as exc:
            expected_letters.append((topic, payload, exc.reason))
            continue
        expected.setdefault(source, []).append(record)

    assert {s: b.records for s, b in batch.sources.items()} == expected
    assert list(batch.sources) == ["readings", "meters"]  # in order of first arrival
    assert [
        (row["topic"], base64.b64decode(row["payload_base64"]), row["error"])
        for row in batch.dead_letters
    ] == expected_letters
    assert {row["received_at"] for row in batch.dead_letters} == {"2026-11-18T11:06:40.250000Z"}
    assert all(row["origin"] == "mqtt" for row in batch.dead_letters)
    # An unwritable source can be set aside whole, each message with its own bytes.
    letters = batch.sources["meters"].dead_letters("disk says no")
    assert [(r["topic"], r["payload_base64"], r["error"]) for r in letters] == [
        ("site/lyon/meter", base64.b64encode(b"12.5").decode(), "disk says no")
    ]


def test_receive_time_fills_a_missing_timestamp_from_the_monotonic_clock() -> None:
    now = time.monotonic()
    before = datetime.now(UTC)
    batch = map_batch([(1, 1, TOPIC.encode(), b"7", now)], TopicMapper([DEVICE_PATTERN]))
    after = datetime.now(UTC)
    stamp = datetime.fromisoformat(str(batch.sources["readings"].records[0]["ts"]))
    assert before.timestamp() - 0.01 <= stamp.timestamp() <= after.timestamp() + 0.01


def test_topic_mapper_remembers_mappings_and_rejections_within_its_bound() -> None:
    mapper = TopicMapper([DEVICE_PATTERN], max_topics=2)
    first = mapper.map(TOPIC.encode())
    assert mapper.map(TOPIC.encode()) is first  # memoised
    assert first.match is not None and first.match.fields["device_id"] == "aa:bb:cc:dd:ee:ff"
    bad = mapper.map(b"info/f2-aabbccddeeff/live/c1/t")
    assert bad.match is None and "'info' is not one of" in str(bad.rejection)
    mapper.map(b"tele/f2-aabbccddee01/live/c1/t")  # a third topic: the memo starts over
    assert len(mapper._memo) <= 2
    assert mapper.map(TOPIC.encode()) == first  # and maps the same again


def test_records_frame_is_all_string_in_order_of_first_appearance() -> None:
    rows: list[dict[str, str | None]] = [
        {"a": "1", "b": None},
        {"b": "2", "a": "3"},
        {"c": "4"},
        {"a": None, "b": None},
    ]
    frame = raw_frame(rows)
    assert frame.columns == ["a", "b", "c"]
    assert frame.schema == {"a": pl.String, "b": pl.String, "c": pl.String}
    assert frame.rows() == [("1", None, None), ("3", "2", None), (None, None, "4"),
                            (None, None, None)]  # fmt: skip


# -- the bridge's landing thread --------------------------------------------------------


def bridge_for(tmp_path: Path, writer: LandingWriter | None = None) -> MqttBridge:
    writer = writer or LandingWriter(LandingLayout(tmp_path))
    return MqttBridge(MqttBridgeConfig(), writer, LandingLayout(tmp_path))


def test_a_batch_of_a_lost_connection_is_not_landed(tmp_path: Path) -> None:
    bridge = bridge_for(tmp_path)
    batch = [received(TOPIC, b"1")]
    bridge._discard_pending("connection lost")  # what losing the link does
    assert bridge._land(batch, connection=0) is False
    assert bridge.records_landed == 0 and not (tmp_path / "landing").exists()
    assert bridge._land(batch, connection=bridge._connection) is True
    assert bridge.records_landed == 1


def test_after_a_failed_write_no_later_batch_of_that_connection_lands(tmp_path: Path) -> None:
    class FullDisk(LandingWriter):
        def write_frame(
            self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
        ) -> LandingReceipt:
            raise LandingWriteError(28, "No space left on device")

    bridge = bridge_for(tmp_path, FullDisk(LandingLayout(tmp_path)))
    assert bridge._land([received(TOPIC, b"1")], connection=0) is False
    bridge._writer = LandingWriter(LandingLayout(tmp_path))  # the disk has room again
    assert bridge._land([received(TOPIC, b"2")], connection=0) is False  # acks go in order
    assert bridge.write_failures == 1 and bridge.records_landed == 0


@pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")
def test_messages_keep_arriving_while_a_batch_lands_and_acks_wait_for_it(tmp_path: Path) -> None:
    class HeldDisk(LandingWriter):
        """Every landing file waits until the test releases the disk."""

        def __init__(self, layout: LandingLayout) -> None:
            super().__init__(layout)
            self.release = threading.Event()
            self.writing = threading.Event()

        def write_frame(
            self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
        ) -> LandingReceipt:
            self.writing.set()
            assert self.release.wait(20)
            return super().write_frame(source, frame, batch_id=batch_id)

    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        data = tmp_path / "data"
        writer = HeldDisk(LandingLayout(data))
        config = MqttBridgeConfig(
            host=broker.host, port=broker.port, client_id=f"held-{uuid.uuid4().hex[:8]}",
            batch_max_messages=20, batch_max_latency_ms=100,
        )  # fmt: skip
        bridge = MqttBridge(config, writer, LandingLayout(data))
        stop = threading.Event()
        thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert bridge.subscribed.wait(15)
            publish(broker, [reading(i) for i in range(30)])
            assert writer.writing.wait(10)
            # The network thread keeps receiving the next batch meanwhile...
            wait_until(lambda: bridge.messages_in == 30, timeout=10)
            # ... and acknowledges nothing that is not durable yet.
            time.sleep(0.2)
            assert bridge.acked == 0 and bridge.records_landed == 0
            writer.release.set()
            wait_until(lambda: bridge.acked == 30, timeout=10)
            assert landed_values(data) == list(range(30))
        finally:
            writer.release.set()
            stop.set()
            thread.join(15)
        assert not thread.is_alive()
    finally:
        broker.stop()
