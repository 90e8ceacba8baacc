"""Group commit: many small batches of one source share one landing file and one fsync.

Invariant protected here: a batch handed to :meth:`GroupCommitter.submit` is
acknowledged (its future resolves) only after the landing file holding it is
durable; if that file cannot be written, every batch of the group fails and
nothing of the group is visible.

How: per source, batches arriving while no write of that source is in flight
are written at the next turn of the event loop (so a lone client waits for
nothing but its own fsync). Batches arriving while a write is in flight gather
in the next group, which is written as soon as that write finishes, after at most
``window_s`` (then it is written beside the running one, unless
``max_concurrent_writes`` of the source run already: then it keeps growing until
one of them finishes), or as soon as it holds ``max_rows`` rows or ``max_bytes``
body bytes. A group is one :meth:`LandingWriter.write_frame` call (concatenation,
Parquet encoding, one fsync, rename, directory fsync) on a worker thread; the
event loop never blocks.

A batch is a raw frame or Arrow table, or a list of raw records (see
:func:`landing_zone.formats.decode_small`: a single reading costs ~25x less
to collect that way than as a frame of its own).

Each batch learns the group's ``batch_id`` (the landing file's name) and its
``first_record``: the 0-based position of its first record in that file, which
holds the batches in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

import polars as pl
import pyarrow as pa

from landing_zone.formats import RawRecord, concat_records, raw_frame, raw_table
from landing_zone.writer import LandingReceipt, LandingWriter

# What a request hands in: its raw frame or Arrow table, or its raw records.
Batch: TypeAlias = pl.DataFrame | pa.Table | Sequence[RawRecord]


@dataclass(frozen=True)
class GroupReceipt:
    """Where one submitted batch is, durably: ``records`` rows from ``first_record`` on."""

    batch_id: str
    source: str
    records: int
    first_record: int
    group_records: int  # rows of the whole landing file
    group_batches: int  # batches (requests) sharing it


@dataclass
class _Entry:
    batch: Batch
    rows: int
    correlation_id: str | None
    size: int
    future: asyncio.Future[GroupReceipt]


@dataclass
class _Group:
    entries: list[_Entry] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    timer: asyncio.TimerHandle | None = None
    scheduled: bool = False


class GroupCommitter:
    """Per-source group commit in front of one :class:`LandingWriter` (one event loop)."""

    def __init__(
        self,
        writer: LandingWriter,
        *,
        window_s: float = 0.003,
        max_rows: int = 10_000,
        max_bytes: int = 1024 * 1024,
        max_concurrent_writes: int = 4,
    ) -> None:
        self._writer = writer
        self._window_s = window_s
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._open: dict[str, _Group] = {}
        self._in_flight: dict[str, int] = {}
        self._max_concurrent_writes = max_concurrent_writes
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent_writes, thread_name_prefix="group-commit"
        )
        self.groups_written = 0
        self.batches_written = 0

    async def submit(
        self, source: str, batch: Batch, correlation_id: str | None, size: int
    ) -> GroupReceipt:
        """Land ``batch`` in the next group of ``source``; returns once that file is durable.

        Raises :class:`landing_zone.writer.LandingWriteError` if the group's file could not
        be written (nothing of the group is then visible).
        """
        loop = asyncio.get_running_loop()
        group = self._open.get(source)
        if group is None:
            group = self._open[source] = _Group()
        future: asyncio.Future[GroupReceipt] = loop.create_future()
        rows = len(batch)
        group.entries.append(_Entry(batch, rows, correlation_id, size, future))
        group.rows += rows
        group.size += size
        if group.rows >= self._max_rows or group.size >= self._max_bytes:
            self._flush(source, group)
        elif not self._in_flight.get(source):
            if not group.scheduled:  # batches arriving in this loop turn join it
                group.scheduled = True
                loop.call_soon(self._flush, source, group)
        elif group.timer is None:
            group.timer = loop.call_later(self._window_s, self._window_ended, source, group)
        # The write goes on even if this request is cancelled: others share the file.
        return await asyncio.shield(future)

    def _window_ended(self, source: str, group: _Group) -> None:
        if self._in_flight.get(source, 0) < self._max_concurrent_writes:
            self._flush(source, group)
        # Otherwise every writer is busy: the first to finish takes the group, grown
        # meanwhile, instead of it queueing (and fsyncing) behind them on its own.

    def _flush(self, source: str, group: _Group) -> None:
        if self._open.get(source) is not group:
            return  # already flushed (by size, timer or a finished write)
        del self._open[source]
        if group.timer is not None:
            group.timer.cancel()
        self._in_flight[source] = self._in_flight.get(source, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            task = loop.run_in_executor(self._executor, self._write, source, group.entries)
        except BaseException as exc:  # e.g. the executor is shut down: fail, never hang
            self._in_flight[source] -= 1
            for entry in group.entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        task.add_done_callback(lambda done: self._finished(source, group, done))

    def _write(self, source: str, entries: list[_Entry]) -> LandingReceipt:
        ids = [entry.correlation_id for entry in entries if entry.correlation_id]
        return self._writer.write_frame(source, _concatenated(entries), correlation_ids=ids)

    def _finished(self, source: str, group: _Group, done: asyncio.Future[LandingReceipt]) -> None:
        self._in_flight[source] -= 1
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        if error is not None:
            for entry in group.entries:
                if not entry.future.done():
                    entry.future.set_exception(error)
        else:
            receipt = done.result()
            first = 0
            for entry in group.entries:
                if not entry.future.done():
                    entry.future.set_result(
                        GroupReceipt(
                            receipt.batch_id,
                            source,
                            entry.rows,
                            first,
                            receipt.records,
                            len(group.entries),
                        )
                    )
                first += entry.rows
            self.groups_written += 1
            self.batches_written += len(group.entries)
        waiting = self._open.get(source)
        if waiting is not None and waiting.entries:
            self._flush(source, waiting)  # it gathered while this write ran

    def close(self) -> None:
        """Stop the writer threads once the writes already handed to them are done."""
        self._executor.shutdown(wait=True)


def _concatenated(entries: list[_Entry]) -> pl.DataFrame | pa.Table:
    """The group's rows in arrival order; columns in order of first appearance, absent
    values null (see :func:`~landing_zone.formats.concat_records`)."""
    records: list[RawRecord] = []
    for entry in entries:
        if isinstance(entry.batch, pl.DataFrame | pa.Table):
            break
        records.extend(entry.batch)
    else:
        return raw_table(records)  # the common case: only small requests
    frames = [_frame(entry.batch) for entry in entries]
    return concat_records(frames)


def _frame(batch: Batch) -> pl.DataFrame:
    if isinstance(batch, pl.DataFrame):
        return batch
    if isinstance(batch, pa.Table):  # column names without NUL: Arrow's C interface holds them
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        return frame
    return raw_frame(batch)
