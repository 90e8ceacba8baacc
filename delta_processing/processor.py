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
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog

from config.contracts import ContractRegistry, SourceContract
from config.settings import Settings
from delta_processing.bronze import BronzeBatchResult, BronzeIngestor, BronzeLimits
from delta_processing.crashpoints import CrashPoints
from delta_processing.expectations import check_contracts
from delta_processing.gold import GoldRefresher, GoldResult, narrowed
from delta_processing.gold_behind import GoldBehind, GoldDone
from delta_processing.housekeeping import maintain_all
from delta_processing.lookahead import BronzeLookahead, Ingested
from delta_processing.maintenance import policy_for
from delta_processing.metrics import PipelineMetrics
from delta_processing.retention import RetentionPolicy, apply_retention
from delta_processing.silver import SilverInserts, SilverPromoter, SilverResult
from delta_processing.tables import TableStore
from delta_processing.transient import brief, is_storage_unavailable
from landing_zone.layout import LandingLayout
from landing_zone.watcher import LandingWatcher

log = structlog.get_logger(__name__)


T = TypeVar("T")

# Silver rows (gold's columns only) held for gold between two refreshes, per source: a
# backlog's catch-up (``gold_catch_up_ms``) gathers about a second of micro-batches.
MAX_HELD_ROWS = 2_000_000
# How often a processor looks again at a lock an operation holds.
LOCK_POLL_S = 0.2
# After a failed cycle the processor waits, doubling from BACKOFF_MIN_S to BACKOFF_MAX_S;
# after a storage outage it asks the store every STORE_PROBE_INTERVAL_S meanwhile.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STORE_PROBE_INTERVAL_S = 1.0
LOCK_UNKNOWN_POLLS = 5


class ProcessorLockedError(RuntimeError):
    """Another processor (or an operation) already owns this data directory."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder  # "processor", or the operation's role


class ProcessorStopped(RuntimeError):
    """The processor stopped before it ran a submitted operation."""


@dataclass
class CycleReport:
    """Everything one processing cycle did, stage by stage."""

    bronze: list[BronzeBatchResult] = field(default_factory=list)
    silver: list[SilverResult] = field(default_factory=list)
    gold: list[GoldResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    storage_unavailable: bool = False  # the cycle ended early: the table storage is down

    @property
    def did_work(self) -> bool:
        return bool(self.bronze or self.silver or self.gold)

    def absorb(self, later: CycleReport) -> None:
        """Add what a later cycle did (an outage in any of them marks the whole)."""
        self.bronze += later.bronze
        self.silver += later.silver
        self.gold += later.gold
        self.failures += later.failures
        self.storage_unavailable = self.storage_unavailable or later.storage_unavailable


def _observe_stage(
    metrics: PipelineMetrics, stage: str, source: str, seconds: float, rows: int
) -> None:
    metrics.stage_seconds.labels(stage).observe(seconds)
    metrics.stage_batches.labels(stage, source).inc()
    metrics.stage_rows.labels(stage, source).inc(rows)


class ProcessorLock:
    """Exclusive ``flock`` on ``<data_dir>/_meta/processor.lock``; released when we die.

    Held by the processor, or by an operation that must not race its commits (a
    rebuild, a compaction run from the CLI). The holder writes its pid and ``role``
    into the file: a processor that finds an operation holding the lock waits for it
    (a maintenance job run from cron must not stop the pipeline from starting), while
    a second processor is refused at once.
    """

    def __init__(self, data_dir: Path, role: str = "processor") -> None:
        self._path = data_dir / "_meta" / "processor.lock"
        self._role = role
        self._handle: IO[str] | None = None

    def acquire(
        self, *, wait_for_operations: bool = False, stop: threading.Event | None = None
    ) -> bool:
        """Take the lock; raises :class:`ProcessorLockedError` if it is held (with
        ``wait_for_operations``: held by a processor, else waited for). False: ``stop``
        was set while waiting (the lock is not held)."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self._path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        waiting_for, unknown = None, 0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
            # A holder writes its role just after it took the lock: a few looks more
            # before an unreadable role counts as a processor's.
            unknown = unknown + 1 if holder is None else 0
            waiting = wait_for_operations and holder != "processor"
            if not waiting or unknown > LOCK_UNKNOWN_POLLS:
                handle.close()
                holder = holder or "processor"
                who = "another processor" if holder == "processor" else f"an {holder}"
                raise ProcessorLockedError(
                    f"{who} holds {self._path}; only one may run per data directory", holder
                ) from None
            if holder is not None and holder != waiting_for:
                log.warning("processor.waiting_for_operation", operation=holder)
                waiting_for = holder
            # Polled rather than blocked on: whoever takes the lock next (another
            # processor, say) is judged again, and a stop request is heard.
            if (stop or threading.Event()).wait(LOCK_POLL_S):
                handle.close()
                return False
        handle.truncate(0)
        handle.write(f"{os.getpid()} {self._role}\n")
        handle.flush()
        self._handle = handle
        return True

    def holder(self) -> str | None:
        """The role the lock's current (or last) holder wrote, if readable."""
        try:
            words = self._path.read_text(encoding="utf-8").split(maxsplit=1)
        except OSError:
            return None
        return words[1].strip() if len(words) == 2 else None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Processor:
    """Promotes landing files through bronze, silver and gold."""

    def __init__(
        self,
        settings: Settings,
        contracts: ContractRegistry,
        metrics: PipelineMetrics | None = None,
    ) -> None:
        check_contracts(contracts.values())  # a broken rule stops us at start, not mid-batch
        self._settings = settings
        self._contracts = contracts
        self.metrics = metrics or PipelineMetrics()
        self._layout = LandingLayout(settings.data_dir)
        # The processor is its tables' only writer: it keeps them open between batches.
        store = TableStore.from_settings(settings).reusing_tables()
        self._store = store
        crash = CrashPoints(settings.crash_at)
        limits = BronzeLimits(
            max_files=settings.batch_max_files,
            max_bytes=settings.batch_max_bytes,
            max_rows=settings.batch_max_rows,
            max_file_bytes=settings.max_body_bytes,
            settle_s=settings.file_settle_ms / 1000,
        )
        partitioned = frozenset(
            name for name, c in contracts.items() if c.partitioning.bronze == "ingest_date"
        )
        declared = {name: list(c.field_types) for name, c in contracts.items()}
        self._bronze = BronzeIngestor(self._layout, store, limits, crash, partitioned, declared)
        self._lookahead = BronzeLookahead(self._bronze)
        self._silver = SilverPromoter(store, crash)
        self._gold_behind = GoldBehind(GoldRefresher(store, crash))
        self._lock = ProcessorLock(settings.data_dir)
        self.wake = threading.Event()
        self.started = threading.Event()  # set once the lock is held and the watcher runs
        self._operations: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._gold_refreshed_at: dict[str, float] = {}  # monotonic, per source
        # Landing times of the files each micro-batch carried that gold has yet to take in.
        self._awaiting_gold: dict[str, list[tuple[datetime, ...]]] = {}
        # Those of them the gold refresh in flight (or just run) carries, per source.
        self._gold_carrying: dict[str, list[tuple[datetime, ...]]] = {}
        # Silver's appended rows since gold's last refresh, per source, for gold to take
        # from memory; None once a promotion merged (gold reads the change feed then).
        self._silver_inserts: dict[str, list[SilverInserts] | None] = {}
        self._operations_lock = threading.Lock()
        self._accepting = False  # operations are taken only while run_forever runs

    def run_cycle(self) -> CycleReport:
        """Drain the landing zone once: every source, every stage. Failures are reported.

        Sources take turns, one bronze micro-batch each, so a busy source cannot
        starve the others; a failing source is skipped until the next cycle. A storage
        outage ends the cycle (``storage_unavailable``): every source's tables are on
        the same store, and each would wait out object_store's own retries in turn.
        """
        report = CycleReport()
        try:
            self._cycle(report)
        finally:
            # Nothing may touch bronze or gold between cycles while a batch is ingested
            # ahead or gold is refreshed behind.
            for source, outcome in self._lookahead.drain().items():
                if isinstance(outcome, BaseException):
                    self._source_failed(source, outcome, report)
                else:
                    self._bronze_done(source, outcome, report)
            for source, finished in self._gold_behind.drain().items():
                if isinstance(finished, BaseException):
                    self._gold_failed(source)
                    self._source_failed(source, finished, report)
                else:
                    self._gold_finished(source, finished, report)
        return report

    def _cycle(self, report: CycleReport) -> None:
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
                    self._source_failed(source, exc, report)
                    if report.storage_unavailable:
                        return
            pending = still_busy
            first_turn = False

    def _source_failed(self, source: str, exc: BaseException, report: CycleReport) -> None:
        self.metrics.stage_failures.labels(source).inc()
        report.failures.append(f"{source}: {exc}")
        if is_storage_unavailable(exc):
            # Expected while the store is away, and retried: one line, no traceback per
            # cycle.
            log.warning("processor.storage_unavailable", source=source, error=brief(exc))
            if not report.storage_unavailable:
                report.storage_unavailable = True
                self.metrics.storage_unavailable.inc()
            return
        # Polars/deltalake panics are BaseExceptions: a bad source must not kill the
        # processor or starve the others.
        log.error("processor.source_failed", source=source, exc_info=exc)

    def _bronze_done(self, source: str, ingested: Ingested, report: CycleReport) -> None:
        batch = ingested.batch
        if batch is None:
            return
        report.bronze.append(batch)
        if batch.files:  # a batch of only unreadable files commits nothing
            _observe_stage(self.metrics, "bronze", source, ingested.seconds, batch.rows)
        if batch.quarantined_files:
            self.metrics.quarantined_files.labels(source).inc(batch.quarantined_files)

    def _step(self, source: str, report: CycleReport) -> bool:
        """One bronze micro-batch of ``source``, then silver and gold; True if bronze had work."""
        metrics = self.metrics
        ingested = self._lookahead.next(source)
        batch = ingested.batch
        if batch is not None and batch.backlog:
            # More files wait: ingest them while this batch goes through silver and gold.
            self._lookahead.start(source)
        self._bronze_done(source, ingested, report)
        contract = self._contracts.get(source)
        if contract is not None:
            started = time.perf_counter()
            promotion = self._silver.promote(contract, ingested.appended)
            del ingested  # its rows: the batch ahead is in memory meanwhile
            if promotion is not None:
                self._hold_for_gold(contract, promotion.inserted)
                promoted = promotion.result
                report.silver.append(promoted)
                seconds = time.perf_counter() - started
                _observe_stage(metrics, "silver", source, seconds, promoted.upserted)
                for outcome, rows in (
                    ("in", promoted.rows_in),
                    ("upserted", promoted.upserted),
                    ("quarantined", promoted.quarantined),
                ):
                    metrics.quality_rows.labels(source, outcome).inc(rows)
            if batch is not None and batch.landed_at:
                self._awaiting_gold.setdefault(source, []).append(batch.landed_at)
            if not self._gold_deferred(source, batch):
                backlog = batch is not None and batch.backlog
                self._refresh_gold(contract, report, behind=backlog)
        return batch is not None

    def _hold_for_gold(self, contract: SourceContract, inserted: SilverInserts | None) -> None:
        """Keep silver's appended rows (gold's columns) until gold takes them in, within
        ``MAX_HELD_ROWS``; a merge or too many rows: gold reads the change feed."""
        held = self._silver_inserts.get(contract.name, [])
        if held is None:
            return
        if inserted is None or sum(e.rows.height for e in held) >= MAX_HELD_ROWS:
            self._silver_inserts[contract.name] = None
            return
        held.append(narrowed(inserted, contract))
        self._silver_inserts[contract.name] = held

    def _gold_deferred(self, source: str, batch: BronzeBatchResult | None) -> bool:
        """Whether to leave gold for a later step: files wait and gold was refreshed lately.

        Catching up on a backlog, gold then takes in several micro-batches at once, and
        its per-refresh work (a MERGE per table) is not paid for every one of them.
        """
        if batch is None or not batch.backlog:
            return False
        since = time.monotonic() - self._gold_refreshed_at.get(source, 0.0)
        return since < self._settings.gold_catch_up_ms / 1000

    def _refresh_gold(self, contract: SourceContract, report: CycleReport, *, behind: bool) -> None:
        """Bring ``contract``'s gold up to silver's current version once the source's
        refresh before it is done: with ``behind`` (files wait) on the gold worker,
        beside the next silver promotion (:mod:`delta_processing.gold_behind`), else
        here."""
        source = contract.name
        gold = self._gold_behind
        try:
            self._gold_finished(source, gold.take(source), report)
            held = self._silver_inserts.pop(source, None) or []
            self._gold_carrying[source] = self._awaiting_gold.pop(source, [])
            silver = self._store.open("silver", source) if behind else None
            if silver is not None:
                gold.start(contract, held, silver.version())
            else:
                self._gold_finished(source, gold.refresh_now(contract, held), report)
        except BaseException:
            self._gold_failed(source)
            raise
        self._gold_refreshed_at[source] = time.monotonic()

    def _gold_failed(self, source: str) -> None:
        """A refresh failed: its micro-batches wait for gold's next one again."""
        carried = self._gold_carrying.pop(source, [])
        self._awaiting_gold[source] = carried + self._awaiting_gold.get(source, [])

    def _gold_finished(self, source: str, done: GoldDone | None, report: CycleReport) -> None:
        if done is None:
            return
        metrics = self.metrics
        refreshed = done.results
        report.gold.extend(refreshed)
        if refreshed:
            metrics.stage_seconds.labels("gold").observe(done.seconds)
        for result in refreshed:
            metrics.stage_batches.labels("gold", result.table).inc()
            metrics.stage_rows.labels("gold", result.table).inc(result.groups_touched)
        carried = self._gold_carrying.pop(source, [])
        contract = self._contracts.get(source)
        if carried and contract is not None and contract.gold:
            # These batches went all the way: bronze, silver, then gold.
            metrics.observe_end_to_end(source, [min(landed) for landed in carried])
            newest = max(max(landed) for landed in carried)
            for result in refreshed:
                metrics.record_gold_data(result.table, newest)

    def housekeeping(self) -> None:
        """Compact, checkpoint and clean every table, then expire rows past retention."""
        started = time.perf_counter()
        store = TableStore.from_settings(self._settings)
        reports = maintain_all(store, self._contracts, policy_for(self._settings))
        compacted = [r for r in reports if r.compaction.ran]
        expired = apply_retention(
            store,
            list(self._contracts.values()),
            RetentionPolicy.from_settings(self._settings),
            datetime.now(UTC),
        )
        self._archive_upload()
        runs = self.metrics.maintenance_runs
        runs.labels("compaction").inc(len(compacted))
        runs.labels("checkpoint").inc(sum(r.checkpointed for r in reports))
        runs.labels("log_cleanup").inc(sum(r.log_files_removed > 0 for r in reports))
        runs.labels("retention").inc(len(expired))
        self.metrics.housekeeping_seconds.set(time.perf_counter() - started)
        log.info(
            "processor.housekeeping",
            tables=len(reports),
            compacted=len(compacted),
            expired=[r.table for r in expired],
        )

    def _archive_upload(self) -> None:
        """Upload the landing archive and prune it, when ``LAKEHOUSE_ARCHIVE_URI`` is set.

        Failures are logged, never raised: the archive waits locally for the next run.
        """
        if self._settings.archive_uri is None:
            return
        from landing_zone.archive_upload import ArchiveUploader  # azure SDK only when used

        try:
            uploader = ArchiveUploader.from_settings(self._settings)
            if uploader is None:
                return
            uploader.upload_pending()
            days = self._settings.archive_retention_days
            if days is not None:
                uploader.prune(timedelta(days=days))
        except Exception:
            log.exception("processor.archive_upload_failed")

    def submit(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` in the processor's thread, between micro-batches, under its lock.

        For on-demand maintenance (admin API) while :meth:`run_forever` runs: the
        work never races a pipeline commit. The future fails with
        :class:`ProcessorStopped` if the processor stops first.
        """
        future: Future[T] = Future()
        with self._operations_lock:
            if not self._accepting:
                future.set_exception(ProcessorStopped("the processor is not running; retry"))
                return future
            self._operations.put((work, future))
        self.wake.set()
        return future

    def _run_operations(self) -> None:
        while True:
            try:
                work, future = self._operations.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the caller, whatever it was
                future.set_exception(exc)

    def _abandon_operations(self) -> None:
        with self._operations_lock:
            self._accepting = False
        while True:
            try:
                _, future = self._operations.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ProcessorStopped("the processor stopped; retry"))

    def _await_store(self, stop: threading.Event, backoff: float, *, probe: bool) -> bool:
        """Wait out ``backoff`` after a storage outage; True if cut short by the store.

        Landing events do not end the wait (files keep arriving while the store is
        away, and they do not bring it back). With ``probe``, the store is asked every
        :data:`STORE_PROBE_INTERVAL_S` whether it answers again, so its return is
        noticed within about that long instead of up to :data:`BACKOFF_MAX_S`.
        """
        deadline = time.monotonic() + backoff
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.wait(min(STORE_PROBE_INTERVAL_S, remaining)):
                return False
            left = deadline - time.monotonic()
            if probe and left > 0 and self._store.answers(self._settings.batch_max_bytes):
                log.info("processor.store_answers", backoff_left_s=round(left, 1))
                return True

    def run_once(self) -> CycleReport:
        """Take the lock, drain everything, release (for `lakehouse process --once`).

        Hand-dropped files still settling are waited for, so none is left behind.
        """
        self._lock.acquire(wait_for_operations=True)
        try:
            report = CycleReport()
            settle_s = self._settings.file_settle_ms / 1000
            while True:
                # Looked at *before* the cycle: a file that settles during a cycle it
                # missed gets one more cycle.
                waiting = self._layout.has_unsettled_files(settle_s)  # a copy may be running
                report.absorb(self.run_cycle())
                if not waiting:
                    return report
                time.sleep(max(settle_s / 4, 0.05))
        finally:
            self._lookahead.close()
            self._gold_behind.close()
            self._lock.release()

    def run_forever(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set: on landing events, and every re-scan interval."""
        if not self._lock.acquire(wait_for_operations=True, stop=stop):
            return  # stopped while an operation held the lock
        watcher = LandingWatcher(self._layout.landing_root, self.wake)
        watcher.start()
        with self._operations_lock:
            self._accepting = True
        self.started.set()
        log.info("processor.started", data_dir=str(self._settings.data_dir))
        backoff = 0.0
        # Whether a probe may end the next back-off early: not right after one did and
        # the cycle still failed on the store (a store may answer a probe and fail
        # writes); that back-off runs to its end.
        probe_trusted = True
        next_housekeeping = time.monotonic() + self._settings.maintenance_interval_s
        try:
            while not stop.is_set():
                self.wake.clear()
                self._run_operations()
                report = self.run_cycle()
                backoff = (
                    min(max(backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S) if report.failures else 0.0
                )
                if report.did_work and not report.failures:
                    probe_trusted = True
                    continue  # more may have arrived while we worked
                if report.storage_unavailable:
                    # Housekeeping waits too; it needs the store.
                    log.info("processor.backing_off", seconds=backoff)
                    answered = self._await_store(stop, backoff, probe=probe_trusted)
                    probe_trusted = not answered
                    continue
                probe_trusted = True
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + self._settings.maintenance_interval_s
                    try:
                        # In this thread, between micro-batches: never races a pipeline
                        # commit.
                        self.housekeeping()
                    except BaseException as exc:  # deltalake panics included
                        if isinstance(exc, KeyboardInterrupt | SystemExit):
                            raise
                        # Maintenance is deferrable (next interval); the pipeline is
                        # not: a store gone during housekeeping must not stop it.
                        log.exception("processor.housekeeping_failed")
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
            self._lookahead.close()
            self._gold_behind.close()
            self._abandon_operations()
            self._lock.release()
            log.info("processor.stopped")
