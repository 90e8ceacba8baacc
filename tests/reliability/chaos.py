"""Chaos machinery: load through every writer, kill and restart processes, reconcile.

Every record carries a unique integer id ``rid`` (as its ``value``) and a unique
readings key: ``ts`` is a bijection of ``rid`` over 30 days of event time (so
records arrive late and out of order), and each channel has its own devices. A
record is *acknowledged* when its writer's client was told so:

- HTTP: the ``202`` of the request that carried it;
- MQTT: the broker's PUBACK to the publisher (QoS 1). The bridge's persistent
  session then owns it: the bridge PUBACKs the broker only after landing it;
- Kafka: a successful delivery report to the producer.

:func:`reconcile` then checks, after the pipeline has drained, that every
acknowledged record is in silver exactly once, that every record is in bronze at
most once (landing files once each; Kafka re-deliveries removed by bronze's offset
de-duplication; MQTT re-deliveries of landed messages recognised by the bridge's
journal and only acknowledged) and that gold equals a full recomputation from silver.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import polars as pl
from confluent_kafka import KafkaError, Producer
from polars.testing import assert_frame_equal

from delta_processing.tables import Layer, TableStore
from landing_zone.layout import LandingLayout
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, reference_gold, start_lakehouse

BASE = datetime(2026, 11, 1, tzinfo=UTC)
_SPAN_S = 30 * 24 * 3600  # event times over 30 days
_STRIDE = 7919  # prime, coprime with _SPAN_S: rid -> ts is one-to-one below _SPAN_S
DEVICES = 5
# Figures of this session, printed at the end of the run (see conftest.py).
REPORT: list[str] = []


def env_int(name: str, default: int) -> int:
    """A size from the environment (``make reliability`` sets the full ones)."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def ts_of(rid: int) -> str:
    return (BASE + timedelta(seconds=(rid * _STRIDE) % _SPAN_S)).strftime("%Y-%m-%dT%H:%M:%SZ")


def reading(rid: int, channel: str) -> dict[str, object]:
    return {"ts": ts_of(rid), "device_id": f"{channel}-{rid % DEVICES}", "sensor": "load",
            "value": rid}  # fmt: skip


def mqtt_message(rid: int) -> tuple[str, bytes]:
    topic = f"tele/f2-AA:BB:CC:00:00:{rid % DEVICES:02X}/live/c1/load"
    return topic, json.dumps({"ts": ts_of(rid), "value": rid}).encode()


class Ids:
    """Unique record ids shared by every load (``next`` on itertools.count is atomic)."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def take(self, n: int) -> list[int]:
        return [next(self._count) for _ in range(n)]


class Load(threading.Thread):
    """A writer under load: ``attempted`` every id sent, ``acked`` those acknowledged."""

    channel = ""

    def __init__(self, ids: Ids, seed: int) -> None:
        super().__init__(daemon=True, name=f"load-{self.channel}")
        self.ids = ids
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.paused = threading.Event()
        self.attempted: set[int] = set()
        self.acked: set[int] = set()
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        while not self.halt.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            try:
                self.step()
            except Exception as exc:  # a writer being down is part of the test
                self.errors[type(exc).__name__] += 1
                time.sleep(0.2)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Stop sending and settle what is in flight (acknowledged or not)."""
        self.halt.set()
        self.join(30)


class HttpLoad(Load):
    """NDJSON batches of 1-20 readings to ``POST /v1/ingest/readings``."""

    channel = "http"

    def __init__(self, ids: Ids, base_url: str, token: str, seed: int = 1) -> None:
        super().__init__(ids, seed)
        self.client = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=20
        )
        self.statuses: Counter[int] = Counter()

    def step(self) -> None:
        rids = self.ids.take(self.rng.randint(1, 20))
        self.attempted.update(rids)
        body = b"".join(json.dumps(reading(r, "http")).encode() + b"\n" for r in rids)
        response = self.client.post(
            "/v1/ingest/readings", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        self.statuses[response.status_code] += 1
        if response.status_code == 202:
            assert response.json()["records"] == len(rids)
            self.acked.update(rids)
        time.sleep(0.08)  # ~10 landing files/s: what a busy 2-core processor keeps up with

    def finish(self) -> None:
        super().finish()
        self.client.close()


class MqttLoad(Load):
    """QoS-1 publishes to device topics; acknowledged = PUBACK from the broker."""

    channel = "mqtt"

    def __init__(self, ids: Ids, host: str, port: int, seed: int = 2) -> None:
        super().__init__(ids, seed)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"chaos-pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)  # unlimited while the broker is away
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(host, port)
        self.client.loop_start()
        self.infos: list[tuple[int, mqtt.MQTTMessageInfo]] = []

    def step(self) -> None:
        if not self.client.is_connected():  # the broker is restarting
            time.sleep(0.05)
            return
        for rid in self.ids.take(self.rng.randint(1, 5)):
            topic, payload = mqtt_message(rid)
            self.attempted.add(rid)
            self.infos.append((rid, self.client.publish(topic, payload, qos=1)))
        time.sleep(0.02)

    def finish(self) -> None:
        super().finish()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_pubacked(i) for _, i in self.infos):
            time.sleep(0.1)
        self.acked = {rid for rid, info in self.infos if _pubacked(info)}
        self.client.disconnect()
        self.client.loop_stop()


def _pubacked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged the message (a publish refused at once never is)."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # not connected / queue full when published
        return False


class KafkaLoad(Load):
    """Small bursts to a topic; acknowledged = delivery report without error."""

    channel = "kafka"

    def __init__(self, ids: Ids, bootstrap: str, topic: str, seed: int = 3) -> None:
        super().__init__(ids, seed)
        self.topic = topic
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5, "message.timeout.ms": 20000}
        )

    def _report(self, rid: int) -> Callable[[KafkaError | None, object], None]:
        def callback(error: KafkaError | None, _message: object) -> None:
            if error is None:
                self.acked.add(rid)
            else:
                self.errors[str(error.code())] += 1

        return callback

    def step(self) -> None:
        for rid in self.ids.take(self.rng.randint(1, 10)):
            self.attempted.add(rid)
            value = json.dumps(reading(rid, "kafka")).encode()
            self.producer.produce(self.topic, value=value, on_delivery=self._report(rid))
        self.producer.poll(0)
        time.sleep(0.03)

    def drain(self) -> None:
        """Wait for every delivery report so far (while paused)."""
        self.producer.flush(30)

    def finish(self) -> None:
        super().finish()
        self.producer.flush(30)


class Victim:
    """A platform process the chaos thread SIGKILLs and restarts."""

    def __init__(self, name: str, spawn: Callable[[], subprocess.Popen[bytes]]) -> None:
        self.name = name
        self._spawn = spawn
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.proc = self._spawn()

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} died on its own (exit {self.proc.returncode})")
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        self.kills += 1

    def stop(self) -> None:
        """SIGTERM (bridges flush and acknowledge their open batch), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def processor_victim(data_dir: Path, log: Path, **env: str) -> Victim:
    """``lakehouse process`` as a victim; ``env``: more settings (e.g. the table storage)."""
    return Victim("processor", lambda: start_lakehouse(
        ["process"], data_dir, log,
        LAKEHOUSE_TRIGGER_LATENCY_MS="50", LAKEHOUSE_RESCAN_INTERVAL_S="1",
        LAKEHOUSE_BATCH_MAX_FILES="10", **env,
    ))  # fmt: skip


def bridge_victim(kind: str, config: dict[str, object], data_dir: Path, log: Path) -> Victim:
    config_file = log.with_suffix(".json")
    config_file.write_text(json.dumps(config))
    args = ["bridge", kind, "--config", str(config_file)]
    # INFO: the log tells when the bridge has subscribed (its persistent session exists).
    return Victim(
        f"bridge-{kind}", lambda: start_lakehouse(args, data_dir, log, LAKEHOUSE_LOG_LEVEL="INFO")
    )


def logged(log: Path, event: str) -> int:
    """How many times a process logged ``event`` (JSON logs)."""
    return log.read_text(errors="replace").count(f'"event": "{event}"') if log.exists() else 0


class Chaos(threading.Thread):
    """SIGKILLs a random victim every ``interval`` seconds and restarts it at once."""

    def __init__(
        self, victims: list[Victim], kills: int, seed: int, interval: tuple[float, float]
    ) -> None:
        super().__init__(daemon=True, name="chaos")
        self.victims = victims
        self.target = kills
        self.rng = random.Random(seed)
        self.interval = interval
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.target):
                time.sleep(self.rng.uniform(*self.interval))
                victim = self.rng.choice(self.victims)
                victim.kill()
                time.sleep(self.rng.uniform(0, 0.3))
                victim.start()
        except BaseException as exc:  # reported by the test
            self.failure = exc

    @property
    def kills(self) -> int:
        return sum(v.kills for v in self.victims)


def read_table(
    data_dir: Path, layer: Layer, name: str, tables: TableStore | None = None
) -> pl.DataFrame | None:
    """A table of the run, or ``None`` if it does not exist.

    ``tables``: where the tables live when not under ``data_dir`` (object storage).
    """
    store = tables or TableStore(data_dir)
    table = store.open(layer, name)
    return None if table is None else pl.read_delta(table)


def silver_rids(data_dir: Path, tables: TableStore | None = None) -> set[int]:
    silver = read_table(data_dir, "silver", "readings", tables)
    if silver is None:
        return set()
    return {int(v) for v in silver["value"].drop_nulls()}


def wait_in_silver(
    data_dir: Path, rids: set[int], timeout: float, tables: TableStore | None = None
) -> set[int]:
    """Poll silver until it holds ``rids``; returns those still missing at the deadline."""
    deadline = time.monotonic() + timeout
    missing = set(rids)
    while True:
        try:
            missing = rids - silver_rids(data_dir, tables)
        except Exception:  # a table being created under us: try again
            missing = set(rids)
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def drain(data_dir: Path, **env: str) -> None:
    """``lakehouse process --once``: everything landed goes through to gold."""
    done = subprocess.run(
        [*LAKEHOUSE, "process", "--once"], cwd=REPO, env=lakehouse_env(data_dir, **env),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    layout = LandingLayout(data_dir)
    assert layout.pending_files("readings") == [], "landing not drained"
    assert layout.inflight_batches("readings") == [], "claimed batch left over"


@dataclass
class Summary:
    kills: int
    records: int
    losses: int
    duplicates: int
    mqtt_redelivered: int = 0
    details: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"kills={self.kills} records={self.records} losses={self.losses} "
            f"duplicates={self.duplicates} mqtt_redelivered_in_bronze={self.mqtt_redelivered}"
        )


def _rid_counts(frame: pl.DataFrame) -> Counter[int]:
    values = frame["value"].drop_nulls().cast(pl.Float64, strict=False).drop_nulls()
    return Counter(int(v) for v in values)


def reconcile(
    data_dir: Path, loads: list[Load], kills: int, tables: TableStore | None = None
) -> Summary:
    """Compare the drained tables with what the clients were told; see the module doc.

    ``tables``: where the tables live when not under ``data_dir`` (object storage).
    """
    silver = read_table(data_dir, "silver", "readings", tables)
    bronze = read_table(data_dir, "bronze", "readings", tables)
    assert silver is not None and bronze is not None, "no silver or bronze table"
    in_silver = _rid_counts(silver)
    in_bronze = _rid_counts(bronze)
    attempted = set().union(*(load.attempted for load in loads))
    acked = {load.channel: load.acked for load in loads}
    all_acked = set().union(*acked.values())
    assert all_acked <= attempted

    lost = sorted(r for r in all_acked if in_silver[r] == 0)
    silver_dupes = sorted(r for r, n in in_silver.items() if n > 1)
    phantoms = sorted(set(in_silver) - attempted)
    bronze_dupes = sorted(r for r in attempted if in_bronze[r] > 1)  # every channel
    mqtt_redelivered = sum(in_bronze[r] - 1 for r in acked.get("mqtt", set()) if in_bronze[r] > 1)

    gold_diffs = []
    for name, reference in reference_gold(silver).items():
        gold = read_table(data_dir, "gold", name, tables)
        assert gold is not None, f"no gold table {name}"
        keys = [c for c in reference.columns if c in ("device_id", "sensor", "window_start")]
        try:
            assert_frame_equal(gold.sort(keys), reference.sort(keys), check_exact=False)
        except AssertionError as exc:
            gold_diffs.append(f"{name}: {exc}")

    quarantine = read_table(data_dir, "quarantine", "readings", tables)
    quarantined = 0 if quarantine is None else quarantine.height
    summary = Summary(
        kills=kills,
        records=len(all_acked),
        losses=len(lost),
        duplicates=len(silver_dupes) + len(bronze_dupes),
        mqtt_redelivered=mqtt_redelivered,
        details={
            "acked_per_channel": {k: len(v) for k, v in acked.items()},
            "attempted": len(attempted),
            "lost_per_channel": {k: len(v - set(in_silver)) for k, v in acked.items()},
            "lost_in_bronze_too": sum(1 for r in lost if in_bronze[r] == 0),
            "lost_sample": lost[:20],
            "silver_duplicates_sample": silver_dupes[:20],
            "bronze_duplicates_sample": sorted(bronze_dupes)[:20],
            "phantoms_sample": phantoms[:20],
            "gold_mismatches": gold_diffs,
            "quarantined": quarantined,
            "load_errors": {load.channel: dict(load.errors) for load in loads},
        },
    )
    print(f"\nRELIABILITY {summary.line()}\n  {summary.details}")
    return summary


def assert_clean(summary: Summary) -> None:
    details = summary.details
    assert summary.losses == 0, f"acknowledged records lost: {details}"
    assert summary.duplicates == 0, f"duplicates: {details}"
    assert details["phantoms_sample"] == [], f"silver rows nobody sent: {details}"
    assert details["gold_mismatches"] == [], details["gold_mismatches"]
    assert details["quarantined"] == 0, f"valid records were quarantined: {details}"
