"""Named crash points below the processor: the fault-injection hook of the crash tests.

``LAKEHOUSE_CRASH_AT=point[:n]`` (:attr:`config.settings.Settings.crash_at`) makes the
process SIGKILL itself the n-th time it reaches ``point``: a kill timed exactly between
two steps that matter for durability (a landing file made durable, its acknowledgement
not sent yet), which no signal sent from outside can time. Each component owns the
points named with its prefix (the MQTT bridge: ``mqtt_*``) and ignores the others, so
one setting serves a process running several of them. Unset (always, in production) it
does nothing.

It lives here, at the bottom of the import stack, so the landing zone can use it; the
processor's points (``delta_processing.crashpoints``) are the unprefixed ones.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable

# Prefixes of the components other than the processor, whose points have no prefix.
COMPONENT_PREFIXES = ("mqtt_",)


class CrashHook:
    """Counts passes through one component's named points and kills the process at the set one."""

    def __init__(self, spec: str | None, prefix: str, points: Iterable[str]) -> None:
        """``spec`` is ``point[:n]``; a point without ``prefix`` belongs to another component
        (``prefix`` empty: the processor, whose points carry none of the components').

        Raises ValueError for a point with ``prefix`` that is not one of ``points`` (a typo
        would otherwise leave a crash test silently crash-free) or a bad count.
        """
        self._target: str | None = None
        self._remaining = 0
        self._lock = threading.Lock()
        if not spec:
            return
        name, _, count = spec.partition(":")
        theirs = name.startswith(COMPONENT_PREFIXES) if not prefix else False
        if theirs or not name.startswith(prefix):
            return
        known = frozenset(points)
        if name not in known:
            raise ValueError(f"unknown crash point {name!r}; known: {', '.join(sorted(known))}")
        remaining = int(count or "1")
        if remaining < 1:
            raise ValueError(f"crash point {spec!r}: the pass count must be at least 1")
        self._target = name
        self._remaining = remaining

    @property
    def armed(self) -> bool:
        """Whether one of this component's points is set to kill the process."""
        return self._target is not None

    def reached(self, point: str) -> None:
        """Mark that ``point`` was reached; SIGKILL ourselves if it is the configured pass."""
        if point != self._target:
            return
        with self._lock:  # points may be passed by several threads
            self._remaining -= 1
            due = self._remaining <= 0
        if due:
            os.kill(os.getpid(), signal.SIGKILL)
