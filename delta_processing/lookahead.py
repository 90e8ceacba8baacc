"""Bronze look-ahead: a source's next micro-batch is ingested while the last is promoted.

On a backlog, the processor's stages of consecutive micro-batches work on different
tables: bronze reads landing files and appends to ``bronze/<source>``, silver and gold
type, de-duplicate and commit the previous batch. Both spend most of their time in
Polars and deltalake, outside the GIL, so on two cores they overlap.

Invariant protected here: nothing else touches bronze while a batch is being ingested
ahead. Exactly one batch per source runs ahead, on one worker thread, and
:meth:`BronzeLookahead.drain` waits for all of them: the processor drains it at the end
of every cycle, before recovery, housekeeping and operations can run. A batch ingested
ahead is a whole bronze micro-batch (claimed, committed, archived), so a kill while it
runs is recovered exactly as a kill of the sequential processor is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from delta_processing.bronze import AppendedRows, BronzeBatchResult, BronzeIngestor
from delta_processing.source_worker import SourceWorker


@dataclass(frozen=True)
class Ingested:
    """One bronze micro-batch of a source, however it was run."""

    batch: BronzeBatchResult | None  # None: no file waited
    appended: AppendedRows | None  # its rows, for silver (None: nothing appended)
    seconds: float  # the ingest's own duration (ahead: not the caller's wait for it)


class BronzeLookahead:
    """Ingests sources' bronze micro-batches, at most one per source ahead of the caller."""

    def __init__(self, bronze: BronzeIngestor) -> None:
        self._bronze = bronze
        self._ahead: SourceWorker[Ingested] = SourceWorker("bronze-ahead")

    def next(self, source: str) -> Ingested:
        """The source's next micro-batch: the one ingested ahead, if there is one (its
        failure is raised here), else one ingested now."""
        ahead = self._ahead.take(source)
        return ahead if ahead is not None else self._ingest(source)

    def start(self, source: str) -> None:
        """Begin ingesting ``source``'s next micro-batch on the worker thread."""
        if not self._ahead.running(source):
            self._ahead.submit(source, lambda: self._ingest(source))

    def drain(self) -> dict[str, Ingested | BaseException]:
        """Wait for every batch ingested ahead and hand over what :meth:`next` did not
        take (a source's step failed, or an outage ended the cycle), per source.

        Nothing is carried into the next cycle: a late failure would be raised there
        as if it were new (an outage that has passed, say), and a committed batch is
        in bronze anyway, where silver reads it from the change feed.
        """
        return self._ahead.drain()

    def close(self) -> None:
        """Stop the worker thread (call :meth:`drain` first)."""
        self._ahead.close()

    def _ingest(self, source: str) -> Ingested:
        started = time.perf_counter()
        batch = self._bronze.ingest_next(source)
        appended = self._bronze.take_appended(source)
        return Ingested(batch, appended, time.perf_counter() - started)
