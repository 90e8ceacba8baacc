"""Broker restarts (Mosquitto, Kafka) under load from every writer, then reconciliation.

Mosquitto is restarted with SIGTERM: it saves its persistence (sessions and the
messages queued for them) on the way down, as a production broker configured like
``deploy/mosquitto/mosquitto.conf`` does. Messages it acknowledged to the publisher
must reach silver through the bridge's persistent session.

tansu (the test Kafka broker) keeps its log in memory: a restart loses every
message, offset and group. A real Kafka keeps its log, so a meaningful restart here
is one that loses nothing the platform owned: Kafka production pauses, everything
acknowledged so far is confirmed in silver, tansu is SIGKILLed and started again,
and production resumes on the same topic, which tansu has forgotten: a new log whose
offsets start again at 0, under a new topic id. The bridge must reconnect, re-join
its group and carry on, and bronze must keep the new log's records apart from the old
one's (its offset de-duplication is per topic id), or it would drop them as held.

``LAKEHOUSE_RELIABILITY_RESTARTS`` restarts of each broker (default 1, CI).
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.chaos import (
    REPORT,
    Ids,
    assert_clean,
    drain,
    env_int,
    reconcile,
    wait_in_silver,
)
from tests.reliability.conftest import Platform

RESTARTS = env_int("LAKEHOUSE_RELIABILITY_RESTARTS", 1)


@pytest.mark.reliability
@pytest.mark.timeout(300 + 200 * RESTARTS)
def test_broker_restarts_under_load_lose_and_duplicate_nothing(platform: Platform) -> None:
    http, mqtt_load, kafka = loads = platform.loads(Ids())
    for load in loads:
        load.start()
    try:
        for _ in range(RESTARTS):
            time.sleep(2)
            platform.mosquitto.restart()
            time.sleep(2)
            kafka.paused.set()
            kafka.drain()
            late = wait_in_silver(platform.data_dir, set(kafka.acked), timeout=180)
            assert not late, f"{len(late)} Kafka records not in silver before the restart"
            platform.tansu.restart()
            platform.tansu.create_topic(kafka.topic, partitions=2)
            kafka.paused.clear()
        time.sleep(3)
    finally:
        for load in loads:
            load.finish()
    acked = set().union(*(load.acked for load in loads))
    wait_in_silver(platform.data_dir, acked, timeout=60)
    for victim in platform.victims:
        assert victim.proc is not None and victim.proc.poll() is None, f"{victim.name} died"
        victim.stop()
    drain(platform.data_dir)

    summary = reconcile(platform.data_dir, list(loads), kills=0)
    REPORT.append(f"broker restarts: mosquitto={RESTARTS} kafka={RESTARTS} "
                  f"records={summary.records} losses={summary.losses} "
                  f"duplicates={summary.duplicates}")  # fmt: skip
    assert all(len(load.acked) > 0 for load in (http, mqtt_load, kafka)), summary.details
    assert_clean(summary)
