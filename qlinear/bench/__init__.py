"""What ``qlinear bench`` and the scripts in ``benchmarks/`` need beside the core: the
shapes, the check against the exact reference, timing, floating-point baselines on
each backend, the torch peers, and provenance (commit, date, device) for the figures.

Nothing here is part of the plan interface; the core never imports it.
"""

from .baselines import float_matmul
from .cases import LLM_M, LLM_SHAPES, SMALL_M, SMALL_SHAPES, BenchCase, default_cases
from .provenance import git_commit, run_meta
from .runner import bench, check_plan, format_table
from .timing import median_time

__all__ = ["BenchCase", "default_cases", "LLM_SHAPES", "LLM_M", "SMALL_SHAPES", "SMALL_M",
           "bench", "check_plan", "format_table", "float_matmul", "median_time", "git_commit",
           "run_meta"]
