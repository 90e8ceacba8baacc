"""Idempotency keys: a retried write returns the first answer instead of landing twice.

Invariant protected here: for one ``(principal, source, key)`` at most one landing
file is ever made durable while the key is remembered, whichever process, thread
or retry presents it, and whatever instant a writer dies at.

How: a small SQLite database on local disk (``<data_dir>/_meta/idempotency.sqlite``,
WAL, ``synchronous=FULL``, shared by every worker process) maps the key to the
SHA-256 of the request, a state (``pending``/``done``), a batch id chosen *before*
the write, and the record count.

1. :meth:`IdempotencyStore.reserve` inserts ``pending`` with a fresh batch id (one
   ``BEGIN IMMEDIATE`` transaction, so exactly one racer wins). Losers learn the
   winner's state: ``done`` -> replay its answer; ``pending`` -> wait; another body
   -> conflict.
2. The winner writes the landing file under the reserved batch id. Its rename into
   ``landing/<source>/`` happens *inside* a write transaction that first checks the
   reservation is still its own and then marks it ``done``
   (:meth:`IdempotencyStore.publish_guard`), so a file becomes visible if and only
   if its reservation is completed (a crash in between leaves ``pending`` + a file,
   resolved below).
3. A ``pending`` entry whose writer is gone (its process is dead, or its lease of
   ``lease_s`` expired) is *stale*. Whoever finds it checks whether the landing
   file of its batch id exists anywhere (:meth:`LandingLayout.batch_exists`:
   landing, bronze claims, archive, file quarantine): if so the write had
   completed and the entry is marked ``done``; if not, the finder takes the
   reservation over (same batch id, new owner). The old owner, should it still be
   alive, finds the reservation no longer its own at its rename and gives up.

Entries expire ``window_s`` after they were made (then the key is free again);
expired entries are purged lazily, at most once a minute, by writers.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from landing_zone.layout import LandingLayout
from landing_zone.writer import new_batch_id

DEFAULT_LEASE_S = 60.0
PURGE_EVERY_S = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    principal TEXT NOT NULL,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    batch_id TEXT NOT NULL,
    records INTEGER NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (principal, source, key)
) WITHOUT ROWID
"""


class ReservationLost(RuntimeError):
    """The reservation was taken over (its lease expired): the write must not be published."""


@dataclass(frozen=True)
class Outcome:
    """What :meth:`IdempotencyStore.reserve` found.

    ``reserved``: the caller owns the key and must write under ``batch_id``;
    ``done``: an earlier request with this key and body landed ``batch_id``;
    ``pending``: another writer is busy with it (wait and ask again);
    ``conflict``: the key was used with another body.
    """

    status: Literal["reserved", "done", "pending", "conflict"]
    batch_id: str
    records: int
    owner: str = ""  # when reserved: the id to pass to publish_guard and release


def _process_identity() -> str:
    """Who owns a reservation: host, pid and the process's start time (pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # Field 22 (starttime); the command name (field 2) may hold spaces, skip past it.
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _owner_is_dead(owner: str) -> bool:
    """Whether the process that made a reservation is known to be gone (same host only)."""
    host, _, rest = owner.partition(":")
    pid_text, _, rest = rest.partition(":")
    ticks = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or ticks == "?":
        return False  # another host or container: only the lease can tell
    current = _start_ticks(int(pid_text))
    return current != ticks  # no such process ("?"), or the pid was reused


class IdempotencyStore:
    """The shared idempotency table of one data directory."""

    def __init__(
        self,
        path: Path,
        layout: LandingLayout,
        *,
        window_s: float = 86_400.0,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.window_s = window_s
        self.lease_s = lease_s
        self._layout = layout
        self._clock = clock
        self._local = threading.local()
        self._process = _process_identity()
        self._last_purge = 0.0
        self._connect()  # create the schema now: errors surface at start-up

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        # A reservation must be durable before its landing file is written, or a power
        # loss could forget it while the file survives (and a retry would land twice).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(_SCHEMA)
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on exit, rolled back on error."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ operations

    def reserve(
        self, principal: str, source: str, key: str, body_sha256: str, records: int
    ) -> Outcome:
        """Claim ``key`` for a write of ``records`` records, or learn who has it."""
        now = self._clock()
        with self._transaction() as conn:
            self._maybe_purge(conn, now)
            row = conn.execute(
                "SELECT body_sha256, state, batch_id, records, created_at, owner, lease_until "
                "FROM idempotency WHERE principal = ? AND source = ? AND key = ?",
                (principal, source, key),
            ).fetchone()
            owner = f"{self._process}:{uuid.uuid4().hex}"
            if (
                row is not None
                and row[4] + self.window_s <= now
                and (row[1] == "done" or row[6] <= now or _owner_is_dead(row[5]))
            ):  # past the window, and done or abandoned by its writer
                conn.execute(
                    "DELETE FROM idempotency WHERE principal = ? AND source = ? AND key = ?",
                    (principal, source, key),
                )
                row = None  # expired: the key is free again
            if row is None:
                batch_id = new_batch_id()
                conn.execute(
                    "INSERT INTO idempotency VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                    (principal, source, key, body_sha256, batch_id, records, now, owner,
                     now + self.lease_s),
                )  # fmt: skip
                return Outcome("reserved", batch_id, records, owner)
            sha, state, batch_id, stored_records, _, previous_owner, lease_until = row
            if sha != body_sha256:
                return Outcome("conflict", batch_id, int(stored_records))
            if state == "done":
                return Outcome("done", batch_id, int(stored_records))
            if lease_until > now and not _owner_is_dead(previous_owner):
                return Outcome("pending", batch_id, int(stored_records))
            # Stale: its writer died (or stalled past its lease). Did the write complete?
            if self._layout.batch_exists(source, batch_id):
                self._set_done(conn, principal, source, key)
                return Outcome("done", batch_id, int(stored_records))
            conn.execute(
                "UPDATE idempotency SET owner = ?, lease_until = ? "
                "WHERE principal = ? AND source = ? AND key = ?",
                (owner, now + self.lease_s, principal, source, key),
            )
            return Outcome("reserved", batch_id, int(stored_records), owner)

    def publish_guard(
        self, principal: str, source: str, key: str, owner: str
    ) -> Callable[[Callable[[], None]], None]:
        """A :data:`landing_zone.writer.PublishGuard`: publish only while the reservation
        is ``owner``'s, and mark it ``done`` in the same transaction."""

        def guard(publish: Callable[[], None]) -> None:
            with self._transaction() as conn:
                row = conn.execute(
                    "SELECT owner, state FROM idempotency "
                    "WHERE principal = ? AND source = ? AND key = ?",
                    (principal, source, key),
                ).fetchone()
                if row is None or row[0] != owner or row[1] != "pending":
                    raise ReservationLost(f"idempotency key {key!r} was taken over")
                publish()
                self._set_done(conn, principal, source, key)

        return guard

    def release(self, principal: str, source: str, key: str, owner: str) -> None:
        """Give up a reservation whose write failed, so a retry can write.

        If the landing file exists after all (it was published, then the acknowledgement
        failed), the entry is completed instead: a retry must not land it twice.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT owner, state, batch_id FROM idempotency "
                "WHERE principal = ? AND source = ? AND key = ?",
                (principal, source, key),
            ).fetchone()
            if row is not None and row[0] == owner and row[1] == "pending":
                if self._layout.batch_exists(source, row[2]):
                    self._set_done(conn, principal, source, key)
                else:
                    conn.execute(
                        "DELETE FROM idempotency WHERE principal = ? AND source = ? AND key = ?",
                        (principal, source, key),
                    )

    def purge_expired(self) -> int:
        """Delete completed entries older than the window; how many were deleted."""
        with self._transaction() as conn:
            deleted = self._purge(conn, self._clock())
        return deleted

    def entry(self, principal: str, source: str, key: str) -> dict[str, object] | None:
        """The stored entry of a key (for tests and diagnostics)."""
        cursor = self._connect().execute(
            "SELECT * FROM idempotency WHERE principal = ? AND source = ? AND key = ?",
            (principal, source, key),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        return {d[0]: value for d, value in zip(cursor.description, row, strict=True)}

    # ------------------------------------------------------------------ internals

    def _set_done(self, conn: sqlite3.Connection, principal: str, source: str, key: str) -> None:
        conn.execute(
            "UPDATE idempotency SET state = 'done' WHERE principal = ? AND source = ? AND key = ?",
            (principal, source, key),
        )

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        if now - self._last_purge >= PURGE_EVERY_S:
            self._purge(conn, now)

    def _purge(self, conn: sqlite3.Connection, now: float) -> int:
        self._last_purge = now
        cursor = conn.execute(
            "DELETE FROM idempotency "
            "WHERE created_at <= ? AND (state = 'done' OR lease_until <= ?)",
            (now - self.window_s, now),
        )
        return cursor.rowcount
