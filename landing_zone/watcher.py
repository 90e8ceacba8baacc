"""Landing watcher: wakes the processor when landing files appear.

Events are only a latency optimisation. Correctness comes from the scans the
processor runs at start-up and every ``rescan_interval_s`` (files that arrived
while nothing watched, lost inotify events), so a missed event costs time,
never data.
"""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from landing_zone.layout import is_landing_file


class _WakeOnLandingFile(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "closed"):
            return
        target = getattr(event, "dest_path", "") or event.src_path
        path = Path(target if isinstance(target, str) else target.decode())
        if is_landing_file(path) and ".tmp" not in path.parts and ".inflight" not in path.parts:
            self._wake.set()


class LandingWatcher:
    """Sets ``wake`` whenever a complete landing file shows up under ``landing_root``."""

    def __init__(self, landing_root: Path, wake: threading.Event) -> None:
        self._landing_root = landing_root
        self._observer = Observer()
        self._handler = _WakeOnLandingFile(wake)

    def start(self) -> None:
        self._landing_root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(self._handler, str(self._landing_root), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
