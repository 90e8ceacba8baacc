#!/usr/bin/env python
"""Bridges: MQTT (QoS 1) and Kafka messages/s into landing and into bronze, vs bare loops.

    .venv/bin/python bench/bridges_bench.py           # MQTT 100k, Kafka 2M messages, 3 runs
    .venv/bin/python bench/bridges_bench.py --quick   # MQTT 20k, Kafka 400k messages, 1 run
    .venv/bin/python bench/bridges_bench.py --bridges mqtt --messages 50000

Each pass drains a backlog of ``--messages`` readings already waiting in the broker, so
the publisher's speed is out of the figure:

- **MQTT** (mosquitto from ``tests/mqtt_broker.py``, queue limits raised): the consumer's
  persistent session (QoS 1) is created first, the messages are published while it is
  away, then it reconnects and drains its queue. Baseline: a bare paho subscriber (MQTT 5,
  QoS 1, the same persistent session, paho's automatic PUBACK after ``on_message``).
- **Kafka** (tansu from ``tests/kafka_broker.py``): the topic is filled first, then a
  fresh consumer group reads it from the start. Baseline: a bare confluent-kafka loop
  (``consume(num_messages=1000)``, reads each value's length, default auto-commit) with
  the bridge's librdkafka fetch defaults (``FETCH_DEFAULTS``): both then drain the
  same way, and the ratio is the bridge's own cost. (librdkafka's default 1 s fetch
  back-off would hold the bare loop to a fraction of its speed: that loop is logged
  too, as a reference, not used as the baseline.)

The bridge is the real command (``lakehouse bridge mqtt|kafka --config FILE`` with
``--metrics-port``); its clock starts at the first poll (every 20 ms) of its metrics
showing a message in, and stops when the last of N records landed: the rename time of
the last landing file once ``records_landed_total`` reaches N (**landing** pass), or,
in a separate pass with ``lakehouse process`` running beside it, the commit time of
the first bronze version holding N rows (**bronze** pass). After the start the watch
looks only every 0.25 s (see ``BridgeWatch``). The bare loop's clock runs from its
first to its last message.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from common import (
    LAKEHOUSE,
    RESULTS_DIR,
    Figure,
    Target,
    free_port,
    lakehouse_env,
    log,
    render,
    sigterm_as_exit,
    spawn,
    stop,
    tail,
    wait_for,
    write_results,
)

SECTION = "bridges"
SOURCE = "readings"
TOPIC = "plant-readings"
DRAIN_TIMEOUT_S = 600.0
KAFKA_MESSAGES_PER_MQTT = 20
SETTLED_POLL_S = 0.25  # the watch's pace once a pass has started (see BridgeWatch)


def payload(i: int) -> dict[str, Any]:
    minute, second = divmod(i // 100, 60)
    return {
        "ts": f"2026-11-20T{(minute // 60) % 24:02d}:{minute % 60:02d}:{second:02d}."
        f"{i % 100:02d}0Z",
        "value": (i % 1000) / 10,
    }


def mqtt_topic(i: int) -> str:
    return f"tele/f2-aabbccdd{i % 200:04x}/live/ch1/temp"


# ---------------------------------------------------------------------------- bridge runs


class BridgeWatch(threading.Thread):
    """Times a bridge pass while disturbing it as little as possible.

    The start (the first message in) is caught by polling the bridge's metrics every
    20 ms. After that the watch looks only every ``SETTLED_POLL_S``, and reads the end
    from the data itself: the rename time of the last landing file (**landing**), or
    the commit time of the first bronze version holding every row (**bronze**). An
    observer polling at 50 Hz took 8-15% of a core on this 2-core machine, beside a
    bridge and a processor the bare loop does not share it with.
    """

    def __init__(self, metrics_url: str, landing: Path, bronze: Path | None, expected: int) -> None:
        super().__init__(daemon=True, name="bridge-watch")
        self.url, self.landing, self.bronze, self.expected = metrics_url, landing, bronze, expected
        self.first_in = 0.0  # wall clock, like the file and commit times below
        self.landed_at = 0.0
        self.bronze_at = 0.0
        self.halt = threading.Event()

    def _metric(self, text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def _last_landing_at(self) -> float:
        """When the newest landing file was renamed into place (its ctime)."""
        return max(p.stat().st_ctime for p in self.landing.glob("*.parquet"))

    def _bronze_complete_at(self, state: dict[str, Any]) -> float:
        """The commit time of the first bronze version holding ``expected`` rows, or 0."""
        from deltalake import DeltaTable

        assert self.bronze is not None
        if "dt" not in state:
            if not (self.bronze / "_delta_log").is_dir():
                return 0.0
            state["dt"] = DeltaTable(str(self.bronze))
        table = state["dt"]
        table.update_incremental()
        if table.count() < self.expected:
            return 0.0
        version = table.version()
        while version > 0:  # the bronze commits since the last look: find the first full one
            table.load_as_version(version - 1)
            if table.count() < self.expected:
                break
            version -= 1
        entry = next(e for e in DeltaTable(str(self.bronze)).history() if e["version"] == version)
        return float(entry["timestamp"]) / 1000

    def run(self) -> None:
        state: dict[str, Any] = {}
        with httpx.Client(timeout=2) as client:
            while not self.halt.is_set():
                started = time.monotonic()
                if self.bronze is not None and self.first_in:
                    self.bronze_at = self._bronze_complete_at(state)
                    if self.bronze_at:
                        return
                    self.halt.wait(SETTLED_POLL_S)
                    continue
                try:
                    text = client.get(self.url).text
                except httpx.HTTPError:
                    text = ""
                if not self.first_in:
                    if self._metric(text, "lakehouse_bridge_messages_in_total"):
                        self.first_in = time.time()
                    time.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
                    continue
                if self._metric(text, "lakehouse_bridge_records_landed_total") >= self.expected:
                    self.landed_at = self._last_landing_at()
                    return
                self.halt.wait(SETTLED_POLL_S)


def run_bridge(
    kind: str,
    config: dict[str, Any],
    data_dir: Path,
    workdir: Path,
    expected: int,
    with_processor: bool,
    tag: str,
) -> float:
    """Start the bridge (and processor), wait until ``expected`` are landed/in bronze: msg/s."""
    config_path = workdir / f"{kind}-{tag}.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    env = lakehouse_env(data_dir)
    processor = None
    if with_processor:
        processor = spawn([*LAKEHOUSE, "process"], env, workdir / f"process-{tag}.log")
        time.sleep(1.0)  # let it start watching before messages arrive (startup excluded)
    bridge_log = workdir / f"bridge-{kind}-{tag}.log"
    cmd = [*LAKEHOUSE, "bridge", kind, "--config", str(config_path), "--metrics-port", str(port)]
    bronze = data_dir / "bronze" / SOURCE if with_processor else None
    landing = data_dir / "landing" / SOURCE
    watch = BridgeWatch(f"http://127.0.0.1:{port}/metrics", landing, bronze, expected)
    bridge = spawn(cmd, env, bridge_log)
    try:
        watch.start()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while watch.is_alive():
            watch.join(timeout=0.5)
            if bridge.poll() is not None:
                raise RuntimeError(f"{kind} bridge exited early:\n{tail(bridge_log)}")
            if processor is not None and processor.poll() is not None:
                raise RuntimeError(
                    f"processor exited early:\n{tail(workdir / f'process-{tag}.log')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} bridge: {expected} messages not done in time")
    finally:
        watch.halt.set()
        stop(bridge)
        stop(processor)
    end = watch.bronze_at if with_processor else watch.landed_at
    if not watch.first_in or end <= watch.first_in:  # the watch died: no figure
        raise RuntimeError(f"{kind} bridge: no valid timing (start {watch.first_in}, end {end})")
    return expected / (end - watch.first_in)


# ---------------------------------------------------------------------------- MQTT


def mqtt_client(client_id: str, persistent: bool) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    return client, props


def mqtt_publish(host: str, port: int, count: int) -> None:
    """Publish ``count`` QoS-1 readings and wait for every PUBACK."""
    client, _ = mqtt_client(f"bench-pub-{time.monotonic_ns()}", persistent=False)
    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] >= count:
            done.set()

    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()
    try:
        for i in range(count):
            # paho keys unacknowledged messages by their 16-bit packet id: with more than
            # 65,535 queued, ids repeat and the older messages are silently dropped.
            while i - acked[0] >= 20_000:
                time.sleep(0.005)
            client.publish(mqtt_topic(i), json.dumps(payload(i)), qos=1)
        if not done.wait(timeout=600):
            raise TimeoutError(f"publisher: {acked[0]} of {count} PUBACKs")
    finally:
        client.loop_stop()
        client.disconnect()


def mqtt_bare(host: str, port: int, count: int, client_id: str) -> float:
    """Bare paho subscriber: prime the session, publish, reconnect and drain: msg/s."""
    client, props = mqtt_client(client_id, persistent=True)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, port, clean_start=False, properties=props)
    client.loop_start()
    client.subscribe("tele/#", qos=1)
    if not subscribed.wait(10):
        raise TimeoutError("bare subscriber: no SUBACK")
    client.disconnect()
    client.loop_stop()
    mqtt_publish(host, port, count)

    client, props = mqtt_client(client_id, persistent=True)
    times: list[float] = []
    done = threading.Event()

    def on_message(_client: Any, _userdata: Any, _message: Any) -> None:
        times.append(time.monotonic())
        if len(times) >= count:
            done.set()

    client.on_message = on_message
    client.connect(host, port, clean_start=False, properties=props)
    client.loop_start()
    try:
        if not done.wait(DRAIN_TIMEOUT_S):
            raise TimeoutError(f"bare subscriber: {len(times)} of {count} messages")
    finally:
        client.disconnect()
        client.loop_stop()
    return (count - 1) / (times[-1] - times[0])


def mqtt_bridge_config(host: str, port: int, client_id: str) -> dict[str, Any]:
    return {"host": host, "port": port, "client_id": client_id}


def mqtt_prime_bridge(config: dict[str, Any], data_dir: Path, workdir: Path, tag: str) -> None:
    """Run the bridge once so the broker holds its persistent session, then stop it."""
    config_path = workdir / f"mqtt-prime-{tag}.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    log_path = workdir / f"mqtt-prime-{tag}.log"
    cmd = [*LAKEHOUSE, "bridge", "mqtt", "--config", str(config_path), "--metrics-port", str(port)]
    bridge = spawn(cmd, lakehouse_env(data_dir), log_path)
    client, _ = mqtt_client(f"bench-probe-{tag}", persistent=False)
    client.connect(config["host"], config["port"])
    client.loop_start()

    def landed() -> bool:
        if bridge.poll() is not None:
            raise RuntimeError(f"mqtt bridge exited early:\n{tail(log_path)}")
        client.publish(mqtt_topic(0), json.dumps(payload(0)), qos=1)
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
        except httpx.HTTPError:
            return False
        return 'lakehouse_bridge_records_landed_total{bridge="mqtt"} 0.0' not in text and (
            "lakehouse_bridge_records_landed_total" in text
        )

    try:
        wait_for(landed, 60, "mqtt bridge subscribed", 0.3)
    finally:
        client.loop_stop()
        client.disconnect()
        stop(bridge)
    shutil.rmtree(data_dir / "landing", ignore_errors=True)


def bench_mqtt(workdir: Path, count: int, run: int) -> dict[str, float]:
    from tests.mqtt_broker import MosquittoBroker

    class BenchBroker(MosquittoBroker):
        def _config(self, password_file: Path) -> str:
            text = super()._config(password_file)
            return text.replace("max_queued_messages 100000", f"max_queued_messages {count * 2}")

    broker = BenchBroker(workdir / f"mosquitto-{run}")
    broker.start()
    out: dict[str, float] = {}
    try:
        out["bare"] = mqtt_bare(broker.host, broker.port, count, f"bench-bare-{run}")
        log(f"mqtt run {run + 1}: bare paho {out['bare']:,.0f} msg/s")
        for target in ("landing", "bronze"):
            tag = f"{run}-{target}"
            data_dir = workdir / f"mqtt-data-{tag}"
            config = mqtt_bridge_config(broker.host, broker.port, f"bench-bridge-{tag}")
            mqtt_prime_bridge(config, data_dir, workdir, tag)
            mqtt_publish(broker.host, broker.port, count)
            out[target] = run_bridge(
                "mqtt", config, data_dir, workdir, count, target == "bronze", tag
            )
            log(f"mqtt run {run + 1}: bridge into {target} {out[target]:,.0f} msg/s")
            shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        broker.stop()
    return out


# ---------------------------------------------------------------------------- Kafka


def kafka_fill(broker: Any, topic: str, count: int) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
    )
    errors: list[str] = []

    def report(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    for i in range(count):
        record = {"device_id": f"dev-{i % 200:04d}", "sensor": "temp", **payload(i)}
        while True:
            try:
                producer.produce(topic, json.dumps(record).encode(), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120) or errors:
        raise RuntimeError(f"kafka produce failed: {errors[:3]}")


def kafka_bare(bootstrap: str, topic: str, count: int, group: str, *, tuned: bool = True) -> float:
    """The bare consumer loop: msg/s from its first message to its last.

    It looks at every message's value (a consumer has to read its data) and, with
    ``tuned``, runs with the bridge's librdkafka fetch defaults
    (``landing_zone.kafka_bridge.FETCH_DEFAULTS``): with librdkafka's own defaults a
    loop this fast stalls in its fetch back-off, and the bridge would be compared with
    a handicapped loop. ``tuned=False`` is that untuned loop, logged for reference.
    """
    from confluent_kafka import Consumer

    from landing_zone.kafka_bridge import FETCH_DEFAULTS
    from tests.kafka_broker import FAST_GROUP

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            **FAST_GROUP,
            **(FETCH_DEFAULTS if tuned else {}),
        }
    )
    consumer.subscribe([topic])
    seen = 0
    size = 0
    first = last = 0.0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        while seen < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consumer: {seen} of {count} messages")
            for message in consumer.consume(num_messages=1000, timeout=0.1):
                if message.error():
                    continue
                size += len(message.value() or b"")
                seen += 1
                last = time.monotonic()
                if seen == 1:
                    first = last
    finally:
        consumer.close()
    assert size, "the bare loop read no payload bytes"
    return (count - 1) / (last - first)


def bench_kafka(workdir: Path, count: int, run: int) -> dict[str, float]:
    from tests.kafka_broker import FAST_GROUP, TansuBroker

    broker = TansuBroker(workdir / f"tansu-{run}")
    broker.start()
    out: dict[str, float] = {}
    try:
        broker.create_topic(TOPIC, partitions=1)
        kafka_fill(broker, TOPIC, count)
        untuned = kafka_bare(broker.bootstrap, TOPIC, count, f"bench-untuned-{run}", tuned=False)
        log(f"kafka run {run + 1}: bare consumer, librdkafka fetch defaults {untuned:,.0f} msg/s")
        out["bare"] = kafka_bare(broker.bootstrap, TOPIC, count, f"bench-bare-{run}")
        log(f"kafka run {run + 1}: bare consumer, bridge fetch defaults {out['bare']:,.0f} msg/s")
        for target in ("landing", "bronze"):
            tag = f"{run}-{target}"
            data_dir = workdir / f"kafka-data-{tag}"
            config = {
                "bootstrap_servers": broker.bootstrap,
                "group_id": f"bench-bridge-{tag}",
                "topics": [TOPIC],
                "sources": {TOPIC: SOURCE},
                "kafka_options": FAST_GROUP,
            }
            out[target] = run_bridge(
                "kafka", config, data_dir, workdir, count, target == "bronze", tag
            )
            log(f"kafka run {run + 1}: bridge into {target} {out[target]:,.0f} msg/s")
            shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        broker.stop()
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20k messages, 1 run")
    parser.add_argument("--messages", type=int, help="messages per pass (default 100k; quick 20k)")
    parser.add_argument(
        "--kafka-messages",
        type=int,
        help=f"Kafka messages per pass (default {KAFKA_MESSAGES_PER_MQTT}x --messages)",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--bridges", default="mqtt,kafka", help="comma-separated subset")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bridges.json")
    args = parser.parse_args(argv)
    args.messages = args.messages or (20_000 if args.quick else 100_000)
    # The bare Kafka loop drains ~1.5M msg/s: a backlog of 200k took it ~0.15 s, a figure
    # made mostly of start-up (fetch ramp-up) on one side and of the pipeline's fixed
    # latencies (the first batch consumed before any is prepared, the last one's landing)
    # on the other. Twenty times the MQTT count keeps both a measure of throughput.
    args.kafka_messages = args.kafka_messages or KAFKA_MESSAGES_PER_MQTT * args.messages
    args.runs = args.runs or (1 if args.quick else 3)
    args.bridges = [b.strip() for b in args.bridges.split(",") if b.strip()]
    if set(args.bridges) - {"mqtt", "kafka"}:
        parser.error(f"unknown bridge in {args.bridges}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    benches: dict[str, Callable[[Path, int, int], dict[str, float]]] = {
        "mqtt": bench_mqtt,
        "kafka": bench_kafka,
    }
    baselines = {"mqtt": "bare paho QoS 1", "kafka": "bare confluent-kafka loop"}
    figures: list[Figure] = []
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-bridges-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        for kind in args.bridges:
            count = args.kafka_messages if kind == "kafka" else args.messages
            runs = [benches[kind](workdir, count, run) for run in range(args.runs)]
            for target in ("landing", "bronze"):
                figures.append(
                    Figure(
                        SECTION,
                        f"{kind} bridge -> {target} ({count:,} messages)",
                        "msg/s",
                        [r[target] for r in runs],
                        [r["bare"] for r in runs],
                        higher_is_better=True,
                        baseline_name=baselines[kind],
                        target=Target("ratio", ">=", 0.7),
                    )
                )
    notes = [
        "each pass drains a backlog already in the broker; bridge = `lakehouse bridge` "
        "subprocess with default batching; bronze passes run `lakehouse process` beside it",
    ]
    render(f"Bridges: messages/s vs bare consumer loops ({args.runs} run(s))", figures, notes)
    write_results(
        args.output,
        SECTION,
        figures,
        started,
        config={
            "messages": args.messages,
            "kafka_messages": args.kafka_messages,
            "runs": args.runs,
            "bridges": args.bridges,
        },
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
