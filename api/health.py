"""Liveness and readiness probes."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.context import ApiContext, get_context

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready, with the reasons"}})
async def ready(context: ApiContext = Depends(get_context)) -> JSONResponse:
    """Ready to accept data: the landing zone is writable and sources are configured."""
    problems = []
    landing = context.settings.data_dir / "landing"
    try:
        landing.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=landing, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        problems.append(f"landing zone {landing} is not writable: {exc.strerror}")
    if not context.contracts:
        problems.append("no source contracts are configured")
    if problems:
        return JSONResponse({"status": "not_ready", "reasons": problems}, status_code=503)
    return JSONResponse({"status": "ready", "sources": list(context.contracts)})
