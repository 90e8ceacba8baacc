"""Which incarnation of a Kafka topic the bridge consumes: the topic's id.

A topic deleted and created again under the same name is a new log whose offsets
start again at 0. Bronze de-duplicates re-delivered Kafka records by the highest
offset it holds per partition, so it must not compare the new log's offsets with the
old one's: every new message up to the old high offset would be dropped as already
held, although the bridge landed and committed it. Kafka gives each topic a UUID at
creation (KIP-516); the bridge stamps it on every record (``kafka_topic_id``) and
bronze keeps its positions per id.

librdkafka neither exposes a message's topic id nor reliably notices a re-creation
while it consumes, so the ids are asked of the cluster (the Admin API's
DescribeTopics) when partitions are assigned, and again whenever a partition's
offsets go back below what the bridge has already landed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

log = structlog.get_logger(__name__)

# Consumer settings an admin client shares: where the cluster is, who we are and how
# to reach it securely. Consumer-only settings would only make librdkafka warn.
_SHARED_PREFIXES = ("bootstrap.servers", "client.id", "security.", "ssl.", "sasl.", "socket.")


Setting = str | int | float | bool


def admin_config(consumer_config: Mapping[str, object]) -> dict[str, Setting]:
    """The settings of ``consumer_config`` an admin client of the same cluster needs."""
    return {
        name: value
        for name, value in consumer_config.items()
        if name.startswith(_SHARED_PREFIXES) and isinstance(value, str | int | float | bool)
    }


class TopicIds:
    """Looks up topic ids; one admin client, made on first use."""

    def __init__(self, config: Mapping[str, object], timeout_s: float = 5.0) -> None:
        self._config = admin_config(config)
        self._timeout_s = timeout_s
        self._admin: AdminClient | None = None

    def describe(self, topics: Iterable[str]) -> dict[str, str | None]:
        """Each topic's id as text; ``None`` where the cluster did not tell (the topic is
        gone, the broker predates topic ids, or it could not be reached in time)."""
        names = sorted(set(topics))
        if not names:
            return {}
        if self._admin is None:
            self._admin = AdminClient(self._config)
        ids: dict[str, str | None] = dict.fromkeys(names)
        try:
            futures = self._admin.describe_topics(
                TopicCollection(names), request_timeout=self._timeout_s
            )
        except (KafkaException, ValueError) as exc:
            log.warning("kafka_topic_ids.describe_failed", topics=names, error=str(exc))
            return ids
        for name, future in futures.items():
            try:
                description = future.result(timeout=self._timeout_s)
            except Exception as exc:  # KafkaException, or a timeout of the future
                log.warning("kafka_topic_ids.describe_failed", topic=name, error=str(exc))
                continue
            topic_id = str(description.topic_id) if description.topic_id is not None else ""
            # An all-zero id is Kafka's "none" (a broker without topic ids).
            ids[name] = topic_id if topic_id.strip("A=") else None
        return ids
