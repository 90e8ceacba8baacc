"""A whole platform under load: brokers, API, processor and both bridges as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.tokens import TokenStore
from config.settings import load_settings
from tests.helpers import free_port, start_lakehouse, stop, wait_healthy, wait_until
from tests.kafka_broker import FAST_GROUP, TansuBroker
from tests.mqtt_broker import MOSQUITTO, MosquittoBroker
from tests.reliability.chaos import (
    REPORT,
    HttpLoad,
    Ids,
    KafkaLoad,
    MqttLoad,
    Victim,
    bridge_victim,
    logged,
    processor_victim,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures of the reliability tests that ran (kills, records, losses, cases...)."""
    if REPORT:
        terminalreporter.section("reliability figures")
        for line in REPORT:
            terminalreporter.write_line(line)


TOPICS = [f"chaos-{generation}" for generation in range(12)]


@dataclass
class Platform:
    data_dir: Path
    work: Path
    mosquitto: MosquittoBroker
    tansu: TansuBroker
    base_url: str
    token: str
    processor: Victim
    mqtt_bridge: Victim
    kafka_bridge: Victim

    @property
    def victims(self) -> list[Victim]:
        return [self.processor, self.mqtt_bridge, self.kafka_bridge]

    def loads(self, ids: Ids) -> tuple[HttpLoad, MqttLoad, KafkaLoad]:
        return (
            HttpLoad(ids, self.base_url, self.token),
            MqttLoad(ids, self.mosquitto.host, self.mosquitto.port),
            KafkaLoad(ids, self.tansu.bootstrap, TOPICS[0]),
        )


@pytest.fixture
def platform(data_dir: Path, tmp_path: Path) -> Iterator[Platform]:
    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed")
    mosquitto = MosquittoBroker(tmp_path / "mosquitto")
    tansu = TansuBroker(tmp_path / "tansu")
    mosquitto.start()
    tansu.start()
    for topic in TOPICS:
        tansu.create_topic(topic, partitions=2)
    token = TokenStore(load_settings(data_dir=data_dir).tokens_file).create(
        "chaos", ["ingest:readings"]
    )
    port = free_port()
    api_log = tmp_path / "api.log"
    api = start_lakehouse(["api", "--port", str(port)], data_dir, api_log)
    mqtt_config: dict[str, object] = {
        "host": mosquitto.host, "port": mosquitto.port, "client_id": "chaos-bridge",
        "batch_max_messages": 50, "batch_max_latency_ms": 200,
        "reconnect_min_delay_s": 0.1, "reconnect_max_delay_s": 1.0,
    }  # fmt: skip
    kafka_config: dict[str, object] = {
        "bootstrap_servers": tansu.bootstrap, "group_id": "chaos", "topics": TOPICS,
        "sources": dict.fromkeys(TOPICS, "readings"), "auto_offset_reset": "earliest",
        "batch_max_messages": 50, "batch_max_latency_ms": 200, "lag_interval_ms": 0,
        "kafka_options": FAST_GROUP,
    }  # fmt: skip
    platform = Platform(
        data_dir=data_dir,
        work=tmp_path,
        mosquitto=mosquitto,
        tansu=tansu,
        base_url=f"http://127.0.0.1:{port}",
        token=token,
        processor=processor_victim(data_dir, tmp_path / "processor.log"),
        mqtt_bridge=bridge_victim("mqtt", mqtt_config, data_dir, tmp_path / "bridge-mqtt.log"),
        kafka_bridge=bridge_victim("kafka", kafka_config, data_dir, tmp_path / "bridge-kafka.log"),
    )
    try:
        wait_healthy(platform.base_url, api, api_log)
        for victim in platform.victims:
            victim.start()
        # Messages published before the bridge's first subscription have no session to
        # wait in: the load starts once the session exists.
        wait_until(lambda: logged(tmp_path / "bridge-mqtt.log", "mqtt.subscribed"), timeout=60)
        yield platform
    finally:
        for victim in platform.victims:
            victim.stop()
        stop(api)
        tansu.stop()
        mosquitto.stop()
