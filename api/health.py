"""Liveness and readiness probes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.context import ApiContext, get_context
from landing_zone.backlog import measure_backlog
from landing_zone.layout import LandingLayout

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready, with the reasons"}})
async def ready(context: ApiContext = Depends(get_context)) -> JSONResponse:
    """Ready to accept data: storage is writable, sources are configured, and the
    processor keeps up (no landing file waits longer than LAKEHOUSE_READY_MAX_BACKLOG_AGE_S).
    """
    problems = await run_in_threadpool(_problems, context)
    if problems:
        return JSONResponse({"status": "not_ready", "reasons": problems}, status_code=503)
    return JSONResponse({"status": "ready", "sources": list(context.contracts)})


def _problems(context: ApiContext) -> list[str]:
    settings = context.settings
    problems = []
    for what, directory in (
        ("landing zone", settings.data_dir / "landing"),
        ("data directory", settings.data_dir),
    ):
        error = _write_probe(directory)
        if error:
            problems.append(f"{what} {directory} is not writable: {error}")
    if not context.contracts:
        problems.append("no source contracts are configured")
    bound = settings.ready_max_backlog_age_s
    if bound is not None:
        for source, waiting in sorted(measure_backlog(LandingLayout(settings.data_dir)).items()):
            age = waiting.oldest_age_s()
            if age > bound:
                problems.append(
                    f"landing backlog of {source!r} is {age:.0f} s old ({waiting.files} files), "
                    f"over the {bound:g} s bound: is the processor running?"
                )
    return problems


def _write_probe(directory: Path) -> str | None:
    """None if a file can be created and fsynced in ``directory``, else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
