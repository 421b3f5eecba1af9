"""Wall-clock timing for ``qlinear bench`` (the GPU scripts time with device events)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["median_time"]


def median_time(fn: Callable[[], object], sync: Callable[[], object], min_seconds: float,
                max_reps: int) -> float:
    """Median wall time, in seconds, of ``fn(); sync()`` over repetitions (at least 3,
    then until ``min_seconds`` or ``max_reps``), after one warm-up."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
