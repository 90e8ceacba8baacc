"""One background task per source on one worker thread: what the processor's bronze
look-ahead (:mod:`delta_processing.lookahead`) and gold refreshes behind silver
(:mod:`delta_processing.gold_behind`) share.

Invariant protected here: at most one task per source is in flight, and :meth:`drain`
waits for every one, so the caller can make sure nothing runs between its cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

T = TypeVar("T")


class SourceWorker(Generic[T]):
    """Runs tasks keyed by source on one thread, at most one in flight per source."""

    def __init__(self, thread_name_prefix: str) -> None:
        self._prefix = thread_name_prefix
        self._running: dict[str, Future[T]] = {}
        self._pool: ThreadPoolExecutor | None = None  # started on the first task

    def running(self, source: str) -> bool:
        """Whether a task of ``source`` is in flight (or done and not taken yet)."""
        return source in self._running

    def submit(self, source: str, task: Callable[[], T]) -> None:
        """Run ``task`` for ``source`` on the worker; the one before must have been taken."""
        if source in self._running:
            raise RuntimeError(f"a task of {source!r} is still in flight")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._prefix)
        self._running[source] = self._pool.submit(task)

    def take(self, source: str) -> T | None:
        """Wait for ``source``'s task, if any, and return its result (its failure is
        raised here); ``None`` if none was in flight."""
        running = self._running.pop(source, None)
        return None if running is None else running.result()

    def drain(self) -> dict[str, T | BaseException]:
        """Wait for every task in flight and hand over each outcome, per source.

        Nothing is carried over: a late failure would be raised later as if it were
        new. Failures are handed over, Polars and deltalake panics (BaseExceptions)
        included, as the caller's per-source handling would have caught them; only an
        interrupt or an exit is raised.
        """
        running, self._running = self._running, {}
        wait(running.values())
        outcomes: dict[str, T | BaseException] = {}
        for source, future in running.items():
            failure = future.exception()
            if failure is None:
                outcomes[source] = future.result()
            elif isinstance(failure, KeyboardInterrupt | SystemExit):
                raise failure
            else:
                outcomes[source] = failure
        return outcomes

    def close(self) -> None:
        """Stop the worker thread (call :meth:`drain` first)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
