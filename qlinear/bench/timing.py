"""Wall-clock timing for ``qlinear bench`` (the GPU scripts time with device events)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TimeStats", "time_stats"]


@dataclass(frozen=True)
class TimeStats:
    """The spread of one timing, in seconds: fastest, median and slowest repetition, and
    how many repetitions there were."""

    min: float
    median: float
    max: float
    reps: int

    def as_ms(self, prefix: str) -> dict[str, float | int]:
        """The figures as ``{prefix}_ms`` (the median), ``{prefix}_min_ms``,
        ``{prefix}_max_ms`` and ``{prefix}_reps``: the keys of a bench row."""
        return {f"{prefix}_ms": self.median * 1e3, f"{prefix}_min_ms": self.min * 1e3,
                f"{prefix}_max_ms": self.max * 1e3, f"{prefix}_reps": self.reps}


def time_stats(fn: Callable[[], object], sync: Callable[[], object], min_seconds: float,
               max_reps: int) -> TimeStats:
    """Wall time of ``fn(); sync()`` over repetitions (at least 3 unless ``max_reps`` is
    smaller, then until ``min_seconds`` have passed or ``max_reps`` were run), after one
    warm-up that is not counted."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return TimeStats(min(times), statistics.median(times), max(times), len(times))
