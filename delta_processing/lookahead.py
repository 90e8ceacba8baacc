"""Bronze look-ahead: a source's next micro-batch is ingested while the last is promoted.

On a backlog, the processor's stages of consecutive micro-batches work on different
tables: bronze reads landing files and appends to ``bronze/<source>``, silver and gold
type, de-duplicate and commit the previous batch. Both spend most of their time in
Polars and deltalake, outside the GIL, so on two cores they overlap.

Invariant protected here: nothing else touches bronze while a batch is being ingested
ahead. Exactly one batch per source runs ahead, on one worker thread, and
:meth:`BronzeLookahead.settle` waits for all of them: the processor settles at the end
of every cycle, before recovery, housekeeping and operations can run. A batch ingested
ahead is a whole bronze micro-batch (claimed, committed, archived), so a kill while it
runs is recovered exactly as a kill of the sequential processor is.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

from delta_processing.bronze import AppendedRows, BronzeBatchResult, BronzeIngestor

Ingested = tuple[BronzeBatchResult | None, AppendedRows | None]


class BronzeLookahead:
    """Ingests sources' bronze micro-batches, at most one per source ahead of the caller."""

    def __init__(self, bronze: BronzeIngestor) -> None:
        self._bronze = bronze
        self._ahead: dict[str, Future[Ingested]] = {}
        self._pool: ThreadPoolExecutor | None = None  # started on the first look-ahead

    def next(self, source: str) -> Ingested:
        """The source's next micro-batch and its appended rows (``(None, None)``: none).

        The batch ingested ahead, if there is one (its failure is raised here), else
        one ingested now.
        """
        ahead = self._ahead.pop(source, None)
        if ahead is not None:
            return ahead.result()
        return self._ingest(source)

    def start(self, source: str) -> None:
        """Begin ingesting ``source``'s next micro-batch on the worker thread."""
        if source in self._ahead:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bronze-ahead")
        self._ahead[source] = self._pool.submit(self._ingest, source)

    def settle(self) -> None:
        """Wait until no batch is being ingested ahead (results wait for :meth:`next`)."""
        wait(list(self._ahead.values()))

    def close(self) -> None:
        """Settle and stop the worker thread."""
        self.settle()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _ingest(self, source: str) -> Ingested:
        batch = self._bronze.ingest_next(source)
        return batch, self._bronze.take_appended(source)
