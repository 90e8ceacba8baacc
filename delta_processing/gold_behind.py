"""Gold behind silver: a source's gold refresh runs on a worker thread while silver goes on.

On a backlog the processor's main thread types and commits silver micro-batches and,
every few of them, refreshes gold (a MERGE per gold table); bronze's look-ahead thread
waits on it meanwhile. Gold's refresh reads silver as of a version already committed
and writes only gold tables, so it can run beside the next silver promotion: both spend
most of their time in Polars and deltalake, outside the GIL. Without a backlog there is
nothing to overlap with, and gold is refreshed on the caller's thread
(:meth:`GoldBehind.refresh_now`).

Invariants protected here:

* Gold reads silver as of one pinned version, the one the main thread had committed
  when it asked for the refresh: what the refresh takes in, and the position it
  records in its commits, are exactly that version's (the rows the caller held for it
  included), however far silver has moved on since.
* A source's gold commits stay in order: at most one refresh per source is in flight,
  and asking for the next waits for it.
* Nothing else touches gold while a refresh runs: :meth:`GoldBehind.drain` waits for
  all of them, and the processor drains at the end of every cycle, before
  housekeeping, retention and operations can run. A kill meanwhile leaves gold behind
  silver, which the next refresh catches up on as always.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from config.contracts import SourceContract
from delta_processing.gold import GoldRefresher, GoldResult
from delta_processing.silver import SilverInserts
from delta_processing.source_worker import SourceWorker


@dataclass(frozen=True)
class GoldDone:
    """A finished gold refresh of one source."""

    results: list[GoldResult]
    seconds: float  # the refresh's own duration


class GoldBehind:
    """Runs sources' gold refreshes on one worker thread, one in flight per source."""

    def __init__(self, gold: GoldRefresher) -> None:
        self._gold = gold
        self._behind: SourceWorker[GoldDone] = SourceWorker("gold-behind")

    def start(
        self,
        contract: SourceContract,
        inserted: Sequence[SilverInserts],
        silver_version: int,
    ) -> None:
        """Refresh ``contract``'s gold tables up to ``silver_version`` on the worker.

        The source's refresh in flight must have been taken first (:meth:`take`).
        """
        held = list(inserted)
        self._behind.submit(contract.name, lambda: self._refresh(contract, held, silver_version))

    def refresh_now(
        self,
        contract: SourceContract,
        inserted: Sequence[SilverInserts],
    ) -> GoldDone:
        """Refresh ``contract``'s gold tables up to silver's latest version, on the
        caller's thread: when nothing waits to overlap with, a hand-over only costs (and
        the caller's thread keeps its open tables, see ``TableStore.reusing_tables``).

        The source's refresh in flight must have been taken first (:meth:`take`).
        """
        if self._behind.running(contract.name):
            raise RuntimeError(f"gold of {contract.name!r} is still being refreshed")
        return self._refresh(contract, list(inserted), None)

    def take(self, source: str) -> GoldDone | None:
        """Wait for ``source``'s refresh in flight, if any; its failure is raised here."""
        return self._behind.take(source)

    def drain(self) -> dict[str, GoldDone | BaseException]:
        """Wait for every refresh in flight and hand over each outcome, per source."""
        return self._behind.drain()

    def close(self) -> None:
        """Stop the worker thread (call :meth:`drain` first)."""
        self._behind.close()

    def _refresh(
        self,
        contract: SourceContract,
        inserted: list[SilverInserts],
        silver_version: int | None,
    ) -> GoldDone:
        started = time.perf_counter()
        results = self._gold.refresh(contract, inserted, silver_version=silver_version)
        return GoldDone(results, time.perf_counter() - started)
