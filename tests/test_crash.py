"""Crash recovery: SIGKILL the processor at every stage boundary while data keeps arriving.

Afterwards every acknowledged reading must be in silver exactly once, every landing
file in bronze exactly once, every rejected record in quarantine exactly once, and
gold must equal a full recomputation from silver.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from landing_zone.layout import LandingLayout
from landing_zone.writer import LandingWriter
from tests.helpers import LAKEHOUSE, REPO, lakehouse_env, reference_gold, start_lakehouse

BASE = datetime(2026, 11, 1, tzinfo=UTC)


class Feeder(threading.Thread):
    """Writes landing batches until stopped, remembering exactly what was acknowledged."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(daemon=True)
        self._writer = LandingWriter(LandingLayout(data_dir))
        self._halt = threading.Event()
        self._rng = random.Random(7)
        self.acked: list[dict[str, object]] = []  # valid readings
        self.rejected = 0
        self.batches: dict[str, int] = {}  # landing file name -> records
        self._next = 0

    def run(self) -> None:
        while not self._halt.is_set():
            self.write_batch()
            time.sleep(0.03)

    def write_batch(self) -> None:
        records: list[dict[str, object]] = []
        for _ in range(self._rng.randint(1, 20)):
            i = self._next
            self._next += 1
            # Late rows: event times spread over 30 days, in random order.
            minutes = self._rng.randint(0, 30 * 24 * 60)
            ts = BASE + timedelta(minutes=minutes, microseconds=i)  # unique key per i
            records.append(
                {"ts": ts.isoformat(), "device_id": f"d{i % 7}", "sensor": f"s{i % 3}",
                 "value": str(i)}
            )  # fmt: skip
        if self._rng.random() < 0.3:
            records.append({"ts": "bad", "device_id": "dx", "sensor": "s", "value": "1"})
        frame = pl.DataFrame(records, schema=dict.fromkeys(records[0], pl.String))
        receipt = self._writer.write_frame("readings", frame)
        # Only now is the batch acknowledged.
        valid = [r for r in records if r["ts"] != "bad"]
        self.acked.extend(valid)
        self.rejected += len(records) - len(valid)
        self.batches[receipt.path.name] = len(records)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _run_until_killed(data_dir: Path, log: Path, crash_at: str) -> int:
    proc = start_lakehouse(
        ["process"],
        data_dir,
        log,
        LAKEHOUSE_CRASH_AT=crash_at,
        LAKEHOUSE_TRIGGER_LATENCY_MS="0",
        LAKEHOUSE_RESCAN_INTERVAL_S="0.2",
        LAKEHOUSE_BATCH_MAX_FILES="5",
    )
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"processor never reached {crash_at}:\n{log.read_text()}") from None


def _kill_at_random(data_dir: Path, log: Path, rng: random.Random) -> None:
    proc = start_lakehouse(
        ["process"], data_dir, log,
        LAKEHOUSE_TRIGGER_LATENCY_MS="0", LAKEHOUSE_BATCH_MAX_FILES="3",
    )  # fmt: skip
    time.sleep(rng.uniform(1.0, 3.0))  # import time ~1 s; then anywhere in the pipeline
    proc.send_signal(signal.SIGKILL)
    proc.wait()


CRASH_PLAN = [
    "after_claim:1",
    "after_bronze_commit:1",
    "mid_archive:1",
    "after_quality_commit:1",
    "after_quarantine_commit:1",
    "after_silver_commit:1",
    "after_gold_commit:1",
    "after_gold_commit:3",
    "after_claim:3",
    "after_bronze_commit:2",
    "after_silver_commit:2",
    "mid_archive:2",
]


@pytest.mark.timeout(600)
def test_kills_at_every_stage_lose_and_duplicate_nothing(data_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "processor.log"
    feeder = Feeder(data_dir)
    feeder.write_batch()
    feeder.start()
    kills = 0
    try:
        for crash_at in CRASH_PLAN:
            code = _run_until_killed(data_dir, log, crash_at)
            assert code == -signal.SIGKILL, f"{crash_at}: exit {code}\n{log.read_text()}"
            kills += 1
        rng = random.Random(11)
        for _ in range(4):
            _kill_at_random(data_dir, log, rng)
            kills += 1
    finally:
        feeder.stop()
    drained = subprocess.run(
        [*LAKEHOUSE, "process", "--once"],
        cwd=REPO,
        env=lakehouse_env(data_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert drained.returncode == 0, drained.stderr
    assert kills == len(CRASH_PLAN) + 4

    layout = LandingLayout(data_dir)
    assert layout.pending_files("readings") == []
    assert layout.inflight_batches("readings") == []

    # Bronze: every acknowledged landing file exactly once, with all its records.
    bronze = pl.read_delta(str(data_dir / "bronze" / "readings"))
    per_file = dict(bronze.group_by("_landing_file").len().iter_rows())
    assert per_file == feeder.batches

    # Silver: every acknowledged valid reading exactly once (keys are unique by design).
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    expected = (
        pl.DataFrame(feeder.acked)
        .select(
            pl.col("ts").str.to_datetime(time_zone="UTC", time_unit="us"),
            "device_id",
            "sensor",
            pl.col("value").cast(pl.Float64),
        )
        .sort("device_id", "sensor", "ts")
    )
    assert expected.height == len(feeder.acked) > 500
    got = silver.select(expected.columns).sort("device_id", "sensor", "ts")
    assert_frame_equal(got, expected)

    quarantine = pl.read_delta(str(data_dir / "quarantine" / "readings"))
    assert quarantine.height == feeder.rejected

    # Quality metrics: one row per batch, exactly once, adding up to bronze.
    quality = pl.read_delta(str(data_dir / "_meta" / "quality")).filter(
        pl.col("source") == "readings"
    )
    assert quality["bronze_version"].is_unique().all()
    assert quality["rows_in"].sum() == bronze.height
    assert quality["rows_quarantined"].sum() == feeder.rejected
    assert quality["rows_passed"].sum() == len(feeder.acked)

    # Gold equals a full recomputation from silver.
    for name, reference in reference_gold(silver).items():
        gold = pl.read_delta(str(data_dir / "gold" / name))
        keys = [c for c in reference.columns if c in ("device_id", "sensor", "window_start")]
        assert_frame_equal(gold.sort(keys), reference.sort(keys), check_exact=False)


def _process_once(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAKEHOUSE, "process", "--once"],
        cwd=REPO,
        env=lakehouse_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_kill_after_a_clean_batchs_quality_commit_redoes_only_silver(data_dir: Path) -> None:
    """A clean batch records the quarantine's position in its quality commit (no empty
    quarantine commit): killed right after it, the restart finds quality and quarantine
    at the batch's end and redoes silver alone, once."""
    from deltalake import DeltaTable

    from delta_processing.silver import QUARANTINE_APP_ID, quarantine_skip_app_id

    writer = LandingWriter(LandingLayout(data_dir))

    def land(minute: int) -> None:
        ts = (BASE + timedelta(minutes=minute)).isoformat()
        frame = pl.DataFrame({"ts": [ts], "device_id": ["d"], "sensor": ["s"], "value": ["1"]})
        writer.write_frame("readings", frame)

    land(1)
    assert _process_once(data_dir).returncode == 0  # creates the (empty) quarantine table
    quarantine_dir, quality_dir = (
        data_dir / "quarantine" / "readings",
        data_dir / "_meta" / "quality",
    )
    quarantine_version = DeltaTable(str(quarantine_dir)).version()
    land(2)
    killed = _process_once(data_dir, LAKEHOUSE_CRASH_AT="after_quality_commit:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    quality = DeltaTable(str(quality_dir))
    bronze_version = DeltaTable(str(data_dir / "bronze" / "readings")).version()
    assert quality.transaction_version(quarantine_skip_app_id("readings")) == bronze_version
    assert pl.read_delta(str(data_dir / "silver" / "readings")).height == 1  # not yet

    assert _process_once(data_dir).returncode == 0
    quarantine = DeltaTable(str(quarantine_dir))
    assert quarantine.version() == quarantine_version  # no quarantine commit at all
    assert quarantine.transaction_version(QUARANTINE_APP_ID) == 0
    silver = pl.read_delta(str(data_dir / "silver" / "readings"))
    assert sorted(silver["ts"].dt.minute().to_list()) == [1, 2]
    rows = pl.read_delta(str(quality_dir)).filter(pl.col("source") == "readings")
    assert rows["bronze_version"].is_unique().all() and rows["rows_in"].sum() == 2
