"""The app factory of ``lakehouse api --workers N``: each worker process builds its own app.

uvicorn starts the workers as fresh (spawned) processes that import this module;
each loads and validates the settings from the same environment, ``.env`` and
config file as the parent, and serves the shared data directory (landing file
names are unique per process; idempotency keys live in one SQLite database).
"""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from cli.common import load


def create_worker_app() -> FastAPI:
    """The API of one worker process (``uvicorn cli.worker:create_worker_app --factory``)."""
    settings, contracts = load()
    return create_app(settings, contracts)
