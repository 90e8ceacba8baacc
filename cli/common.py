"""What every `lakehouse` command shares: consoles, errors, logging, loading settings."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import structlog
import typer
from prometheus_client import CollectorRegistry, start_http_server
from rich.console import Console

from config.contracts import ContractError, ContractRegistry, load_contracts
from config.settings import Settings, SettingsError, load_settings
from delta_processing.expectations import check_contracts

err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
    )


def load(**overrides: object) -> tuple[Settings, ContractRegistry]:
    """Validated settings and contracts, or a clear error and exit code 2."""
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
        contracts = load_contracts(settings.contracts_dir)
        check_contracts(contracts.values())
    except (SettingsError, ContractError) as exc:
        fail(str(exc))
    configure_logging(settings.log_level)
    return settings, contracts


def serve_metrics(port: int, settings: Settings, registry: CollectorRegistry) -> None:
    """Serve ``registry`` as Prometheus ``/metrics`` on ``settings.api_host:port`` from a
    daemon thread: to anyone, or with ``LAKEHOUSE_METRICS_AUTH`` only to bearers of a
    token with scope ``metrics`` (``/health`` stays open for health checks)."""
    if not settings.metrics_auth:
        start_http_server(port, addr=settings.api_host, registry=registry)
        return
    # Imported only here: the api package loads the whole app (FastAPI, DuckDB), which a
    # process serving open metrics has no use for.
    from api.tokens import TokenStore
    from cli.metrics_server import start_authenticated_metrics_server

    start_authenticated_metrics_server(
        port, settings.api_host, registry, TokenStore(settings.tokens_file)
    )
