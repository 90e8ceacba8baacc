"""What the API's routes share: settings, contracts, the landing writer and tokens."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from api.metrics import ApiMetrics
from api.tokens import TokenStore
from config.contracts import ContractRegistry
from config.settings import Settings
from delta_processing.operations import OperationRunner
from landing_zone.backpressure import BackpressureGate
from landing_zone.group_commit import GroupCommitter
from landing_zone.idempotency import IdempotencyStore
from landing_zone.writer import LandingWriter


@dataclass(frozen=True)
class ApiContext:
    """Built once per app in :func:`api.app.create_app`."""

    settings: Settings
    contracts: ContractRegistry
    writer: LandingWriter
    tokens: TokenStore
    metrics: ApiMetrics
    operations: OperationRunner  # where admin operations run (see delta_processing.operations)
    idempotency: IdempotencyStore | None = None  # Idempotency-Key of ingest requests
    backpressure: BackpressureGate | None = None  # 503 while the landing zone is too full
    group_commit: GroupCommitter | None = None  # small ingest bodies share landing files


def get_context(request: Request) -> ApiContext:
    """FastAPI dependency: the app's context."""
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context
