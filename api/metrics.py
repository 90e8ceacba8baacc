"""``GET /metrics``: Prometheus metrics of this process (bridges, landing backlog)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text format."""
    registry = request.app.state.metrics
    assert isinstance(registry, CollectorRegistry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
