"""The FastAPI application: ingestion, query and health routes over one data directory."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from api import health, ingest, metrics, quality, query, sources
from api.body_limit import BodyLimitMiddleware
from api.context import ApiContext
from api.errors import install_error_handlers
from api.tokens import TokenStore
from config.contracts import ContractRegistry, load_contracts
from config.settings import Settings
from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter


def create_app(
    settings: Settings,
    contracts: ContractRegistry | None = None,
    collectors: Sequence[Collector] = (),
) -> FastAPI:
    """Build the API for ``settings`` (contracts default to those the settings point at).

    ``collectors`` add to ``/metrics`` (e.g. the bridges running in this process).
    """
    app = FastAPI(
        title="Lakehouse ingestion API",
        version="0.1.0",
        description="POST records into the landing zone; query gold with DuckDB SQL.",
    )
    app.state.context = ApiContext(
        settings=settings,
        contracts=contracts if contracts is not None else load_contracts(settings.contracts_dir),
        writer=LandingWriter(LandingLayout(settings.data_dir)),
        tokens=TokenStore(settings.tokens_file),
    )
    app.state.metrics = CollectorRegistry()
    for collector in collectors:
        app.state.metrics.register(collector)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, ingest_max_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(ingest.router)
    app.include_router(query.router)
    app.include_router(sources.router)
    app.include_router(quality.router)
    app.include_router(metrics.router)
    return app
