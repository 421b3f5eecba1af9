"""What ``qlinear bench`` and the scripts in ``benchmarks/`` need beside the core: the
shapes, the check against the exact reference, timing, floating-point baselines on
each backend, the torch peers, and provenance (commit, date, device) for the figures.

Nothing here is part of the plan interface; the core never imports it.
"""

from .baselines import float_matmul, float_matmul_detail
from .cases import LLM_M, LLM_SHAPES, SMALL_M, SMALL_SHAPES, BenchCase, default_cases
from .provenance import git_commit, run_meta
from .runner import FLOAT_MATMUL, bench, check_plan, check_timing
from .table import RATIO_RULE, format_baselines, format_legend, format_report, format_table
from .timing import TimeStats, interleaved_stats, time_stats

__all__ = ["BenchCase", "default_cases", "LLM_SHAPES", "LLM_M", "SMALL_SHAPES", "SMALL_M",
           "bench", "check_plan", "check_timing", "FLOAT_MATMUL", "RATIO_RULE", "format_table",
           "format_baselines", "format_legend", "format_report", "float_matmul",
           "float_matmul_detail", "TimeStats", "time_stats", "interleaved_stats", "git_commit",
           "run_meta"]
