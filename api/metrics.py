"""``GET /metrics``: Prometheus metrics of this process, and the API's own counters."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

router = APIRouter(tags=["health"])

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics(Collector):
    """Requests by route and status, and what ingestion accepted per source."""

    def __init__(self) -> None:
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self.requests = Counter(
            "lakehouse_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=None,
        )
        self.latency = Histogram(
            "lakehouse_http_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.ingested_batches = Counter(
            "lakehouse_ingest_batches",
            "Batches accepted (durable in the landing zone) per source.",
            ["source"],
            registry=None,
        )
        self.ingested_records = Counter(
            "lakehouse_ingest_records",
            "Records accepted per source.",
            ["source"],
            registry=None,
        )
        self.admin_operations = Counter(
            "lakehouse_admin_operations",
            "On-demand maintenance done through the admin API: optimize, vacuum, refresh.",
            ["operation"],
            registry=None,
        )
        self.ingested_bytes = Counter(
            "lakehouse_ingest_bytes",
            "Request body bytes accepted per source (as sent, before gunzip).",
            ["source"],
            registry=None,
        )

    def count_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request (``method`` already one of the known ones)."""
        # The labelled children are cached: looking them up costs more than counting.
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(method, route, str(status))
        latency = self._latency_children.get(route)
        if latency is None:
            latency = self._latency_children[route] = self.latency.labels(route)
        child.inc()
        latency.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        """All of the API's metrics."""
        for metric in (
            self.requests,
            self.latency,
            self.ingested_batches,
            self.ingested_records,
            self.ingested_bytes,
            self.admin_operations,
        ):
            yield from metric.collect()


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text format (a plain def: collecting lists the landing
    directories, which must not block the event loop). With ``metrics_auth`` on, the
    bearer check runs first, as a dependency of the router (see :func:`api.app.create_app`)."""
    registry = request.app.state.metrics
    assert isinstance(registry, CollectorRegistry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
