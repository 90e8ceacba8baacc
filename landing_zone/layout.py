"""Where landing files live on disk, and the rules that keep their moves atomic.

```
<data_dir>/landing/<source>/<batch_id>.<ext>       ready for bronze (complete, durable)
<data_dir>/landing/<source>/.tmp/                  being written (never picked up)
<data_dir>/landing/.inflight/<source>/<seq>/       claimed by bronze batch <seq>
<data_dir>/archive/<source>/<yyyy-mm-dd>/          landed in bronze; kept for audit/replay
<data_dir>/quarantine/_files/<source>/             unreadable files, each with <name>.error.json
```

Everything under ``landing/`` is on one filesystem, so claiming is an atomic
``rename``. Hidden names (leading ``.``) are never treated as landing files.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from config.contracts import is_valid_source_name

LANDING_SUFFIXES = (
    ".parquet",
    ".ndjson",
    ".jsonl",
    ".json",
    ".csv",
    ".ndjson.gz",
    ".jsonl.gz",
    ".json.gz",
    ".csv.gz",
)


class InvalidSourceName(ValueError):
    """A source name that could escape its directory or is not a lowercase identifier."""


# The bridges' dead letters travel through the landing zone like a source of their own.
DEAD_LETTERS = "_dead_letters"


def check_source_name(source: str) -> str:
    """Return ``source`` if it is a safe source name, else raise :class:`InvalidSourceName`."""
    if source != DEAD_LETTERS and not is_valid_source_name(source):
        raise InvalidSourceName(
            f"invalid source name {source!r}: use 1-63 lowercase letters, digits or '_', "
            "starting with a letter"
        )
    return source


# Names of the files our own writers make (atomically, complete): <batch id>.parquet.
WRITER_FILE_RE = re.compile(r"^(\d{8}T\d{12}Z-[0-9a-f]{12}|replay-\d{8}T\d{12}Z)\.parquet$")


def is_landing_file(path: Path) -> bool:
    """True for complete landing files: visible names with a supported suffix."""
    return is_landing_name(path.name)


def is_landing_name(name: str) -> bool:
    """:func:`is_landing_file` by file name (for directory scans without paths)."""
    return not name.startswith(".") and name.endswith(LANDING_SUFFIXES)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (the directory entry itself)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each new entry durable (its parent
    fsynced), so that files written in it stay reachable after a crash."""
    missing = []
    path = directory
    while not path.exists():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_directory(new.parent)


# Listings retried when a directory vanishes under them (bronze archiving a claim).
_LISTING_ATTEMPTS = 5


@dataclass(frozen=True)
class LandingLayout:
    """Paths of the landing zone under one data directory."""

    data_dir: Path

    @property
    def landing_root(self) -> Path:
        return self.data_dir / "landing"

    def source_dir(self, source: str) -> Path:
        if source == DEAD_LETTERS:
            return self.dead_letter_dir
        return self.landing_root / check_source_name(source)

    def temp_dir(self, source: str) -> Path:
        return self.source_dir(source) / ".tmp"

    @property
    def dead_letter_dir(self) -> Path:
        """Messages the bridges could not turn into records, waiting for the dead-letter table."""
        return self.landing_root / ".dead_letters"

    def inflight_root(self, source: str) -> Path:
        return self.landing_root / ".inflight" / check_source_name(source)

    def inflight_dir(self, source: str, seq: int) -> Path:
        return self.inflight_root(source) / f"{seq:020d}"

    def archive_dir(self, source: str, day: str) -> Path:
        return self.data_dir / "archive" / check_source_name(source) / day

    def quarantine_files_dir(self, source: str) -> Path:
        return self.data_dir / "quarantine" / "_files" / check_source_name(source)

    def sources_with_files(self) -> list[str]:
        """Sources that have a landing directory or claimed batches (valid names only)."""
        names: set[str] = set()
        for root in (self.landing_root, self.landing_root / ".inflight"):
            if root.is_dir():
                names.update(
                    entry.name
                    for entry in root.iterdir()
                    if entry.is_dir() and is_valid_source_name(entry.name)
                )
        if (
            self.dead_letter_dir.is_dir()
            or (self.landing_root / ".inflight" / DEAD_LETTERS).is_dir()
        ):
            names.add(DEAD_LETTERS)
        return sorted(names)

    def pending_files(self, source: str, settle_s: float = 0.0) -> list[Path]:
        """Complete landing files of ``source`` in arrival order.

        Files our writers made appear atomically, complete. Any other file (copied
        in by hand, scp, a script) counts as complete once it has not changed for
        ``settle_s`` seconds, so a copy in progress is never read half-written.

        Arrival is the rename into the landing folder, which sets the file's
        ctime (mtime can be old: ``rsync -t``, ``cp -p``); ties, common with a
        coarse kernel clock, fall back to the name (API batch ids sort by time).
        """
        directory = self.source_dir(source)
        if not directory.is_dir():
            return []
        settled_before = time.time() - settle_s
        arrived = []
        for path in directory.iterdir():
            if not is_landing_file(path):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # claimed or removed meanwhile
                continue
            if not path.is_file():
                continue
            written_by_us = WRITER_FILE_RE.fullmatch(path.name) is not None
            if not written_by_us and max(stat.st_mtime, stat.st_ctime) > settled_before:
                continue  # possibly still being written
            arrived.append((stat.st_ctime_ns, path.name, path))
        return [path for _, _, path in sorted(arrived)]

    def has_unsettled_files(self, settle_s: float) -> bool:
        """Whether a hand-dropped file is waiting to settle (the processor looks again soon)."""
        for source in self.sources_with_files():
            directory = self.source_dir(source)
            if not directory.is_dir():
                continue
            total = sum(1 for p in directory.iterdir() if p.is_file() and is_landing_file(p))
            if total > len(self.pending_files(source, settle_s)):
                return True
        return False

    def batch_exists(self, source: str, batch_id: str) -> bool:
        """Whether the landing file ``<batch_id>.parquet`` of ``source`` exists anywhere:
        waiting in ``landing/<source>/``, claimed by bronze, archived, or set aside as
        unreadable. A writer's batch id names exactly one file, so this tells whether a
        write under that id (e.g. an interrupted one) became durable.
        """
        name = f"{batch_id}.parquet"
        # Looked for in the order files move (landing, claims, archive, set aside), so a
        # file moving on meanwhile is found further on; a claim directory bronze removes
        # while it is listed is looked through again.
        for attempt in range(_LISTING_ATTEMPTS):
            try:
                if (self.source_dir(source) / name).is_file():
                    return True
                places = [
                    self.inflight_root(source).glob(f"*/*{name}"),  # claimed: a prefix
                    (self.data_dir / "archive" / check_source_name(source)).glob(f"*/{name}"),
                    self.quarantine_files_dir(source).glob(name),
                ]
                return any(any(found) for found in places)
            except FileNotFoundError:
                if attempt == _LISTING_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def inflight_batches(self, source: str) -> list[tuple[int, Path]]:
        """Claimed-but-unfinished bronze batches of ``source`` as ``(seq, dir)``, by seq."""
        root = self.inflight_root(source)
        if not root.is_dir():
            return []
        return sorted(
            (int(entry.name), entry)
            for entry in root.iterdir()
            if entry.is_dir() and entry.name.isdigit()
        )
