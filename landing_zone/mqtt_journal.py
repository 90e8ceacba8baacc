"""The MQTT bridge's redelivery journal: which received messages are landed already.

Why: the bridge acknowledges a QoS 1 message (PUBACK) only once the landing file holding
it is durable (:mod:`landing_zone.mqtt_bridge`). Killed after that but before the broker
has read the PUBACK, or cut off meanwhile, it gets the message again (DUP set, same
packet id, persistent session) and would land it a second time. Silver's key
de-duplication hides that for payloads carrying their own timestamp; a payload without
one is stamped with the receive time, so the copy would be a second reading. With the
journal the bridge recognises the copy and acknowledges it without landing it again:
nothing acknowledged is lost or counted twice.

What it holds, per landed batch: the landing files it writes (their batch ids chosen up
front, the dead-letter file last) and, per file, the identity of each of its messages:
the packet id and a 16-byte BLAKE2b digest of topic and payload. A message is *landed*
when its file exists anywhere the landing layout knows it (waiting, claimed by bronze,
archived, set aside), or when its batch's dead-letter file does: that one is written
last, after every source file was written or, unwritable, dead-lettered into it. Only a
message arriving with DUP is looked up; one without DUP is new and always lands, even if
its packet id is in the journal (ids are reused once acknowledged).

Write-ahead: a batch's record is appended and fsynced *before* its landing files are
written; the rename that makes a landing file durable is what commits it. Killed before
the record, the batch is not in the journal and its copies land; between the record and
the files, the files do not exist and the copies land; after the files and before the
PUBACK, the copies are recognised and only acknowledged. This costs one small appended,
fdatasync'd write per batch.

Bounded: the broker has at most Receive Maximum (R, which the bridge announces)
unacknowledged messages out to us and handles our PUBACKs in order, which we send in
arrival order. So once R more messages have arrived on a connection, every earlier one
on it was acknowledged *and read by the broker*: it cannot come back (a PUBACK merely
sent still can). After a reconnect the broker first resends what it still holds, so
once R messages have arrived on the new connection nothing recorded before it can come
back either. Records past both bounds are dropped, and the file is rewritten with the
live ones only (temp file, fsync, rename, fsync of the directory) once it outgrows twice
their size. A broker without our session (CONNACK without session present) can resend
nothing, and starts packet ids afresh: the bridge empties the journal (:meth:`reset`).

Damage: every record carries its length and a CRC-32. Reading stops at the first one
that does not check out (a kill during an append leaves a torn last record, whose batch
was never written); it and everything after it are ignored with a warning, and the file
is rewritten clean before the next record. Forgetting records can only make a copy land
again (a possible duplicate), never skip a message that was not landed: the safe side.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from landing_zone.layout import fsync_directory, make_durable_dirs
from landing_zone.mqtt_batch import Received
from landing_zone.writer import LandingWriteError

log = structlog.get_logger(__name__)

DIGEST_SIZE = 16
JOURNAL_DIR = Path("_meta") / "mqtt"
MAGIC = b"lakehouse-mqtt-journal/1\n"  # the first bytes of every journal file
_RECORD_HEAD = struct.Struct(">4sII")  # tag, payload length, CRC-32 of the payload
_RECORD_TAG = b"BTCH"
_BATCH_HEAD = struct.Struct(">IH")  # Receive Maximum of its connection, number of files
_COUNT = struct.Struct(">I")
# Appending is cheaper than rewriting; below this size a rewrite is never worth it.
MIN_REWRITE_BYTES = 256 * 1024


class JournalWriteError(LandingWriteError):
    """The journal record of a batch could not be made durable: the batch must not land."""


def message_digest(topic: bytes, payload: bytes) -> bytes:
    """What tells a redelivered message from another one that reuses its packet id."""
    # The topic's length first, so that ("a/b", "c") and ("a/", "bc") differ.
    return hashlib.blake2b(
        len(topic).to_bytes(4, "big") + topic + payload, digest_size=DIGEST_SIZE
    ).digest()


def journal_path(data_dir: Path, host: str, port: int, client_id: str) -> Path:
    """Where the journal of one MQTT session lives: ``<data_dir>/_meta/mqtt/<name>.journal``.

    Packet ids belong to a session, i.e. to a client id on a broker, so the name hashes
    all three. A client id may hold any character: its readable part is only a hint,
    reduced to a safe file name (no separators, no leading dot, bounded length).
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", client_id)[:64]
    key = hashlib.blake2b(f"{host}\0{port}\0{client_id}".encode(), digest_size=8).hexdigest()
    return data_dir / JOURNAL_DIR / f"{readable}-{key}.journal"


@dataclass(frozen=True)
class LandingRef:
    """A landing file by source and batch id (the writer names it ``<batch id>.parquet``)."""

    source: str
    batch_id: str


@dataclass(frozen=True)
class ReceiveWindow:
    """Where the bridge's receiving stands, for the journal's bound (see the module doc).

    ``received`` counts the QoS 1 messages this process has received; ``connection``
    numbers the current connection the way the bridge numbers its batches, and ``start``
    is what ``received`` was when the broker accepted it.
    """

    connection: int
    start: int
    received: int


@dataclass(eq=False)
class _File:
    ref: LandingRef
    mids: bytes  # packet ids, 2 bytes each, big-endian
    digests: bytes  # DIGEST_SIZE bytes each, in the same order


@dataclass(eq=False)
class _Batch:
    files: list[_File]  # the dead-letter file last
    receive_maximum: int  # R of the connection it arrived on
    connection: int  # the bridge's number of that connection; -1: an earlier process
    seen_connection: int  # connection of its latest arrival (a recognised copy counts)
    seen: int  # ReceiveWindow.received at that arrival
    record: bytes  # as written to the file


class _Unreadable(ValueError):
    pass


def _encode(receive_maximum: int, files: Sequence[_File]) -> bytes:
    parts = [_BATCH_HEAD.pack(receive_maximum, len(files))]
    for file in files:
        source, batch_id = file.ref.source.encode(), file.ref.batch_id.encode()
        if len(source) > 255 or len(batch_id) > 255:
            raise ValueError(f"landing file name too long for the journal: {file.ref}")
        count = len(file.mids) // 2
        parts += [bytes((len(source),)), source, bytes((len(batch_id),)), batch_id]
        parts += [_COUNT.pack(count), file.mids, file.digests]
    payload = b"".join(parts)
    return _RECORD_HEAD.pack(_RECORD_TAG, len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> tuple[int, list[_File]]:
    try:
        receive_maximum, count = _BATCH_HEAD.unpack_from(payload, 0)
        pos = _BATCH_HEAD.size
        files = []
        for _ in range(count):
            names = []
            for _ in range(2):
                size = payload[pos]
                names.append(payload[pos + 1 : pos + 1 + size].decode("ascii"))
                pos += 1 + size
            (entries,) = _COUNT.unpack_from(payload, pos)
            pos += _COUNT.size
            mids = payload[pos : pos + 2 * entries]
            pos += 2 * entries
            digests = payload[pos : pos + DIGEST_SIZE * entries]
            pos += DIGEST_SIZE * entries
            if len(digests) != DIGEST_SIZE * entries:
                raise _Unreadable("truncated entries")
            files.append(_File(LandingRef(names[0], names[1]), mids, digests))
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise _Unreadable(str(exc)) from exc
    if pos != len(payload) or not files:
        raise _Unreadable("malformed batch record")
    return receive_maximum, files


def _read(data: bytes) -> tuple[list[tuple[int, list[_File], bytes]], int]:
    """The intact records of a journal file's bytes, and where the readable part ends."""
    if not data.startswith(MAGIC):
        return [], 0
    records = []
    pos = len(MAGIC)
    while pos + _RECORD_HEAD.size <= len(data):
        tag, length, crc = _RECORD_HEAD.unpack_from(data, pos)
        end = pos + _RECORD_HEAD.size + length
        if tag != _RECORD_TAG or end > len(data):
            break
        payload = data[pos + _RECORD_HEAD.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            receive_maximum, files = _decode(payload)
        except _Unreadable:
            break
        records.append((receive_maximum, files, data[pos:end]))
        pos = end
    return records, pos


def journaled_landing_files(data_dir: Path) -> set[LandingRef]:
    """The landing files that the MQTT bridges' journals under ``data_dir`` name.

    A journal tells a redelivered copy from a new message by finding the landing file
    its batch wrote (:meth:`LandingLayout.batch_exists`): a bridge restarted after that
    file left the data directory would land the copy again. Archive pruning keeps these
    files (``ArchiveUploader.prune``). Records past the journal's bound that a rewrite has
    not dropped yet are included: keeping a few files longer is the safe side.
    """
    refs: set[LandingRef] = set()
    directory = data_dir / JOURNAL_DIR
    if not directory.is_dir():
        return refs
    for path in directory.glob("*.journal"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # rewritten meanwhile: the new file is read next time
            continue
        for _maximum, files, _record in _read(data)[0]:
            refs.update(file.ref for file in files)
    return refs


class RedeliveryJournal:
    """Identities of the landed messages that the broker may still redeliver (module doc).

    Thread-safe: the bridge's landing thread records and looks up, its network thread
    resets it when the broker has lost the session.
    """

    def __init__(
        self,
        path: Path,
        receive_maximum: int,
        batches: list[_Batch],
        written: set[LandingRef],
        file_size: int,
    ) -> None:
        """Use :meth:`open`."""
        self.path = path
        self._receive_maximum = receive_maximum
        self._batches = batches
        self._written = written  # landing files known to be durable
        self._file_size = file_size
        self._live_size = sum(len(b.record) for b in batches)
        # The first write rewrites the file: it may end with a torn record, which an
        # append would leave in front of the new one (hiding it from the next read).
        self._rewrite_due = True
        self._index: dict[tuple[int, bytes], tuple[_Batch, _File]] | None = None
        self._epoch = 0
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, path: Path, receive_maximum: int, exists: Callable[[LandingRef], bool]
    ) -> RedeliveryJournal:
        """Load the journal at ``path`` (none yet: an empty one).

        ``exists`` tells whether a landing file was made durable (and may since have
        moved on through bronze). Unreadable records are ignored with a warning (see the
        module doc); an unreadable file (permissions) raises OSError: the bridge must not
        run without knowing what it landed before.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        records, readable = _read(data)
        if readable < len(data):
            log.warning(
                "mqtt.journal_tail_ignored",
                path=str(path),
                records_kept=len(records),
                bytes_ignored=len(data) - readable,
                detail="unreadable journal records (a kill during a write leaves one): "
                "a redelivered message they covered lands again; nothing is skipped",
            )
        batches = []
        written: set[LandingRef] = set()
        for record_maximum, files, record in records:
            durable = {f.ref for f in files if exists(f.ref)}
            if not durable:
                continue  # killed before any of its files: none of its messages is landed
            written |= durable
            batches.append(_Batch(files, record_maximum, -1, -1, -1, record))
        return cls(path, receive_maximum, batches, written, len(data))

    @property
    def epoch(self) -> int:
        """Bumped by :meth:`reset`: batches received before it must not be recorded."""
        return self._epoch

    @property
    def batches(self) -> int:
        """Live batch records (0: nothing to look up)."""
        return len(self._batches)

    @property
    def entries(self) -> int:
        """Message identities held in memory."""
        return sum(len(f.mids) // 2 for b in self._batches for f in b.files)

    @property
    def file_size(self) -> int:
        """Bytes of the journal file as this process last wrote (or read) it."""
        return self._file_size

    def known(
        self,
        messages: Sequence[Received],
        positions: Sequence[int],
        *,
        connection: int,
        seen: int,
        window: ReceiveWindow,
    ) -> list[int]:
        """Which of ``positions`` (messages that arrived with DUP) are landed already.

        Their batch records stay live for another R messages: the PUBACK about to be
        sent for them may be lost too. ``connection`` and ``seen`` are those of the
        batch the messages arrived in.
        """
        with self._lock:
            if not self._batches:
                return []
            self._prune(window)
            index = self._lookup_index()
            hits = []
            for pos in positions:
                mid, _, topic, payload, _ = messages[pos]
                found = index.get((mid, message_digest(topic, payload)))
                if found is None:
                    continue
                batch, file = found
                if file.ref in self._written or batch.files[-1].ref in self._written:
                    hits.append(pos)
                    batch.seen_connection = connection
                    batch.seen = seen
            return hits

    def record(
        self,
        files: Sequence[tuple[LandingRef, Sequence[Received]]],
        *,
        connection: int,
        seen: int,
        window: ReceiveWindow,
        epoch: int,
    ) -> None:
        """Durably record which messages the batch's files will hold, before writing them.

        ``files``: each landing file and its messages, the dead-letter file last (also
        when it holds none yet: it may receive an unwritable source's messages).
        ``epoch``: :attr:`epoch` when the batch was received; a batch of a session the
        broker has lost since is not recorded (nothing of it can come back). Raises
        :class:`JournalWriteError` if the record is not durable: then nothing of the
        batch may be written or acknowledged.
        """
        b2 = hashlib.blake2b
        entries = []
        for ref, messages in files:
            mids = struct.pack(f">{len(messages)}H", *[m[0] for m in messages])
            digests = b"".join(
                [
                    b2(len(t).to_bytes(4, "big") + t + p, digest_size=DIGEST_SIZE).digest()
                    for _, _, t, p, _ in messages
                ]
            )
            entries.append(_File(ref, mids, digests))
        record = _encode(self._receive_maximum, entries)
        with self._lock:
            if epoch != self._epoch:
                return
            self._prune(window)
            batch = _Batch(entries, self._receive_maximum, connection, connection, seen, record)
            self._batches.append(batch)
            self._live_size += len(record)
            try:
                self._persist(record)
            except OSError as exc:
                self._batches.pop()
                self._live_size -= len(record)
                self._index = None
                raise JournalWriteError(
                    exc.errno, f"cannot write the MQTT redelivery journal {self.path}: {exc}"
                ) from exc
            if self._index is not None:
                self._add_to_index(batch)

    def mark_written(self, ref: LandingRef) -> None:
        """``ref`` is durable: its messages count as landed from now on."""
        with self._lock:
            self._written.add(ref)

    def reset(self) -> bool:
        """Forget everything (the broker has no session of ours); True if there was any.

        Durable before it returns: a stale record must never match a message of the new
        session, whose packet ids start afresh. Raises OSError if the file cannot be
        rewritten (the bridge must then not receive: call again).
        """
        with self._lock:
            self._epoch += 1
            had = bool(self._batches)
            self._batches.clear()
            self._written.clear()
            self._live_size = 0
            self._index = None
            if self._file_size > len(MAGIC):  # records (or a torn one) on disk
                self._rewrite()
                had = True
            return had

    # -- internals (called with the lock held) --------------------------------------

    def _prune(self, window: ReceiveWindow) -> None:
        """Drop the records of batches the broker can no longer redeliver."""
        kept = []
        for batch in self._batches:
            if self._may_return(batch, window):
                kept.append(batch)
            else:
                self._written.difference_update(file.ref for file in batch.files)
        if len(kept) == len(self._batches):
            return
        self._batches = kept
        self._live_size = sum(len(b.record) for b in kept)
        self._index = None

    def _may_return(self, batch: _Batch, window: ReceiveWindow) -> bool:
        limit = self._receive_maximum
        # Fewer than R messages arrived since it (or a copy of it) on this connection:
        # the broker may not have read our PUBACK yet.
        if batch.seen_connection == window.connection and window.received - batch.seen < limit:
            return True
        # Recorded on an earlier connection (or process): the broker resends what it
        # still holds first, within the larger of the two connections' windows.
        since_connect = window.received - window.start
        return batch.connection != window.connection and since_connect < max(
            limit, batch.receive_maximum
        )

    def _lookup_index(self) -> dict[tuple[int, bytes], tuple[_Batch, _File]]:
        # Built on demand: only copies (DUP) are looked up, and they are rare.
        if self._index is None:
            self._index = {}
            for batch in self._batches:  # oldest first: a later record of a message wins
                self._add_to_index(batch)
        return self._index

    def _add_to_index(self, batch: _Batch) -> None:
        assert self._index is not None
        for file in batch.files:
            mids = struct.unpack(f">{len(file.mids) // 2}H", file.mids)
            digests = file.digests
            for i, mid in enumerate(mids):
                key = (mid, digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                self._index[key] = (batch, file)

    def _persist(self, record: bytes) -> None:
        grown = self._file_size + len(record)
        if self._rewrite_due or grown > max(2 * (len(MAGIC) + self._live_size), MIN_REWRITE_BYTES):
            self._rewrite()
            return
        try:
            with open(self.path, "ab") as handle:
                handle.write(record)
                handle.flush()
                os.fdatasync(handle.fileno())
        except OSError:
            self._rewrite_due = True  # a partial record may be left at the end
            raise
        self._file_size = grown

    def _rewrite(self) -> None:
        """Replace the file atomically with the live records (temp, fsync, rename, fsync dir)."""
        self._rewrite_due = True
        directory = self.path.parent
        make_durable_dirs(directory)
        temp = directory / f".{self.path.name}.tmp"
        try:
            with open(temp, "wb") as handle:
                handle.write(MAGIC)
                for batch in self._batches:
                    handle.write(batch.record)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_directory(directory)
        self._file_size = len(MAGIC) + self._live_size
        self._rewrite_due = False


__all__ = [
    "DIGEST_SIZE",
    "JOURNAL_DIR",
    "MAGIC",
    "JournalWriteError",
    "LandingRef",
    "ReceiveWindow",
    "RedeliveryJournal",
    "journal_path",
    "message_digest",
]
