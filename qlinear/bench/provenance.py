"""Where a figure comes from: commit, date, versions and device, written beside it."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["git_commit", "run_meta"]


def git_commit(where: Path | None = None) -> str:
    """``$QLINEAR_COMMIT`` when set (a copy of the tree without ``.git``, as on a lent GPU
    machine, says which commit it is), else the short commit of the repository holding
    ``where`` (default: qlinear's source tree), or ``"unknown"`` outside a git checkout."""
    named = os.environ.get("QLINEAR_COMMIT", "").strip()
    if named:
        return named
    cwd = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=cwd)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run_meta(backend: str, device: str, **extra: Any) -> dict[str, Any]:
    """The ``meta`` block of a results file: date, commit, qlinear and Python versions,
    backend and device, plus ``extra``."""
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(),
            "qlinear": __version__, "python": platform.python_version(),
            "backend": backend, "device": device, **extra}
