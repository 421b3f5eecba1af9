"""The text report of ``qlinear bench``: the qlinear table (time spread, TOPS, ratios),
the baselines' own times, and a legend that names the baseline behind each ratio.

One ratio direction everywhere: baseline time / qlinear time, so > 1 means qlinear is
faster (BENCHMARKS.md uses the same)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .runner import FLOAT_MATMUL

__all__ = ["RATIO_RULE", "format_table", "format_baselines", "format_legend", "format_report"]

RATIO_RULE = "ratio = baseline time / qlinear time (median over median), > 1 means qlinear " \
             "is faster"


def _column(name: str) -> str:
    """The header of baseline ``name``'s ratio column."""
    return "x float mm" if name == FLOAT_MATMUL else f"x {name}"


def _baseline_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every baseline in the rows: the float matmul first, then the peers by name."""
    names = {name for r in rows for name in r.get("baselines", {})}
    return sorted(names, key=lambda name: (name != FLOAT_MATMUL, name))


def _grid(head: list[str], lines: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _fmt(r: dict[str, Any], key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else "-"


def _shape(r: dict[str, Any]) -> list[str]:
    return [r["dtype"], str(r["m"]), str(r["k"]), str(r["n"])]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """qlinear's figures, one line per case: the check, the time spread (min / median /
    max over ``reps`` repetitions), TOPS at the median, and one ratio column per baseline."""
    names = _baseline_names(rows)
    head = ["dtype", "M", "K", "N", "check", "min ms", "median ms", "max ms", "reps", "TOPS"] \
        + [_column(name) for name in names] + ["sku"]
    lines = [_shape(r) + [r.get("check", "-"), _fmt(r, "qlinear_min_ms", ".4f"),
                          _fmt(r, "qlinear_ms", ".4f"), _fmt(r, "qlinear_max_ms", ".4f"),
                          _fmt(r, "qlinear_reps", "d"), _fmt(r, "tops", ".4f")]
             + [_fmt(r, f"vs_{name}", ".2f") for name in names] + [r.get("sku", "-")]
             for r in rows]
    return _grid(head, lines)


def format_baselines(rows: Sequence[dict[str, Any]]) -> str:
    """Each baseline's own time spread, one line per case and baseline ("" when none ran)."""
    lines = [_shape(r) + [_column(name)[2:], _fmt(r, f"{name}_min_ms", ".4f"),
                          _fmt(r, f"{name}_ms", ".4f"), _fmt(r, f"{name}_max_ms", ".4f"),
                          _fmt(r, f"{name}_reps", "d")]
             for r in rows for name in _baseline_names([r])]
    if not lines:
        return ""
    return _grid(["dtype", "M", "K", "N", "baseline", "min ms", "median ms", "max ms", "reps"],
                 lines)


def format_legend(rows: Sequence[dict[str, Any]]) -> str:
    """What the columns mean, naming the baseline of each ratio column."""
    out = ["time: wall time per repetition after one warm-up, min / median / max over reps "
           "repetitions taken in 5 alternating rounds with the baselines, each block after a "
           "0.1 s pause and an uncounted call (qlinear: plan.run + synchronize; a baseline: "
           "one call, which waits)",
           "TOPS: 2*M*K*N / median time",
           RATIO_RULE]
    for name in _baseline_names(rows):
        details = sorted({r["baselines"][name] for r in rows if name in r.get("baselines", {})})
        out.append(f"  {_column(name)}: {' | '.join(details)}")
    if not any(FLOAT_MATMUL in r.get("baselines", {}) for r in rows) and rows:
        out.append("  no float matmul of qlinear's own on this backend: the torch peers, "
                   "where installed, are the baselines")
    return "\n".join(out)


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """The whole report: :func:`format_table`, :func:`format_baselines` (under a title)
    and :func:`format_legend`."""
    parts = [format_table(rows)]
    base = format_baselines(rows)
    if base:
        parts.append("baseline times:\n" + base)
    parts.append(format_legend(rows))
    return "\n\n".join(parts)
