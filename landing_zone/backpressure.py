"""Back-pressure: refuse new data while the landing zone is too full to take it safely.

Writers ask :meth:`BackpressureGate.refusal` before accepting a batch. The landing
backlog (files and bytes waiting for bronze, age of the oldest) and the free space
of the landing file system are measured at most every ``cache_s`` seconds (listing
the landing directories on every request would cost more than the request), so a
bound may be overshot by what arrives within one such interval.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from landing_zone.backlog import measure_backlog
from landing_zone.layout import LandingLayout


@dataclass(frozen=True)
class BackpressureLimits:
    """Bounds past which new batches are refused (``None``: no bound)."""

    max_backlog_files: int | None = None
    max_backlog_bytes: int | None = None
    max_backlog_age_s: float | None = None
    min_free_disk_bytes: int = 0


@dataclass(frozen=True)
class LandingPressure:
    """One measurement of the landing zone."""

    files: int
    bytes: int
    oldest_age_s: float
    free_disk_bytes: int
    measured_at: float  # time.monotonic()


@dataclass(frozen=True)
class Refusal:
    """Why a batch is refused now, and when to try again."""

    code: str  # "backlog_full" or "disk_full"
    message: str
    retry_after_s: int


class BackpressureGate:
    """Cached landing-zone measurements checked against :class:`BackpressureLimits`."""

    def __init__(
        self, layout: LandingLayout, limits: BackpressureLimits, cache_s: float = 0.5
    ) -> None:
        self._layout = layout
        self.limits = limits
        self._cache_s = cache_s
        self._latest: LandingPressure | None = None
        self._lock = threading.Lock()
        self._measuring = False

    @property
    def enabled(self) -> bool:
        limits = self.limits
        return (
            limits.max_backlog_files is not None
            or limits.max_backlog_bytes is not None
            or limits.max_backlog_age_s is not None
            or limits.min_free_disk_bytes > 0
        )

    def cached(self) -> LandingPressure | None:
        """The latest measurement if it is fresh, else ``None`` (call :meth:`measure`)."""
        latest = self._latest
        if latest is not None and time.monotonic() - latest.measured_at < self._cache_s:
            return latest
        return None

    def stale_but_busy(self) -> LandingPressure | None:
        """While another thread measures, the previous measurement (so callers never queue
        behind a slow directory listing); ``None`` if this caller should measure."""
        with self._lock:
            if self._measuring and self._latest is not None:
                return self._latest
            self._measuring = True
            return None

    def measurement_abandoned(self) -> None:
        """The caller of :meth:`stale_but_busy` will not measure after all."""
        with self._lock:
            self._measuring = False

    def measure(self) -> LandingPressure:
        """Measure now (blocking: directory listings and a statvfs) and cache the result."""
        try:
            backlog = measure_backlog(self._layout)
            now = time.time()
            pressure = LandingPressure(
                files=sum(b.files for b in backlog.values()),
                bytes=sum(b.bytes for b in backlog.values()),
                oldest_age_s=max((b.oldest_age_s(now) for b in backlog.values()), default=0.0),
                free_disk_bytes=self._free_bytes(),
                measured_at=time.monotonic(),
            )
            self._latest = pressure
            return pressure
        finally:
            with self._lock:
                self._measuring = False

    def refusal(self, pressure: LandingPressure) -> Refusal | None:
        """Why new data must be refused under ``pressure``, or ``None`` to accept it."""
        limits = self.limits
        if limits.min_free_disk_bytes and pressure.free_disk_bytes < limits.min_free_disk_bytes:
            return Refusal(
                "disk_full",
                f"landing file system has {pressure.free_disk_bytes // 2**20} MiB free, under "
                f"the {limits.min_free_disk_bytes // 2**20} MiB minimum "
                "(LAKEHOUSE_MIN_FREE_DISK_MB); retry later",
                30,
            )
        reasons = []
        if limits.max_backlog_files is not None and pressure.files > limits.max_backlog_files:
            reasons.append(
                f"{pressure.files} files wait for bronze (LAKEHOUSE_MAX_BACKLOG_FILES="
                f"{limits.max_backlog_files})"
            )
        if limits.max_backlog_bytes is not None and pressure.bytes > limits.max_backlog_bytes:
            reasons.append(
                f"{pressure.bytes} bytes wait for bronze (LAKEHOUSE_MAX_BACKLOG_BYTES="
                f"{limits.max_backlog_bytes})"
            )
        if (
            limits.max_backlog_age_s is not None
            and pressure.oldest_age_s > limits.max_backlog_age_s
        ):
            reasons.append(
                f"the oldest landing file waits {pressure.oldest_age_s:.0f} s "
                f"(LAKEHOUSE_MAX_BACKLOG_AGE_S={limits.max_backlog_age_s:g})"
            )
        if reasons:
            return Refusal(
                "backlog_full",
                "landing backlog over its bound: " + "; ".join(reasons) + "; retry later",
                5,
            )
        return None

    def _free_bytes(self) -> int:
        root = self._layout.landing_root
        target = root if root.exists() else self._layout.data_dir
        try:
            stat = os.statvfs(target)
        except OSError:
            return 2**62  # cannot tell: the write itself will answer 507 if space runs out
        return stat.f_bavail * stat.f_frsize
