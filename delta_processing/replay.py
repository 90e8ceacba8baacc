"""Replay of quarantined rows once the contract (or the data's producer) is fixed.

Invariant protected here: a quarantined row is replayed exactly once. The rows
go back through the landing zone as a new batch (their raw fields only) and are
then deleted from the quarantine table. An *intent* file written first fixes
which rows (those quarantined up to a cut-off time) and which landing batch id
belong to the replay, so a replay interrupted at any point resumes with the
same rows and the same batch instead of landing them twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import structlog

from delta_processing.column_names import RESERVED_COLUMNS
from delta_processing.tables import TableStore, read_snapshot, sync_commit
from landing_zone.layout import LandingLayout, fsync_directory
from landing_zone.writer import LandingWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReplayResult:
    """What a replay sent back through the landing zone."""

    source: str
    rows: int
    batch_id: str | None


def _intent_path(data_dir: Path, source: str) -> Path:
    return data_dir / "_meta" / "replay" / f"{source}.json"


def replay_quarantine(
    data_dir: Path, source: str, *, dry_run: bool = False, store: TableStore | None = None
) -> ReplayResult:
    """Send every row quarantined so far for ``source`` back through the pipeline.

    ``data_dir`` holds the landing zone and the replay intent; ``store`` the tables
    (default: under ``data_dir``).
    """
    store = store or TableStore(data_dir)
    table = store.open("quarantine", source)
    intent_path = _intent_path(data_dir, source)
    if table is None:
        return ReplayResult(source, 0, None)
    rows = read_snapshot(table).collect()
    if intent_path.exists():
        intent = json.loads(intent_path.read_text(encoding="utf-8"))
        cutoff = datetime.fromisoformat(intent["cutoff"])
        batch_id = str(intent["batch_id"])
        log.info("replay.resume", source=source, batch_id=batch_id)
    elif rows.is_empty():
        return ReplayResult(source, 0, None)
    else:
        cutoff = rows["_quarantined_at"].max()  # type: ignore[assignment]
        batch_id = f"replay-{cutoff:%Y%m%dT%H%M%S%fZ}"
    selected = rows.filter(pl.col("_quarantined_at") <= cutoff)
    if dry_run:
        return ReplayResult(source, selected.height, batch_id)
    if not intent_path.exists():
        intent_path.parent.mkdir(parents=True, exist_ok=True)
        intent_path.write_text(
            json.dumps({"cutoff": cutoff.isoformat(), "batch_id": batch_id}), encoding="utf-8"
        )
        fsync_directory(intent_path.parent)

    layout = LandingLayout(data_dir)
    raw = selected.select([c for c in selected.columns if c.lower() not in RESERVED_COLUMNS])
    if not selected.is_empty() and not layout.batch_exists(source, batch_id):
        LandingWriter(layout).write_frame(source, raw, batch_id=batch_id)
    if not selected.is_empty():
        table.delete(f"_quarantined_at <= '{cutoff.isoformat()}'")
        sync_commit(table, table.version())  # the delete moved it to its commit
    os.remove(intent_path)
    log.info("replay.done", source=source, rows=selected.height, batch_id=batch_id)
    return ReplayResult(source, selected.height, batch_id)
