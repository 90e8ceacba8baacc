"""Named crash points of the processor: the fault-injection hook the crash tests use.

The processor calls :meth:`CrashPoints.reached` at the boundaries that matter
for exactly-once (after a claim, after each Delta commit, mid-archive). With
``LAKEHOUSE_CRASH_AT=point[:n]`` the process SIGKILLs itself the n-th time it
reaches ``point``, which no signal sent from outside can time as precisely (see
:mod:`config.crash_hook`). Unset (always, in production) it does nothing.
"""

from __future__ import annotations

from config.crash_hook import CrashHook

POINTS = frozenset(
    {
        "after_claim",
        "after_bronze_commit",
        "mid_archive",
        "after_quality_commit",
        "after_quarantine_commit",
        "after_silver_commit",
        "after_gold_commit",
    }
)


class CrashPoints(CrashHook):
    """The processor's points (bronze's look-ahead thread passes them too: counts are locked).

    Points of other components (``mqtt_*``) are theirs, so one ``crash_at`` serves a
    process that runs both (``lakehouse up``).
    """

    def __init__(self, spec: str | None) -> None:
        super().__init__(spec, "", POINTS)
