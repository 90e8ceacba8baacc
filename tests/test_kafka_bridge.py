"""Kafka bridge against a real Kafka-protocol broker (tansu, see tests/kafka_broker.py).

The bridge is at-least-once into landing: a crash between a durable landing
file and its offset commit re-delivers that batch, so landing may hold a
message twice. Bronze turns that into exactly once: it drops records whose
(kafka_topic, kafka_partition, kafka_offset) it already holds, recording the
highest offset per partition in the same Delta commit as the rows
(tests/test_stream_landing.py covers that side).
"""

from __future__ import annotations

import base64
import errno
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from confluent_kafka import KafkaException, Message
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from landing_zone import kafka_bridge
from landing_zone.bridge_metrics import BridgeCollector
from landing_zone.kafka_batch import MessageColumns, PreparedBatch, prepare_batch
from landing_zone.kafka_bridge import (
    KAFKA_LINEAGE_COLUMNS,
    KafkaBridge,
    KafkaBridgeConfig,
    default_source_name,
)
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingReceipt, LandingWriteError, LandingWriter
from tests.helpers import wait_until
from tests.kafka_broker import (
    FAST_GROUP,
    TansuBroker,
    dead_letters,
    landed,
    start_bridge_process,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    server = TansuBroker(tmp_path_factory.mktemp("tansu"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(broker: TansuBroker, group: str, **fields: object) -> KafkaBridgeConfig:
    values: dict[str, object] = {
        "bootstrap_servers": broker.bootstrap,
        "group_id": group,
        "batch_max_latency_ms": 100,
        "backlog_check_interval_ms": 50,
        "kafka_options": FAST_GROUP,
    }
    values.update(fields)
    return KafkaBridgeConfig.model_validate(values)


@contextmanager
def running(
    config: KafkaBridgeConfig,
    data_dir: Path,
    backlog: Callable[[], int] = lambda: 0,
    writer: LandingWriter | None = None,
) -> Iterator[KafkaBridge]:
    """A bridge consuming in a thread; on exit it is stopped and must end cleanly."""
    writer = writer or LandingWriter(LandingLayout(data_dir))
    bridge = KafkaBridge(config, writer, backlog)
    stop = threading.Event()
    failures: list[BaseException] = []

    def target() -> None:
        try:
            bridge.run(stop)
        except BaseException as exc:  # surfaced in the test thread
            failures.append(exc)

    thread = threading.Thread(target=target, name="kafka-bridge", daemon=True)
    thread.start()
    try:
        yield bridge
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "bridge did not stop"
    assert not failures, failures


def _count(data_dir: Path, source: str) -> int:
    return landed(data_dir, source).height


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------- config


def test_config_rules() -> None:
    assert default_source_name("Dev.Readings-1") == "dev_readings_1"
    assert default_source_name("1st") is None and default_source_name("_x") is None
    base = {"bootstrap_servers": "127.0.0.1:9092"}
    config = KafkaBridgeConfig.model_validate(
        {**base, "topics": ["a.b"], "sources": {"x": "readings"}}
    )
    assert config.source_for("x") == "readings" and config.source_for("a.b") == "a_b"
    assert repr(config).count("kafka_options") == 0  # secrets stay out of logs
    bad = [
        {**base},  # no subscription
        {**base, "topics": ["a"], "topic_regex": "^a"},  # both
        {**base, "topic_regex": "a.*"},  # not anchored
        {**base, "topics": ["^a.*"]},  # a pattern in topics
        {**base, "topics": ["a"], "sources": {"a": "Bad-Name"}},
        {**base, "topics": ["a"], "kafka_options": {"enable.auto.commit": True}},
        {**base, "topics": ["a"], "kafka_options": {"group.id": "x"}},
    ]
    for values in bad:
        with pytest.raises(ValidationError):
            KafkaBridgeConfig.model_validate(values)


def test_security_options_reach_librdkafka(tmp_path: Path) -> None:
    sasl = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bridge",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }
    config = KafkaBridgeConfig(bootstrap_servers="127.0.0.1:1", topics=["t"], kafka_options=sasl)
    bridge = KafkaBridge(config, LandingWriter(LandingLayout(tmp_path)), lambda: 0)
    conf = bridge.librdkafka_config()
    assert {k: conf[k] for k in sasl} == sasl
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    # librdkafka itself validates what it is handed: a bogus mechanism fails at start.
    broken = KafkaBridgeConfig(
        bootstrap_servers="127.0.0.1:1",
        topics=["t"],
        kafka_options={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "BOGUS"},
    )
    bogus = KafkaBridge(broken, LandingWriter(LandingLayout(tmp_path)), lambda: 0)
    with pytest.raises(KafkaException, match="Unsupported SASL mechanism: BOGUS"):
        bogus.run(threading.Event())


# ---------------------------------------------------------------- (a) records


def test_json_messages_land_with_exact_records_and_lineage(
    broker: TansuBroker, data_dir: Path
) -> None:
    broker.create_topic("dev.Readings-1", partitions=2)
    broker.create_topic("plant", partitions=1)
    stamp = 1_795_000_000_123
    messages: list[dict[str, object]] = [
        {
            "value": json.dumps(
                {"device": f"d{i}", "value": i * 1.5, "ok": i % 2 == 0, "tags": {"room": i}}
            ).encode(),
            "key": f"d{i}".encode(),
            "partition": i % 2,
            "timestamp": stamp + i,
            "headers": [("trace", f"t{i}".encode()), ("hop", b"a"), ("hop", b"b")],
        }
        for i in range(6)
    ]
    messages.append(  # binary key and header, a payload field named like a lineage column
        {
            "value": b'{"device":"bin","kafka_offset":"mine"}',
            "key": b"\xff\x00",
            "partition": 0,
            "timestamp": stamp + 99,
            "headers": [("raw", b"\xfe"), ("none", None)],
        }
    )
    positions = broker.produce("dev.Readings-1", messages)
    plant_positions = broker.produce(
        "plant", [{"value": b'{\n  "device": "p1",\n  "value": 7\n}', "timestamp": stamp}]
    )

    config = _config(
        broker, "g-records", topics=["dev.Readings-1", "plant"], sources={"plant": "readings_k"}
    )
    with running(config, data_dir) as bridge:
        wait_until(lambda: _count(data_dir, "dev_readings_1") == 7, timeout=30)
        wait_until(lambda: _count(data_dir, "readings_k") == 1, timeout=30)

    frame = landed(data_dir, "dev_readings_1")
    assert set(frame.schema.values()) == {frame.schema["device"]}  # all strings
    assert set(KAFKA_LINEAGE_COLUMNS) <= set(frame.columns)
    rows = {(r["kafka_partition"], r["kafka_offset"]): r for r in frame.iter_rows(named=True)}
    assert len(rows) == 7  # each message exactly once (clean run, no crash)
    for i, (partition, offset) in enumerate(positions[:6]):
        row = rows[(str(partition), str(offset))]
        assert row["device"] == f"d{i}"
        assert row["value"] == json.dumps(i * 1.5)
        assert row["ok"] == ("true" if i % 2 == 0 else "false")
        assert json.loads(row["tags"]) == {"room": i}
        assert row["kafka_topic"] == "dev.Readings-1"
        assert row["kafka_key"] == f"d{i}" and row["kafka_key_base64"] == "false"
        assert row["kafka_timestamp"] == _iso(stamp + i)
        assert json.loads(row["kafka_headers"]) == {"trace": f"t{i}", "hop": ["a", "b"]}
    odd = rows[tuple(map(str, positions[6]))]  # type: ignore[index]
    assert odd["kafka_key"] == base64.b64encode(b"\xff\x00").decode()
    assert odd["kafka_key_base64"] == "true"
    assert odd["payload_kafka_offset"] == "mine"
    assert odd["kafka_offset"] == str(positions[6][1])
    assert json.loads(odd["kafka_headers"]) == {"raw": {"base64": "/g=="}, "none": None}

    plant = landed(data_dir, "readings_k").row(0, named=True)
    assert (plant["device"], plant["value"], plant["kafka_key"]) == ("p1", "7", None)
    assert plant["kafka_offset"] == str(plant_positions[0][1])
    assert plant["kafka_headers"] == "{}"

    # Committed: exactly the consumed positions, offset + 1 per partition.
    expected = {p: max(o for pp, o in positions if pp == p) + 1 for p in (0, 1)}
    assert broker.committed("g-records", "dev.Readings-1", 2) == expected
    assert bridge.commits >= 1 and bridge.messages_in == 8
    assert broker.committed("g-records", "plant", 1) == {0: plant_positions[0][1] + 1}


def test_raw_payloads_keep_their_bytes(broker: TansuBroker, data_dir: Path) -> None:
    broker.create_topic("rawbytes")
    values = [b"plain text", b"\x00\xff binary", None]
    broker.produce("rawbytes", [{"value": v} for v in values])
    config = _config(broker, "g-raw", topics=["rawbytes"], payload_format="raw")
    with running(config, data_dir):
        wait_until(lambda: _count(data_dir, "rawbytes") == 3, timeout=30)
    frame = landed(data_dir, "rawbytes").sort(pl_offset())
    assert frame["payload_base64"].to_list() == [
        base64.b64encode(b"plain text").decode(),
        base64.b64encode(b"\x00\xff binary").decode(),
        None,
    ]
    assert frame["payload_text"].to_list() == ["plain text", None, None]


def pl_offset() -> pl.Expr:
    return pl.col("kafka_offset").cast(pl.Int64)


# ------------------------------------------------------- (b) crash before commit


def test_sigkill_between_landing_and_commit_loses_nothing(
    broker: TansuBroker, data_dir: Path, tmp_path: Path
) -> None:
    broker.create_topic("crash", partitions=2)
    total = 600
    positions = broker.produce(
        "crash",
        [{"value": json.dumps({"n": n}).encode(), "partition": n % 2} for n in range(total)],
    )
    config = _config(broker, "g-crash", topics=["crash"], batch_max_messages=25).model_dump()

    # 1. The bridge kills itself right after its 3rd landing file is durable: that
    #    batch is landed but its offsets are not committed.
    first = start_bridge_process(config, data_dir, tmp_path / "b1.log", crash_after_writes=3)
    assert first.wait(timeout=60) == -signal.SIGKILL
    files = sorted((data_dir / "landing" / "crash").glob("*.parquet"))
    assert len(files) == 3
    committed = broker.committed("g-crash", "crash", 2)
    in_first_two = pl.concat([pl.read_parquet(f) for f in files[:2]])
    expected = {
        int(p): int(o) + 1
        for p, o in in_first_two.group_by("kafka_partition")
        .agg(pl.col("kafka_offset").cast(pl.Int64).max())
        .iter_rows()
    }
    # Commits follow landing: exactly what the first two files hold is committed.
    assert {p: o for p, o in committed.items() if o >= 0} == expected

    # 2. Killed from outside at an arbitrary moment while it works.
    second = start_bridge_process(config, data_dir, tmp_path / "b2.log", write_delay_s=0.05)
    wait_until(lambda: len(list((data_dir / "landing" / "crash").glob("*.parquet"))) >= 8, 60)
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=10)

    # 3. A clean run finishes the topic, then stops gracefully (flush, commit, close).
    third = start_bridge_process(config, data_dir, tmp_path / "b3.log")
    try:
        wait_until(
            lambda: (
                landed(data_dir, "crash").select("kafka_partition", "kafka_offset").n_unique()
                == total
            ),
            timeout=60,
        )
        wait_until(
            lambda: broker.committed("g-crash", "crash", 2) == {0: total // 2, 1: total // 2}, 30
        )
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=30) == 0

    frame = landed(data_dir, "crash")
    by_position = {
        (int(p), int(o)): n
        for p, o, n in frame.select("kafka_partition", "kafka_offset", "n").iter_rows()
    }
    # Every produced message is in landing at least once, with its own payload ...
    for n, position in enumerate(positions):
        assert by_position[position] == str(n)
    # ... and some more than once: the batch landed before the first crash was
    # re-delivered. Bronze drops those by (topic, partition, offset): exactly once.
    assert frame.height > total
    assert frame.height - total >= 25

    # Through the processor: bronze holds every message exactly once.
    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor

    report = Processor(load_settings(data_dir=data_dir), load_contracts()).run_once()
    assert report.failures == []
    bronze = pl.read_delta(str(data_dir / "bronze" / "crash"))
    assert bronze.height == total
    assert bronze.select("kafka_partition", "kafka_offset").n_unique() == total
    assert sorted(bronze["n"].cast(pl.Int64).to_list()) == list(range(total))


# --------------------------------------------------------------- (c) poison


def test_poison_messages_become_dead_letters_and_the_stream_goes_on(
    broker: TansuBroker, data_dir: Path
) -> None:
    broker.create_topic("poison")
    values: list[bytes | None] = [
        b'{"a": 1}',
        b'{"a": ',  # truncated JSON
        b"[1, 2]",  # a JSON array
        b"\xff\xfe{}",  # not UTF-8
        b'"text"',
        b"",
        None,  # tombstone
        b'{"a": NaN}',
        b'{"a": 2}',
    ]
    positions = broker.produce("poison", [{"value": v, "key": b"k"} for v in values])
    config = _config(broker, "g-poison", topics=["poison"])
    with running(config, data_dir) as bridge:
        wait_until(lambda: _count(data_dir, "poison") == 2, timeout=30)
        wait_until(lambda: dead_letters(data_dir).height == 7, timeout=10)
        wait_until(lambda: bridge.dead_letters == 7 and bridge.messages_in == 9, timeout=10)

    assert landed(data_dir, "poison")["a"].to_list() == ["1", "2"]
    letters = dead_letters(data_dir).sort(pl_offset())
    assert letters["origin"].unique().to_list() == ["kafka"]
    assert letters["topic"].unique().to_list() == ["poison"]
    assert letters["kafka_offset"].to_list() == [str(o) for _, o in positions[1:8]]
    assert letters["payload_base64"].to_list() == [
        None if v is None else base64.b64encode(v).decode() for v in values[1:8]
    ]
    errors = letters["error"].to_list()
    assert errors[0].startswith("invalid JSON: Expecting value at line 1 column 7")
    assert errors[1] == "expected a JSON object, got an array"
    assert errors[2].startswith("invalid UTF-8 at byte 0")
    assert errors[3] == "expected a JSON object, got a string"
    assert errors[4] == "empty message value, not a JSON object"
    assert errors[5].startswith("message has a null value (tombstone)")
    assert errors[6] == "invalid JSON: NaN is not valid JSON"
    assert all(letters["received_at"].str.ends_with("+00:00"))
    assert broker.committed("g-poison", "poison", 1) == {0: positions[-1][1] + 1}


# --------------------------------------------------------- (d) back-pressure


@pytest.mark.parametrize("strategy", ["range,roundrobin", "cooperative-sticky"])
def test_backlog_pauses_consumption_until_it_drops(
    broker: TansuBroker, data_dir: Path, strategy: str
) -> None:
    topic = f"pressure_{strategy.split(',')[0].replace('-', '_')}"
    broker.create_topic(topic, partitions=2)
    backlog = [10_000]
    options = {**FAST_GROUP, "partition.assignment.strategy": strategy}
    config = _config(
        broker, topic, topics=[topic], max_landing_backlog_files=100, kafka_options=options
    )
    with running(config, data_dir, lambda: backlog[0]) as bridge:
        wait_until(lambda: len(bridge.assignment) == 2 and bridge.is_paused, timeout=30)
        broker.produce(topic, [{"value": b'{"x": %d}' % i} for i in range(20)])
        time.sleep(2.5)  # several fetch rounds and backlog checks
        assert bridge.messages_in == 0 and _count(data_dir, topic) == 0
        assert bridge.paused == 1
        backlog[0] = 100  # at the bound: not behind any more
        wait_until(lambda: _count(data_dir, topic) == 20, timeout=30)
        assert not bridge.is_paused
        backlog[0] = 101  # behind again: paused again
        wait_until(lambda: bridge.paused == 2, timeout=10)
        broker.produce(topic, [{"value": b'{"x": %d}' % i} for i in range(5)])
        time.sleep(1.5)
        assert _count(data_dir, topic) == 20
        backlog[0] = 0
        wait_until(lambda: _count(data_dir, topic) == 25, timeout=30)


class DiskFullWriter(LandingWriter):
    """A landing writer that fails like a full disk while ``full`` is set."""

    def __init__(self, layout: LandingLayout) -> None:
        super().__init__(layout)
        self.full = threading.Event()

    def write_frame(
        self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
    ) -> LandingReceipt:
        if self.full.is_set():
            raise LandingWriteError(errno.ENOSPC, "No space left on device")
        return super().write_frame(source, frame, batch_id=batch_id)


def test_failing_landing_writes_commit_nothing_and_are_retried(
    broker: TansuBroker, data_dir: Path
) -> None:
    broker.create_topic("diskfull")
    broker.produce("diskfull", [{"value": b'{"i": %d}' % i} for i in range(10)])
    writer = DiskFullWriter(LandingLayout(data_dir))
    writer.full.set()
    config = _config(broker, "g-diskfull", topics=["diskfull"])
    with running(config, data_dir, writer=writer) as bridge:
        wait_until(lambda: bridge.write_failures >= 2 and bridge.is_paused, timeout=30)
        broker.produce("diskfull", [{"value": b'{"i": %d}' % i} for i in range(10, 15)])
        time.sleep(1.0)
        assert _count(data_dir, "diskfull") == 0 and bridge.messages_in == 10
        assert broker.committed("g-diskfull", "diskfull", 1) == {0: -1001}  # nothing
        writer.full.clear()  # space again: the held batch lands, then the rest
        wait_until(lambda: _count(data_dir, "diskfull") == 15, timeout=30)
        wait_until(lambda: broker.committed("g-diskfull", "diskfull", 1) == {0: 15}, 10)
        assert not bridge.is_paused
    assert sorted(landed(data_dir, "diskfull")["i"].cast(pl.Int64)) == list(range(15))


def test_a_failing_write_does_not_spin_the_consume_loop(
    broker: TansuBroker, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a write is retried with back-off its batch stays pending (up to 30 s): the
    # loop must wait a whole poll per consume call, not the short one it uses while a
    # batch is being prepared.
    calls: list[float] = []

    class CountingConsumer(kafka_bridge.Consumer):  # type: ignore[misc]
        def consume(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(time.monotonic())
            return super().consume(*args, **kwargs)

    monkeypatch.setattr(kafka_bridge, "Consumer", CountingConsumer)
    broker.create_topic("backoff")
    broker.produce("backoff", [{"value": b'{"i": %d}' % i} for i in range(10)])
    writer = DiskFullWriter(LandingLayout(data_dir))
    writer.full.set()
    config = _config(broker, "g-backoff", topics=["backoff"], poll_timeout_ms=100)
    with running(config, data_dir, writer=writer) as bridge:
        wait_until(lambda: bridge.write_failures >= 1 and bridge.is_paused, timeout=30)
        start = time.monotonic()
        time.sleep(1.0)
        during = sum(1 for t in calls if t >= start)
        assert during <= 20, f"{during} consume calls in 1 s of write back-off"
        writer.full.clear()
        wait_until(lambda: _count(data_dir, "backoff") == 10, timeout=30)


class FlakyWriter(LandingWriter):
    """Fails its ``fail_at``-th write once (full disk), and records what it landed, in order."""

    def __init__(self, layout: LandingLayout, fail_at: int) -> None:
        super().__init__(layout)
        self.fail_at = fail_at
        self.calls = 0
        self.landed: list[pl.DataFrame] = []

    def write_frame(
        self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
    ) -> LandingReceipt:
        self.calls += 1
        if self.calls == self.fail_at:
            raise LandingWriteError(errno.ENOSPC, "No space left on device")
        receipt = super().write_frame(source, frame, batch_id=batch_id)
        self.landed.append(frame)
        return receipt


def test_a_backlog_lands_in_order_through_a_failing_write(
    broker: TansuBroker, data_dir: Path
) -> None:
    # Many small batches of a backlog: while one is landed the next ones are already
    # consumed and being prepared. A write failing in the middle must hold back every
    # later batch until it lands: per partition, files hold ever higher offsets.
    topic = "pipelined"
    broker.create_topic(topic, partitions=2)
    total = 3000
    broker.produce(topic, [{"value": b'{"i": %d}' % i, "partition": i % 2} for i in range(total)])
    writer = FlakyWriter(LandingLayout(data_dir), fail_at=4)
    config = _config(broker, "g-pipelined", topics=[topic], batch_max_messages=100)
    with running(config, data_dir, writer=writer) as bridge:
        wait_until(lambda: _count(data_dir, topic) == total, timeout=60)
        wait_until(
            lambda: broker.committed("g-pipelined", topic, 2) == {0: total // 2, 1: total // 2},
            timeout=10,
        )
        assert bridge.write_failures == 1 and not bridge.is_paused
    frame = landed(data_dir, topic)
    assert frame.height == total  # each exactly once: nothing lost, nothing repeated
    assert sorted(frame["i"].cast(pl.Int64)) == list(range(total))
    last = {"0": -1, "1": -1}
    for batch in writer.landed:
        for partition, offset in batch.select("kafka_partition", "kafka_offset").iter_rows():
            assert int(offset) > last[partition]
            last[partition] = int(offset)


# ------------------------------------------------------ rebalance: revoke path


@pytest.mark.parametrize("strategy", ["range,roundrobin", "cooperative-sticky"])
def test_revoke_lands_and_commits_the_open_batch(
    broker: TansuBroker, data_dir: Path, strategy: str
) -> None:
    topic = group = f"revoke-{strategy.split(',')[0]}"
    broker.create_topic(topic, partitions=2)
    # A batch that only a revoke (or shutdown) closes: huge size and latency bounds.
    slow = {"batch_max_messages": 100_000, "batch_max_latency_ms": 600_000}
    options = {**FAST_GROUP, "partition.assignment.strategy": strategy}
    config = _config(broker, group, topics=[topic], kafka_options=options, **slow)
    with running(config, data_dir) as first:
        wait_until(lambda: len(first.assignment) == 2, timeout=30)
        broker.produce(topic, [{"value": b'{"i": %d}' % i, "partition": i % 2} for i in range(10)])
        wait_until(lambda: first.messages_in == 10, timeout=30)
        assert _count(data_dir, topic.replace("-", "_")) == 0  # still in the open batch
        with running(config, data_dir) as second:  # joins the group: rebalance
            wait_until(lambda: len(first.assignment) == 1 and len(second.assignment) == 1, 30)
            # The revoke landed the batch and committed it before giving partitions away,
            # so the new owner starts after it: nothing is re-delivered.
            assert _count(data_dir, topic.replace("-", "_")) == 10
            assert broker.committed(group, topic, 2) == {0: 5, 1: 5}
            time.sleep(1.0)
            assert second.messages_in == 0
    assert _count(data_dir, topic.replace("-", "_")) == 10


# --------------------------------------------------------- (e) broker restart


def test_broker_restart_is_survived(tmp_path: Path, data_dir: Path) -> None:
    # tansu runs on memory storage: a restart loses topics, messages, groups and
    # committed offsets. What is tested is the bridge reconnecting and carrying on.
    server = TansuBroker(tmp_path / "restart-broker")
    server.start()
    try:
        server.create_topic("survive")
        server.produce("survive", [{"value": b'{"phase": 1, "i": %d}' % i} for i in range(5)])
        config = _config(server, "g-restart", topics=["survive"])
        with running(config, data_dir) as bridge:
            wait_until(lambda: _count(data_dir, "survive") == 5, timeout=30)
            wait_until(lambda: server.committed("g-restart", "survive", 1) == {0: 5}, 30)
            server.restart(kill=True, down_for=2.0)
            server.create_topic("survive")  # maybe already re-created by the bridge's metadata
            server.produce(
                "survive",
                [{"value": b'{"phase": 2, "i": %d}' % i, "partition": 0} for i in range(5)],
            )
            wait_until(lambda: _count(data_dir, "survive") == 10, timeout=60)
            wait_until(lambda: server.committed("g-restart", "survive", 1) == {0: 5}, 30)
            assert bridge.rebalances >= 2  # lost with the broker, assigned again after
        phases = landed(data_dir, "survive")["phase"].to_list()
        assert sorted(phases) == ["1"] * 5 + ["2"] * 5
    finally:
        server.stop()


# ------------------------------------------------------ (f) regex subscription


def test_regex_subscription_picks_up_new_topics(broker: TansuBroker, data_dir: Path) -> None:
    broker.create_topic("rx_first")
    broker.create_topic("not_rx")
    broker.produce("rx_first", [{"value": b'{"t": "first"}'}])
    broker.produce("not_rx", [{"value": b'{"t": "other"}'}])
    config = _config(broker, "g-regex", topic_regex="^rx_.*")
    with running(config, data_dir) as bridge:
        wait_until(lambda: _count(data_dir, "rx_first") == 1, timeout=30)
        broker.create_topic("rx_late")  # created after the bridge started
        broker.produce("rx_late", [{"value": b'{"t": "late"}'}])
        wait_until(lambda: _count(data_dir, "rx_late") >= 1, timeout=30)
        assert ("rx_late", 0) in bridge.assignment
    assert landed(data_dir, "rx_late")["t"].unique().to_list() == ["late"]
    assert not (data_dir / "landing" / "not_rx").exists()


# ------------------------------------------------------------- batch closing


def _landing_files(data_dir: Path, source: str) -> int:
    return len(list((data_dir / "landing" / source).glob("*.parquet")))


def test_a_drained_backlog_lands_at_once_in_one_file_but_a_trickle_waits(
    broker: TansuBroker, data_dir: Path
) -> None:
    topic = "drained"
    broker.create_topic(topic, partitions=1)
    # A real backlog (more full consume calls than the bridge's threshold, 10,000
    # messages), less than a batch.
    total = 12_000
    broker.produce(topic, [{"value": b'{"i": %d}' % i, "partition": 0} for i in range(total)])
    # Only the size or latency bound could close this batch before: neither is reached.
    slow = {"batch_max_messages": 100_000, "batch_max_latency_ms": 600_000}
    config = _config(broker, "g-drained", topics=[topic], **slow)
    with running(config, data_dir) as bridge:
        # Caught up: landed and committed once a poll brings nothing more.
        wait_until(lambda: _count(data_dir, topic) == total, timeout=30)
        wait_until(lambda: broker.committed("g-drained", topic, 1) == {0: total}, timeout=10)
        assert bridge.batches_written == 1 and _landing_files(data_dir, topic) == 1
        # A trickle (no full consume call) still waits for the latency bound.
        broker.produce(topic, [{"value": b'{"i": %d}' % i, "partition": 0} for i in range(3)])
        wait_until(lambda: bridge.messages_in == total + 3, timeout=30)
        time.sleep(1.0)
        assert _count(data_dir, topic) == total
    assert _count(data_dir, topic) == total + 3  # flushed on stop


def test_a_burst_waits_for_the_latency_bound(broker: TansuBroker, data_dir: Path) -> None:
    # 1,500 devices publishing on the minute: a full consume call, then the rest, then
    # nothing. Not a backlog: a latency bound set long to get fewer files must hold.
    topic = "burst"
    broker.create_topic(topic, partitions=1)
    broker.produce(topic, [{"value": b'{"i": %d}' % i, "partition": 0} for i in range(1500)])
    slow = {"batch_max_messages": 100_000, "batch_max_latency_ms": 600_000}
    config = _config(broker, "g-burst", topics=[topic], **slow)
    with running(config, data_dir) as bridge:
        wait_until(lambda: bridge.messages_in == 1500, timeout=30)
        time.sleep(1.0)
        assert _count(data_dir, topic) == 0 and bridge.batches_written == 0
    assert _count(data_dir, topic) == 1500  # flushed on stop
    assert bridge.batches_written == 1


# ------------------------------------------------------------------------ lag


def test_consumer_lag_counts_what_is_not_landed_and_committed(
    broker: TansuBroker, data_dir: Path
) -> None:
    topic = "lagging"
    broker.create_topic(topic, partitions=1)
    config = _config(
        broker,
        "g-lag",
        topics=[topic],
        batch_max_messages=5,
        batch_max_latency_ms=600_000,  # a short batch waits in the buffer, unlanded
        lag_interval_ms=100,
    )
    registry = CollectorRegistry()
    with running(config, data_dir) as bridge:
        registry.register(BridgeCollector({"kafka": bridge.counters}, {"kafka": bridge.lag}))
        wait_until(lambda: bridge.assignment == [(topic, 0)], timeout=30)
        broker.produce(topic, [{"value": b'{"x": %d}' % i, "partition": 0} for i in range(5)])
        wait_until(lambda: _count(data_dir, topic) == 5, timeout=30)  # a full batch: landed
        wait_until(lambda: bridge.lag() == {(topic, 0): 0}, timeout=10)

        broker.produce(topic, [{"value": b'{"x": %d}' % i, "partition": 0} for i in range(3)])
        wait_until(lambda: bridge.messages_in == 8, timeout=30)
        wait_until(lambda: bridge.lag() == {(topic, 0): 3}, timeout=10)
        assert _count(data_dir, topic) == 5  # the 3 are consumed but not landed: still owed
        scrape = generate_latest(registry).decode()
        labels = f'bridge="kafka",partition="0",topic="{topic}"'
        assert f"lakehouse_bridge_consumer_lag_messages{{{labels}}} 3.0" in scrape
    assert _count(data_dir, topic) == 8  # flushed on stop
    assert broker.committed("g-lag", topic, 1) == {0: 8}


def test_lag_is_not_measured_when_switched_off(broker: TansuBroker, data_dir: Path) -> None:
    topic = "unmeasured"
    broker.create_topic(topic, partitions=1)
    config = _config(broker, "g-nolag", topics=[topic], lag_interval_ms=0)
    assert (
        "statistics.interval.ms"
        not in KafkaBridge(
            config, LandingWriter(LandingLayout(data_dir)), lambda: 0
        ).librdkafka_config()
    )
    with running(config, data_dir) as bridge:
        broker.produce(topic, [{"value": b'{"x": 1}', "partition": 0}])
        wait_until(lambda: _count(data_dir, topic) == 1, timeout=30)
        time.sleep(0.5)
        assert bridge.lag() == {}


# ------------------------------------------------------ (h) topic re-created


def _recreate(broker: TansuBroker, topic: str) -> None:
    """Delete ``topic`` and create it again: a new log, offsets from 0, a new topic id."""
    admin = broker.admin()
    for future in admin.delete_topics([topic]).values():
        future.result(timeout=10)
    broker.create_topic(topic)


def _bronze_after_processing(data_dir: Path, source: str) -> pl.DataFrame:
    from config.contracts import load_contracts
    from config.settings import load_settings
    from delta_processing.processor import Processor

    report = Processor(load_settings(data_dir=data_dir), load_contracts()).run_once()
    assert report.failures == []
    return pl.read_delta(str(data_dir / "bronze" / source))


def test_a_topic_created_again_lands_its_new_messages_in_bronze(
    broker: TansuBroker, data_dir: Path
) -> None:
    """Its offsets start again at 0: bronze must not drop them as already held.

    The bridge is stopped while the topic is deleted: librdkafka 2.16 consuming from
    tansu crashes (SIGSEGV in its metadata cache) when a subscribed topic is deleted
    under it. A live bridge meeting a new incarnation is covered by the broker-restart
    reliability test (tansu forgets its topics) and by the test of
    ``_check_incarnations`` below.
    """
    topic = "reborn"
    source = default_source_name(topic)
    assert source is not None
    broker.create_topic(topic)
    group = f"g-{topic}"
    config = _config(broker, group, topics=[topic])
    broker.produce(topic, [{"value": json.dumps({"n": n}).encode()} for n in range(6)])
    with running(config, data_dir):
        wait_until(lambda: _count(data_dir, source) == 6, 30)
        wait_until(lambda: broker.committed(group, topic, 1) == {0: 6}, 30)
    first_bronze = _bronze_after_processing(data_dir, source)  # empties landing
    _recreate(broker, topic)
    broker.produce(topic, [{"value": json.dumps({"n": n}).encode()} for n in (7, 8, 9)])
    with running(config, data_dir):
        wait_until(lambda: _count(data_dir, source) == 3, 60)

    assert first_bronze.height == 6
    bronze = _bronze_after_processing(data_dir, source)
    # Every message of both incarnations, once; the new one's offsets start again at 0.
    assert sorted(bronze["n"].cast(pl.Int64).to_list()) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    ids = bronze.group_by("kafka_topic_id").agg(pl.col("kafka_offset").cast(pl.Int64).sort())
    assert ids.height == 2 and None not in ids["kafka_topic_id"].to_list()
    assert sorted(ids["kafka_offset"].to_list()) == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]


class _StubTopicIds:
    """The cluster's answer about topic ids: a topic re-created while the bridge ran
    cannot be staged with tansu (see above), so the lookup is given here."""

    def __init__(self, ids: dict[str, str | None]) -> None:
        self.ids = ids
        self.asked: list[set[str]] = []

    def describe(self, topics: Iterable[str]) -> dict[str, str | None]:
        wanted = set(topics)
        self.asked.append(wanted)
        return {t: self.ids.get(t) for t in wanted}


def _batch_of(topic: str, offsets: list[int], topic_id: str) -> PreparedBatch:
    messages = MessageColumns.empty()
    for offset in offsets:
        messages.extend(
            MessageColumns.of([Message(topic=topic, partition=0, offset=offset, value=b'{"n":1}')])
        )
    return prepare_batch(messages, "json", lambda _t: "src", "now", {topic: topic_id})


def test_offsets_going_back_make_the_bridge_ask_for_the_topic_id(data_dir: Path) -> None:
    config = KafkaBridgeConfig.model_validate({"bootstrap_servers": "127.0.0.1:1", "topics": ["t"]})
    bridge = KafkaBridge(config, LandingWriter(LandingLayout(data_dir)), lambda: 0)
    lookup = _StubTopicIds({"t": "old-id"})
    bridge._topic_id_lookup = lookup  # type: ignore[assignment]
    bridge._landed_next[("t", 0)] = 10

    # Offsets going on: nothing to ask.
    onward = _batch_of("t", [10, 11], "old-id")
    bridge._check_incarnations(onward)
    assert lookup.asked == [] and onward.writes[0][1]["kafka_topic_id"].to_list() == ["old-id"] * 2

    # Going back, same id: a re-delivery (a rebalance before a commit); nothing changes.
    again = _batch_of("t", [8, 9], "old-id")
    bridge._check_incarnations(again)
    assert lookup.asked == [{"t"}]
    assert again.writes[0][1]["kafka_topic_id"].to_list() == ["old-id"] * 2

    # Going back, new id: the topic was created again; its records carry the new id.
    lookup.ids["t"] = "new-id"
    reborn = _batch_of("t", [0, 1, 2], "old-id")
    bridge._check_incarnations(reborn)
    assert reborn.writes[0][1]["kafka_topic_id"].to_list() == ["new-id"] * 3
    assert reborn.writes[0][1].columns == again.writes[0][1].columns
    assert bridge._topic_ids["t"] == "new-id" and ("t", 0) not in bridge._landed_next

    # The cluster cannot say: the records keep the id they had (and a warning is logged).
    bridge._landed_next[("t", 0)] = 10
    lookup.ids["t"] = None
    unknown = _batch_of("t", [3], "new-id")
    bridge._check_incarnations(unknown)
    assert unknown.writes[0][1]["kafka_topic_id"].to_list() == ["new-id"]
    assert bridge._topic_ids["t"] == "new-id"
