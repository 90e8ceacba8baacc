"""Ingest rate limits: token buckets per (token, source), shared by every API process.

Each ``(token, source)`` pair has two buckets, one counting rows and one
counting body bytes (after gzip decompression). A bucket holds at most
``burst = rate x LAKEHOUSE_RATE_LIMIT_BURST_S`` and refills at ``rate`` per
second; a batch is admitted only if *both* buckets hold its cost, and then
both are charged. Rates come from ``LAKEHOUSE_RATE_LIMIT_ROWS_PER_S`` and
``LAKEHOUSE_RATE_LIMIT_BYTES_PER_S`` (unset: that limit is off) or from the
token's own ``rate_rows_per_s``/``rate_bytes_per_s`` overrides.

Refused batches get ``429`` with ``Retry-After`` (whole seconds until both
buckets could hold the batch), and nothing is charged; a batch larger than a
bucket's capacity could never pass, so it gets ``413``. Every ingest response
from the rate check on (``202``, ``429``, and any later error) carries:

- ``X-RateLimit-Limit``: capacity of the described bucket (rows, or bytes when
  only a bytes limit applies): what a full bucket admits at once;
- ``X-RateLimit-Remaining``: what it holds after this request (rounded down);
- ``X-RateLimit-Reset``: seconds until it is full again (rounded up; 0 = full).

The buckets live in ``<data_dir>/_meta/ratelimits.sqlite`` (WAL, no fsync:
losing them in a power cut merely refills them). Each check is one short
``BEGIN IMMEDIATE`` transaction, serialised across processes by an ``flock``
on a side file first, so a waiting process is woken the moment the lock is
free instead of sleeping in SQLite's busy handler. A check (~20 us) runs on the
event loop unless the lock is busy: then it waits in a worker thread. If the
state cannot be read or written the request is admitted (fail open) and a
warning is logged.

:func:`take` is the whole algorithm, as a pure function.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from api.tokens import TokenRecord
from config.settings import Settings

STATE_KEY = "rate_limit_headers"  # request.state entry the response headers come from

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Limit:
    """A bucket's refill ``rate`` (units per second) and capacity ``burst``."""

    rate: float
    burst: float


@dataclass(frozen=True)
class Bucket:
    """A bucket's level at time ``updated`` (seconds, wall clock)."""

    level: float
    updated: float


@dataclass(frozen=True)
class Take:
    """What :func:`take` decided, and the bucket's new state."""

    admitted: bool
    bucket: Bucket
    retry_after: float  # seconds until ``cost`` fits (0 if admitted, inf if it never will)
    full_in: float  # seconds until the bucket is full again


def take(bucket: Bucket | None, limit: Limit, cost: float, now: float) -> Take:
    """Refill ``bucket`` (``None``: a new, full one) up to ``now``, then try to remove ``cost``.

    Over any window of ``t`` seconds at most ``limit.rate * t + limit.burst`` is
    admitted. A clock that goes backwards adds nothing (time never runs back).
    """
    if bucket is None:
        level, updated = limit.burst, now
    else:
        elapsed = max(0.0, now - bucket.updated)
        level = min(limit.burst, bucket.level + elapsed * limit.rate)
        updated = max(now, bucket.updated)
    if cost <= level:
        level -= cost
        return Take(True, Bucket(level, updated), 0.0, (limit.burst - level) / limit.rate)
    retry = math.inf if cost > limit.burst else (cost - level) / limit.rate
    return Take(False, Bucket(level, updated), retry, (limit.burst - level) / limit.rate)


class LimiterBusy(Exception):
    """Another thread or process is checking (see :meth:`RateLimiter.check`)."""


@dataclass(frozen=True)
class Decision:
    """The outcome of one rate check."""

    admitted: bool
    headers: dict[str, str]  # X-RateLimit-* of the described bucket
    retry_after: float  # seconds; inf: the batch exceeds a bucket's capacity
    too_large: str | None = None  # which bucket the batch can never fit ("rows"/"bytes")


class RateLimiter:
    """Token buckets in a SQLite file shared by every process of one data directory."""

    def __init__(
        self,
        path: Path,
        rows_per_s: float | None,
        bytes_per_s: float | None,
        burst_s: float,
    ) -> None:
        self.path = path
        self.rows_per_s = rows_per_s
        self.bytes_per_s = bytes_per_s
        self.burst_s = burst_s
        self._lock = threading.Lock()
        self._pid = -1
        self._db: sqlite3.Connection | None = None
        self._guard: IO[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls(
            settings.rate_limits_file,
            settings.rate_limit_rows_per_s,
            settings.rate_limit_bytes_per_s,
            settings.rate_limit_burst_s,
        )

    def limits_for(self, token: TokenRecord) -> tuple[Limit | None, Limit | None]:
        """The (rows, bytes) limits of ``token``: its overrides, else the settings."""
        rows = token.rate_rows_per_s or self.rows_per_s
        nbytes = token.rate_bytes_per_s or self.bytes_per_s
        return (
            None if rows is None else Limit(rows, rows * self.burst_s),
            None if nbytes is None else Limit(nbytes, nbytes * self.burst_s),
        )

    def check(
        self,
        token: TokenRecord,
        source: str,
        rows: int,
        nbytes: int,
        now: float | None = None,
        *,
        wait: bool = True,
    ) -> Decision | None:
        """Charge ``rows`` and ``nbytes`` to ``token``'s buckets for ``source`` if both fit.

        ``None`` when no limit applies to the token (nothing is stored or sent). With
        ``wait=False``, raises :class:`LimiterBusy` instead of waiting for another thread
        or process to finish its check (or for the database to be opened).
        """
        rows_limit, bytes_limit = self.limits_for(token)
        if rows_limit is None and bytes_limit is None:
            return None
        key = f"{token.name}/{source}"
        if not self._lock.acquire(blocking=wait):
            raise LimiterBusy
        try:
            if not wait and (self._db is None or self._pid != os.getpid()):
                raise LimiterBusy  # opening it takes the lock and may create the schema
            db, guard = self._connection()
            try:
                fcntl.flock(guard, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LimiterBusy from None
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    row = db.execute(
                        "SELECT rows_level, rows_at, bytes_level, bytes_at FROM buckets "
                        "WHERE key = ?",
                        (key,),
                    ).fetchone()
                    when = time.time() if now is None else now
                    rows_take = _take(row, 0, rows_limit, rows, when)
                    bytes_take = _take(row, 2, bytes_limit, nbytes, when)
                    admitted = all(t is None or t.admitted for t in (rows_take, bytes_take))
                    if admitted:
                        db.execute(
                            "INSERT INTO buckets VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO "
                            "UPDATE SET rows_level = excluded.rows_level, rows_at = "
                            "excluded.rows_at, bytes_level = excluded.bytes_level, "
                            "bytes_at = excluded.bytes_at",
                            (key, *_columns(rows_take, row, 0), *_columns(bytes_take, row, 2)),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        finally:
            self._lock.release()
        described, limit, cost = (
            (rows_take, rows_limit, rows)
            if rows_take is not None
            else (bytes_take, bytes_limit, nbytes)
        )
        assert described is not None and limit is not None
        level = described.bucket.level
        if described.admitted and not admitted:
            level += cost  # refused by the other bucket: nothing was charged
        headers = {
            "X-RateLimit-Limit": str(math.floor(limit.burst)),
            "X-RateLimit-Remaining": str(max(0, math.floor(level))),
            "X-RateLimit-Reset": str(math.ceil((limit.burst - level) / limit.rate)),
        }
        if admitted:
            return Decision(True, headers, 0.0)
        too_large = next(
            (
                label
                for label, t in (("rows", rows_take), ("bytes", bytes_take))
                if t is not None and math.isinf(t.retry_after)
            ),
            None,
        )
        retry = max(t.retry_after for t in (rows_take, bytes_take) if t is not None)
        return Decision(False, headers, retry, too_large)

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            if self._guard is not None and self._pid == os.getpid():
                self._guard.close()
            self._db = self._guard = None

    def _connection(self) -> tuple[sqlite3.Connection, IO[bytes]]:
        """This process's connection (reopened after a fork) and its lock file."""
        if self._db is not None and self._guard is not None and self._pid == os.getpid():
            return self._db, self._guard
        self.path.parent.mkdir(parents=True, exist_ok=True)
        guard = open(self.path.with_suffix(".lock"), "ab")  # noqa: SIM115 - kept open
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # losing bucket state only refills buckets
            db.execute(
                "CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, rows_level REAL, "
                "rows_at REAL, bytes_level REAL, bytes_at REAL) WITHOUT ROWID"
            )
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
        self._db, self._guard, self._pid = db, guard, os.getpid()
        return db, guard


def _take(
    row: tuple[float | None, ...] | None, at: int, limit: Limit | None, cost: int, now: float
) -> Take | None:
    if limit is None:
        return None
    level = None if row is None else row[at]
    updated = None if row is None else row[at + 1]
    bucket = None if level is None or updated is None else Bucket(level, updated)
    return take(bucket, limit, cost, now)


def _columns(
    taken: Take | None, row: tuple[float | None, ...] | None, at: int
) -> tuple[float | None, float | None]:
    if taken is not None:
        return taken.bucket.level, taken.bucket.updated
    return (None, None) if row is None else (row[at], row[at + 1])


async def charge_ingest(
    limiter: RateLimiter | None, token: TokenRecord, source: str, *, rows: int, nbytes: int
) -> Decision | None:
    """Charge an ingest batch to its token's buckets (``None``: no limit applies).

    A check takes ~20 us, less than handing it to a thread, so it runs on the event
    loop; but never waits there: while another worker process (or thread) holds the
    limiter, this one waits in a worker thread.

    Fails open: if the limiter's state cannot be read or written, the batch is admitted
    and a warning logged. The caller answers with the decision's ``X-RateLimit-*``
    headers, and calls :func:`refuse_if_limited`.
    """
    if limiter is None:
        return None
    try:
        try:
            return limiter.check(token, source, rows, nbytes, wait=False)
        except LimiterBusy:
            return await run_in_threadpool(limiter.check, token, source, rows, nbytes)
    except (sqlite3.Error, OSError) as exc:
        log.warning("rate_limit.unavailable", error=str(exc), token=token.name, source=source)
        return None  # fail open: the limiter's state must not stop ingestion


def refuse_if_limited(
    decision: Decision | None,
    token: TokenRecord,
    source: str,
    *,
    rows: int,
    nbytes: int,
    client: str,
) -> None:
    """``429`` (or ``413`` for a batch no bucket could ever hold) unless admitted; logged."""
    if decision is None or decision.admitted:
        return
    if decision.too_large:
        log.warning(
            "rate_limit.batch_too_large", token=token.name, source=source, client=client,
            rows=rows, bytes=nbytes, bucket=decision.too_large,
        )  # fmt: skip
        raise ApiError(
            413,
            "batch_exceeds_rate_limit",
            f"a batch of {rows} rows / {nbytes} bytes exceeds what token {token.name!r} may "
            f"send at once ({decision.too_large} bucket capacity); send smaller batches",
        )
    retry = max(1, math.ceil(decision.retry_after))
    log.warning(
        "rate_limit.exceeded", token=token.name, source=source, client=client,
        rows=rows, bytes=nbytes, retry_after_s=retry,
    )  # fmt: skip
    raise ApiError(
        429,
        "rate_limited",
        f"rate limit of token {token.name!r} for source {source!r} exceeded; retry in {retry} s",
        headers={"Retry-After": str(retry)},
        retry_after_s=retry,
    )


class RateLimitHeadersMiddleware:
    """Adds the ``X-RateLimit-*`` headers a rate check left in the request's state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, object] = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = state.get(STATE_KEY)
                if isinstance(extra, dict):
                    headers = list(message.get("headers", ()))
                    headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
