"""`lakehouse up` with both bridges configured: MQTT and Kafka readings reach gold."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Tokens
from tests.helpers import (
    LAKEHOUSE,
    REPO,
    free_port,
    lakehouse_env,
    start_lakehouse,
    stop,
    wait_healthy,
    wait_until,
)
from tests.kafka_broker import FAST_GROUP, TansuBroker
from tests.mqtt_broker import MOSQUITTO, MosquittoBroker


@pytest.fixture
def brokers(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed")
    mosquitto = MosquittoBroker(tmp_path / "mosquitto")
    tansu = TansuBroker(tmp_path / "tansu")
    mosquitto.start()
    tansu.start()
    tansu.create_topic("plant-readings")
    try:
        yield mosquitto, tansu
    finally:
        tansu.stop()
        mosquitto.stop()


def _publish(broker: MosquittoBroker, topic: str, payload: str, *, retain: bool = False) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_up_runs_both_bridges_into_gold(brokers, data_dir: Path, tokens: Tokens, tmp_path: Path):
    mosquitto, tansu = brokers
    mqtt_config = tmp_path / "mqtt.toml"
    mqtt_config.write_text(
        f'host = "{mosquitto.host}"\nport = {mosquitto.port}\nclient_id = "e2e"\n'
        "batch_max_latency_ms = 100\n"
    )
    kafka_config = tmp_path / "kafka.json"
    kafka_config.write_text(json.dumps({
        "bootstrap_servers": tansu.bootstrap, "topics": ["plant-readings"],
        "sources": {"plant-readings": "readings"}, "batch_max_latency_ms": 100,
        "kafka_options": FAST_GROUP,
    }))  # fmt: skip
    port = free_port()
    log = tmp_path / "up.log"
    proc = start_lakehouse(
        ["up", "--port", str(port)], data_dir, log,
        LAKEHOUSE_MQTT_CONFIG=str(mqtt_config), LAKEHOUSE_KAFKA_CONFIG=str(kafka_config),
        LAKEHOUSE_TRIGGER_LATENCY_MS="50", LAKEHOUSE_RESCAN_INTERVAL_S="1",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        _publish(mosquitto, "tele/f2-AA-BB-CC-DD-EE-01/live/ch1/temp",
                 json.dumps({"ts": "2026-11-20T10:00:00Z", "value": 21.5}))  # fmt: skip
        _publish(mosquitto, "tele/f2-aabbccddee01/live/ch1/temp", "23.5")  # bare number, now
        _publish(mosquitto, "tele/f2-not-a-mac/live/ch1/temp", "1")  # dead letter
        tansu.produce("plant-readings", [
            {"key": b"k1", "value": json.dumps({"ts": "2026-11-20T10:30:00Z", "device_id": "kiln",
                                                "sensor": "temp", "value": 900}).encode()},
            {"key": b"k2", "value": b"{broken"},
        ])  # fmt: skip
        analyst = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens.query}"})

        def rows(sql: str) -> list[dict[str, object]] | None:
            response = analyst.post("/v1/query", json={"sql": sql})
            return response.json()["rows"] if response.status_code == 200 else None

        hourly = wait_until(
            lambda: (r := rows(
                "SELECT device_id, count, max FROM gold.readings_hourly "
                "WHERE window_start = TIMESTAMPTZ '2026-11-20 10:00:00+00' ORDER BY 1"
            )) and len(r) == 2 and r,
            timeout=60,
        )  # fmt: skip
        assert hourly == [
            {"device_id": "aa:bb:cc:dd:ee:01", "count": 1, "max": 21.5},
            {"device_id": "kiln", "count": 1, "max": 900.0},
        ]
        latest = wait_until(lambda: rows(
            "SELECT value FROM gold.readings_latest WHERE device_id = 'aa:bb:cc:dd:ee:01'"
        ), timeout=30)  # fmt: skip
        assert latest == [{"value": 23.5}]
        letters = wait_until(lambda: (r := rows(
            "SELECT origin, error FROM quarantine._dead_letters ORDER BY origin"
        )) and len(r) == 2 and r, timeout=30)  # fmt: skip
        assert [r["origin"] for r in letters] == ["kafka", "mqtt"]
        assert "f2-not-a-mac" in str(letters[1]["error"])
        metrics = httpx.get(f"{base}/metrics").text
        counts = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("lakehouse_bridge_messages_in_total")
        }
        assert counts == {
            'lakehouse_bridge_messages_in_total{bridge="mqtt"}': 3.0,
            'lakehouse_bridge_messages_in_total{bridge="kafka"}': 2.0,
        }
        assert "lakehouse_landing_backlog_files " in metrics
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()


def test_bridge_command_refuses_a_bad_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "mqtt.toml"
    bad.write_text('host = "x"\nport = "not a port"\n')
    result = subprocess.run(
        [*LAKEHOUSE, "bridge", "mqtt", "--config", str(bad)], cwd=REPO,
        env=lakehouse_env(tmp_path / "dados"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{bad}: invalid bridge configuration: port" in result.stderr
    missing = subprocess.run([*LAKEHOUSE, "bridge", "kafka"], cwd=REPO,
                             env=lakehouse_env(tmp_path / "dados"), capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "no kafka bridge configured" in missing.stderr


def test_standalone_bridge_serves_metrics_and_stops_cleanly(brokers, tmp_path: Path) -> None:
    import signal

    mosquitto, _ = brokers
    config = tmp_path / "mqtt.toml"
    config.write_text(f'host = "{mosquitto.host}"\nport = {mosquitto.port}\nclient_id = "solo"\n')
    port = free_port()
    proc = subprocess.Popen(
        [*LAKEHOUSE, "bridge", "mqtt", "--config", str(config), "--metrics-port", str(port)],
        cwd=REPO, env=lakehouse_env(tmp_path / "dados"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def scrape() -> str | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                return None

        # Retained: delivered whenever the bridge's subscription is in place.
        _publish(mosquitto, "stat/f2-0011223344ff/on/ch2/power", "7", retain=True)
        text = wait_until(
            lambda: (t := scrape()) and 'lakehouse_bridge_records_landed_total{bridge="mqtt"} 1.0'
            in t and t,
            timeout=30,
        )  # fmt: skip
        assert 'lakehouse_bridge_messages_in_total{bridge="mqtt"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert len(list((tmp_path / "dados" / "landing" / "readings").glob("*.parquet"))) == 1
