"""Wall-clock timing for ``qlinear bench`` (the GPU scripts time with device events)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["TimeStats", "time_stats", "interleaved_stats"]


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


def interleaved_stats(fns: Mapping[str, Callable[[], object]], sync: Callable[[], object],
                      min_seconds: float, max_reps: int, rounds: int = 5,
                      settle: float = 0.1) -> dict[str, TimeStats]:
    """Wall times of several callables (``fn(); sync()`` each) taken in alternating rounds,
    so that drift on a shared machine hits all of them alike: after one uncounted warm-up
    each, every round runs each callable for its share of ``min_seconds`` (at least once,
    at most ``max_reps`` calls over all rounds), each block after a pause of ``settle``
    seconds and one uncounted call: thread pools left spinning by the callable before
    (numpy's BLAS spins about 0.1 s after a call) must not be charged to the next. The
    spread is over the single calls."""
    warm: dict[str, float] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync()
        warm[name] = time.perf_counter() - t0
    rounds = max(1, min(rounds, max_reps))
    share = min_seconds / rounds
    per_round = {name: max(1, min(max_reps // rounds, int(share / max(w, 1e-9))))
                 for name, w in warm.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if len(fns) > 1:
                time.sleep(settle)
                fn()
                sync()
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return {name: TimeStats(min(ts), statistics.median(ts), max(ts), len(ts))
            for name, ts in times.items()}
