"""Named crash points: the fault-injection hook the crash tests use.

The processor calls :meth:`CrashPoints.reached` at the boundaries that matter
for exactly-once (after a claim, after each Delta commit, mid-archive). With
``LAKEHOUSE_CRASH_AT=point[:n]`` the process SIGKILLs itself the n-th time it
reaches ``point``, which no signal sent from outside can time as precisely.
Unset (always, in production) it does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = frozenset(
    {
        "after_claim",
        "after_bronze_commit",
        "mid_archive",
        "after_quarantine_commit",
        "after_silver_commit",
        "after_gold_commit",
    }
)


class CrashPoints:
    """Counts passes through named points and kills the process at the configured one."""

    def __init__(self, spec: str | None) -> None:
        self._target: str | None = None
        self._remaining = 0
        self._lock = threading.Lock()
        if spec:
            name, _, count = spec.partition(":")
            if name not in POINTS:
                raise ValueError(
                    f"unknown crash point {name!r}; known: {', '.join(sorted(POINTS))}"
                )
            self._target = name
            self._remaining = int(count or "1")

    def reached(self, point: str) -> None:
        """Mark that ``point`` was reached; SIGKILL ourselves if it is the configured pass."""
        if point != self._target:
            return
        with self._lock:  # bronze's look-ahead thread passes the same points
            self._remaining -= 1
            due = self._remaining <= 0
        if due:
            os.kill(os.getpid(), signal.SIGKILL)
