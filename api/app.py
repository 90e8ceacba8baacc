"""The FastAPI application: ingestion, query and health routes over one data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from starlette._utils import get_route_path  # what Starlette's own routing calls
from starlette.types import Receive, Scope, Send

from api import (
    admin,
    admin_tokens,
    health,
    ingest,
    metrics,
    quality,
    query,
    sources,
    status,
    tables,
    ui,
)
from api.auth import scoped
from api.body_limit import INGEST_PREFIX, BodyLimitMiddleware
from api.context import ApiContext
from api.errors import install_error_handlers
from api.ingest_endpoint import IngestEndpoint
from api.metrics import ApiMetrics
from api.observability import ObservabilityMiddleware
from api.rate_limit import RateLimiter, RateLimitHeadersMiddleware
from api.tokens import METRICS_SCOPE, TokenStore
from config.contracts import ContractRegistry, load_contracts
from config.settings import Settings
from delta_processing.operations import LockedRunner, OperationRunner
from landing_zone.backlog import BacklogCollector
from landing_zone.backpressure import BackpressureGate, BackpressureLimits
from landing_zone.group_commit import GroupCommitter
from landing_zone.idempotency import IdempotencyStore
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter


class LakehouseApp(FastAPI):
    """The FastAPI app, except that ``POST /v1/ingest/...`` goes straight to the lean
    :class:`api.ingest_endpoint.IngestEndpoint`, before FastAPI's middleware stack
    (the FastAPI route stays declared: it documents the endpoint at ``/docs``)."""

    ingest_endpoint: IngestEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection (see the class docstring)."""
        endpoint = self.ingest_endpoint
        if endpoint is not None and scope["type"] == "http" and scope["method"] == "POST":
            path = get_route_path(scope)  # as Starlette's routing reads it
            if path.startswith(INGEST_PREFIX):
                await endpoint(scope, receive, send, path)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    contracts: ContractRegistry | None = None,
    collectors: Sequence[Collector] = (),
    operations: OperationRunner | None = None,
) -> LakehouseApp:
    """Build the API for ``settings`` (contracts default to those the settings point at).

    ``collectors`` add to ``/metrics`` (e.g. the processor and bridges running in
    this process); the API's own metrics and the landing backlog are always there.
    ``operations`` runs admin operations: the in-process processor's runner under
    ``lakehouse up``; by default each takes the processor lock itself.
    """
    layout = LandingLayout(settings.data_dir)
    writer = LandingWriter(layout)
    group_commit = (
        GroupCommitter(writer, window_s=settings.group_commit_ms / 1000)
        if settings.group_commit_ms > 0 and settings.group_commit_max_body_bytes > 0
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if group_commit is not None:  # requests are drained by now; let their writes end
            group_commit.close()

    app = LakehouseApp(
        title="Lakehouse ingestion API",
        version="0.1.0",
        description="POST records into the landing zone; query gold with DuckDB SQL.",
        lifespan=lifespan,
    )
    api_metrics = ApiMetrics()
    app.state.context = ApiContext(
        settings=settings,
        contracts=contracts if contracts is not None else load_contracts(settings.contracts_dir),
        writer=writer,
        tokens=TokenStore(settings.tokens_file),
        metrics=api_metrics,
        operations=operations or LockedRunner(settings.data_dir),
        idempotency=IdempotencyStore(
            settings.data_dir / "_meta" / "idempotency.sqlite",
            layout,
            window_s=settings.idempotency_window_s,
        ),
        backpressure=BackpressureGate(
            layout,
            BackpressureLimits(
                max_backlog_files=settings.max_backlog_files,
                max_backlog_bytes=settings.max_backlog_bytes,
                max_backlog_age_s=settings.max_backlog_age_s,
                min_free_disk_bytes=settings.min_free_disk_mb * 1024 * 1024,
            ),
        ),
        group_commit=group_commit,
    )
    app.state.metrics = CollectorRegistry()
    for collector in (api_metrics, BacklogCollector(LandingLayout(settings.data_dir)), *collectors):
        app.state.metrics.register(collector)
    app.state.rate_limiter = RateLimiter.from_settings(settings)
    app.ingest_endpoint = IngestEndpoint(app.state.context, app.state.rate_limiter)
    install_error_handlers(app)
    app.add_middleware(RateLimitHeadersMiddleware)  # X-RateLimit-* left by api.rate_limit
    app.add_middleware(BodyLimitMiddleware, ingest_max_bytes=settings.max_body_bytes)
    # Added last, so outermost: 413s from the body limit are logged and counted too.
    app.add_middleware(ObservabilityMiddleware, metrics=api_metrics)
    app.include_router(health.router)
    app.include_router(ingest.router)
    app.include_router(query.router)
    app.include_router(sources.router)
    app.include_router(quality.router)
    # Opt-in: Prometheus scrapes an internal port, but an API port reachable without
    # Nginx (which denies /metrics) would otherwise show the metrics to anyone.
    metrics_guard = [scoped(METRICS_SCOPE)] if settings.metrics_auth else []
    app.include_router(metrics.router, dependencies=metrics_guard)  # type: ignore[arg-type]
    app.include_router(tables.router)
    app.include_router(admin.router)
    app.include_router(admin_tokens.router)
    app.include_router(status.router)
    app.include_router(ui.router)
    return app
