"""The processor: drives landing → bronze → silver → gold for every source.

One processor per data directory, enforced by an exclusive lock file, so that
bronze batch sequences and Delta commits never race. Work is triggered by
landing events (watchdog), a scan at start-up and a periodic re-scan; every
stage is idempotent and resumes from what its table recorded, so a kill at any
instant is recovered by simply starting again.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import structlog

from config.contracts import ContractRegistry
from config.settings import Settings
from delta_processing.bronze import BronzeBatchResult, BronzeIngestor, BronzeLimits
from delta_processing.crashpoints import CrashPoints
from delta_processing.expectations import check_contracts
from delta_processing.gold import GoldRefresher, GoldResult
from delta_processing.housekeeping import maintain_all
from delta_processing.maintenance import policy_for
from delta_processing.retention import RetentionPolicy, apply_retention
from delta_processing.silver import SilverPromoter, SilverResult
from delta_processing.tables import TableStore
from landing_zone.layout import LandingLayout
from landing_zone.watcher import LandingWatcher

log = structlog.get_logger(__name__)


class ProcessorLockedError(RuntimeError):
    """Another processor already owns this data directory."""


@dataclass
class CycleReport:
    """Everything one processing cycle did, stage by stage."""

    bronze: list[BronzeBatchResult] = field(default_factory=list)
    silver: list[SilverResult] = field(default_factory=list)
    gold: list[GoldResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(self.bronze or self.silver or self.gold)


class ProcessorLock:
    """Exclusive ``flock`` on ``<data_dir>/_meta/processor.lock``; released when we die."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / "_meta" / "processor.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self._path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ProcessorLockedError(
                f"another processor holds {self._path}; only one may run per data directory"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Processor:
    """Promotes landing files through bronze, silver and gold."""

    def __init__(self, settings: Settings, contracts: ContractRegistry) -> None:
        check_contracts(contracts.values())  # a broken rule stops us at start, not mid-batch
        self._settings = settings
        self._contracts = contracts
        self._layout = LandingLayout(settings.data_dir)
        store = TableStore(settings.data_dir)
        crash = CrashPoints(settings.crash_at)
        limits = BronzeLimits(
            max_files=settings.batch_max_files,
            max_bytes=settings.batch_max_bytes,
            max_file_bytes=settings.max_body_bytes,
            settle_s=settings.file_settle_ms / 1000,
        )
        partitioned = frozenset(
            name for name, c in contracts.items() if c.partitioning.bronze == "ingest_date"
        )
        declared = {name: list(c.field_types) for name, c in contracts.items()}
        self._bronze = BronzeIngestor(self._layout, store, limits, crash, partitioned, declared)
        self._silver = SilverPromoter(store, crash)
        self._gold = GoldRefresher(store, crash)
        self._lock = ProcessorLock(settings.data_dir)
        self.wake = threading.Event()
        self.started = threading.Event()  # set once the lock is held and the watcher runs

    def run_cycle(self) -> CycleReport:
        """Drain the landing zone once: every source, every stage. Failures are reported.

        Sources take turns, one bronze micro-batch each, so a busy source cannot
        starve the others; a failing source is skipped until the next cycle.
        """
        report = CycleReport()
        pending = sorted(set(self._contracts) | set(self._layout.sources_with_files()))
        first_turn = True
        while pending:
            still_busy = []
            for source in pending:
                try:
                    if first_turn:
                        report.bronze.extend(self._bronze.recover(source))
                    if self._step(source, report):
                        still_busy.append(source)
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt | SystemExit):
                        raise
                    # Polars/deltalake panics are BaseExceptions: a bad source must
                    # not kill the processor or starve the others.
                    log.exception("processor.source_failed", source=source)
                    report.failures.append(f"{source}: {exc}")
            pending = still_busy
            first_turn = False
        return report

    def _step(self, source: str, report: CycleReport) -> bool:
        """One bronze micro-batch of ``source``, then silver and gold; True if bronze had work."""
        batch = self._bronze.ingest_next(source)
        if batch is not None:
            report.bronze.append(batch)
        contract = self._contracts.get(source)
        if contract is not None:
            promoted = self._silver.promote(contract)
            if promoted is not None:
                report.silver.append(promoted)
            report.gold.extend(self._gold.refresh(contract))
        return batch is not None

    def housekeeping(self) -> None:
        """Compact, checkpoint and clean every table, then expire rows past retention."""
        store = TableStore(self._settings.data_dir)
        reports = maintain_all(store, self._contracts, policy_for(self._settings))
        compacted = [r for r in reports if r.compaction.ran]
        expired = apply_retention(
            store,
            list(self._contracts.values()),
            RetentionPolicy.from_settings(self._settings),
            datetime.now(UTC),
        )
        log.info("processor.housekeeping", tables=len(reports), compacted=len(compacted),
                 expired=[r.table for r in expired])  # fmt: skip

    def run_once(self) -> CycleReport:
        """Take the lock, drain everything, release (for `lakehouse process --once`).

        Hand-dropped files still settling are waited for, so none is left behind.
        """
        self._lock.acquire()
        try:
            report = self.run_cycle()
            settle_s = self._settings.file_settle_ms / 1000
            while self._layout.has_unsettled_files(settle_s):  # a copy may still be running
                time.sleep(max(settle_s / 4, 0.05))
                more = self.run_cycle()
                report.bronze += more.bronze
                report.silver += more.silver
                report.gold += more.gold
                report.failures += more.failures
            return report
        finally:
            self._lock.release()

    def run_forever(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set: on landing events, and every re-scan interval."""
        self._lock.acquire()
        watcher = LandingWatcher(self._layout.landing_root, self.wake)
        watcher.start()
        self.started.set()
        log.info("processor.started", data_dir=str(self._settings.data_dir))
        backoff = 0.0
        next_housekeeping = time.monotonic() + self._settings.maintenance_interval_s
        try:
            while not stop.is_set():
                self.wake.clear()
                report = self.run_cycle()
                backoff = min(max(backoff * 2, 0.5), 30.0) if report.failures else 0.0
                if report.did_work and not report.failures:
                    continue  # more may have arrived while we worked
                if time.monotonic() >= next_housekeeping:
                    # In this thread, between micro-batches: never races a pipeline commit.
                    self.housekeeping()
                    next_housekeeping = time.monotonic() + self._settings.maintenance_interval_s
                timeout = backoff or self._settings.rescan_interval_s
                settle_s = self._settings.file_settle_ms / 1000
                if self._layout.has_unsettled_files(settle_s):
                    timeout = min(timeout, max(settle_s, 0.05))  # look again once settled
                self.wake.wait(timeout=timeout)
                if stop.is_set():
                    break
                # Gather the files of a burst into one micro-batch.
                time.sleep(self._settings.trigger_latency_ms / 1000)
        finally:
            watcher.stop()
            self._lock.release()
            log.info("processor.stopped")
