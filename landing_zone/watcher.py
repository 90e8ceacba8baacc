"""Landing watcher: wakes the processor when landing files appear.

Events are only a latency optimisation. Correctness comes from the scans the
processor runs at start-up and every ``rescan_interval_s`` (files that arrived
while nothing watched, lost inotify events), so a missed event costs time,
never data. Only ``landing/`` and each ``landing/<source>/`` are watched, not
the hidden temp and claim directories below them.
"""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from config.contracts import is_valid_source_name
from landing_zone.layout import is_landing_file


def _event_path(event: FileSystemEvent) -> Path:
    target = getattr(event, "dest_path", "") or event.src_path
    return Path(target if isinstance(target, str) else target.decode())


class LandingWatcher:
    """Sets ``wake`` whenever a complete landing file shows up under ``landing_root``."""

    def __init__(self, landing_root: Path, wake: threading.Event) -> None:
        self._landing_root = landing_root
        self._wake = wake
        self._observer = Observer()
        self._watched: set[Path] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._landing_root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_RootHandler(self), str(self._landing_root), recursive=False)
        for entry in self._landing_root.iterdir():
            self.watch_source_dir(entry)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)

    def watch_source_dir(self, directory: Path) -> None:
        """Start watching ``landing/<source>/`` (a new source appeared)."""
        if not (directory.is_dir() and is_valid_source_name(directory.name)):
            return
        with self._lock:
            if directory in self._watched:
                return
            self._observer.schedule(_SourceHandler(self._wake), str(directory), recursive=False)
            self._watched.add(directory)
        self._wake.set()  # files may have landed before the watch existed


class _RootHandler(FileSystemEventHandler):
    def __init__(self, watcher: LandingWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory and event.event_type in ("created", "moved"):
            self._watcher.watch_source_dir(_event_path(event))


class _SourceHandler(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "closed"):
            return
        if is_landing_file(_event_path(event)):
            self._wake.set()
