"""`lakehouse bridge mqtt|kafka`: the streaming writers, and starting them inside `up`."""

from __future__ import annotations

import gc
import json
import signal
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import structlog
import typer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from cli.common import fail, load, serve_metrics
from config.settings import Settings
from landing_zone.backlog import BacklogCollector
from landing_zone.bridge_metrics import BridgeCollector, PartitionLag
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter

bridge_app = typer.Typer(help="Streaming writers into the landing zone.", no_args_is_help=True)
ConfigModel = TypeVar("ConfigModel", bound=BaseModel)
log = structlog.get_logger(__name__)


def load_config_file(path: Path, model: type[ConfigModel]) -> ConfigModel:
    """A bridge configuration from a TOML or JSON file; errors name the file and field."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return model.model_validate(raw)
    except OSError as exc:
        fail(f"{path}: cannot read bridge configuration: {exc.strerror}")
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # ValidationError is a ValueError
        if isinstance(exc, ValidationError):
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<file>'}: {e['msg']}"
                for e in exc.errors()
            )
            fail(f"{path}: invalid bridge configuration: {problems}")
        fail(f"{path}: invalid bridge configuration: {exc}")


def landing_backlog(layout: LandingLayout) -> Callable[[], int]:
    """Files waiting in the landing zone (the Kafka bridge pauses above its bound)."""

    def count() -> int:
        return sum(len(layout.pending_files(s)) for s in layout.sources_with_files())

    return count


@dataclass(frozen=True)
class RunningBridge:
    """A configured bridge: how to run it and how to read its counters (and lag, if any)."""

    run: Callable[[threading.Event], None]
    counters: Callable[[], Mapping[str, int]]
    lag: PartitionLag | None = None


def configured_bridges(settings: Settings) -> dict[str, RunningBridge]:
    """The bridges the settings configure, by name; empty if none is."""
    layout = LandingLayout(settings.data_dir)
    bridges: dict[str, RunningBridge] = {}
    if settings.mqtt_config is not None:
        from landing_zone.mqtt_bridge import MqttBridge, MqttBridgeConfig

        mqtt = MqttBridge(load_config_file(settings.mqtt_config, MqttBridgeConfig),
                          LandingWriter(layout), layout, crash_at=settings.crash_at)  # fmt: skip
        bridges["mqtt"] = RunningBridge(mqtt.run, mqtt.counters)
    if settings.kafka_config is not None:
        from landing_zone.kafka_bridge import KafkaBridge, KafkaBridgeConfig

        kafka = KafkaBridge(load_config_file(settings.kafka_config, KafkaBridgeConfig),
                            LandingWriter(layout), landing_backlog(layout))  # fmt: skip
        bridges["kafka"] = RunningBridge(kafka.run, kafka.counters, kafka.lag)
    return bridges


def bridge_collector(bridges: Mapping[str, RunningBridge]) -> BridgeCollector:
    """The Prometheus collector of ``bridges`` (counters, and lag where a bridge has it)."""
    counters = {name: bridge.counters for name, bridge in bridges.items()}
    lags = {name: bridge.lag for name, bridge in bridges.items() if bridge.lag is not None}
    return BridgeCollector(counters, lags)


def start_bridges(
    bridges: Mapping[str, RunningBridge], stop: threading.Event
) -> list[threading.Thread]:
    """Start ``bridges`` in threads of this process (for `lakehouse up`)."""
    threads = []
    for name, bridge in bridges.items():
        thread = threading.Thread(
            target=bridge.run, args=(stop,), name=f"lakehouse-{name}", daemon=True
        )
        thread.start()
        log.info("bridge.started", bridge=name)
        threads.append(thread)
    return threads


def _run_one(name: str, config: Path | None, metrics_port: int | None) -> None:
    overrides: dict[str, object] = {f"{name}_config": config} if config else {}
    settings, _ = load(**overrides)
    bridge = configured_bridges(settings).get(name)
    if bridge is None:
        fail(f"no {name} bridge configured: pass --config or set LAKEHOUSE_{name.upper()}_CONFIG")
    if metrics_port is not None:
        registry = CollectorRegistry()
        registry.register(bridge_collector({name: bridge}))
        registry.register(BacklogCollector(LandingLayout(settings.data_dir)))
        serve_metrics(metrics_port, settings, registry)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # flush the open batch, then exit
        signal.signal(signum, lambda *_: stop.set())
    # What start-up built (modules, settings) lives as long as the process: out of the
    # cyclic collector's sight, a full collection (~100 ms with the GIL held, twice per
    # million Kafka messages) only walks what the bridge allocated since.
    gc.freeze()
    try:
        bridge.run(stop)
    finally:
        # Back in the collector's sight for the interpreter's shutdown: extension
        # modules (nanobind) report objects still alive at exit as leaks on stderr.
        gc.unfreeze()


MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus /metrics on this port (API host); with LAKEHOUSE_METRICS_AUTH, "
        "only to bearer tokens with scope metrics."
    ),
]


@bridge_app.command("mqtt")
def bridge_mqtt(
    config: Annotated[Path | None, typer.Option(help="TOML/JSON bridge configuration.")] = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Subscribe to MQTT topics (QoS 1, persistent session) and land the messages."""
    _run_one("mqtt", config, metrics_port)


@bridge_app.command("kafka")
def bridge_kafka(
    config: Annotated[Path | None, typer.Option(help="TOML/JSON bridge configuration.")] = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Consume Kafka topics as a consumer group and land the messages."""
    _run_one("kafka", config, metrics_port)
