"""Launching: launch configurations, programmatic dependent launch (decided once, and
why not), and the launch itself with its one fallback."""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

from ...errors import DeviceError, QlinearWarning

__all__ = ["Launcher"]


class Launcher:
    """Launches loaded kernels for one backend through cuda.core's ``launch``.

    Programmatic dependent launch (PDL, the ``programmatic_stream_serialization`` launch
    attribute) is used for kernels that ask for it (they wait for their producer
    themselves) while :meth:`pdl_enabled`: off with ``QLINEAR_CUDA_PDL=0`` or below sm_90,
    else decided on the first ask by cuda.core's ``LaunchConfig`` accepting it, and
    turned off, with one :class:`~qlinear.errors.QlinearWarning`, when the driver refuses
    a launch with it that it accepts without."""

    def __init__(self, arch: str, arch_number: int) -> None:
        from cuda.core import LaunchConfig, launch

        self._launch = launch
        self._LaunchConfig = LaunchConfig
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self._pdl: bool | None = None  # None until asked
        self._pdl_off = ""
        if os.environ.get("QLINEAR_CUDA_PDL", "1") == "0":
            self._pdl, self._pdl_off = False, "QLINEAR_CUDA_PDL=0"
        elif arch_number < 90:
            self._pdl, self._pdl_off = False, f"{arch} has none (it needs sm_90+)"

    def _config(self, grid: tuple[int, ...], threads: int, pdl: bool) -> Any:
        key = (grid, threads, pdl)
        config = self._configs.get(key)
        if config is None:
            kwargs = {"programmatic_stream_serialization": True} if pdl else {}
            config = self._configs[key] = self._LaunchConfig(grid=grid, block=threads, **kwargs)
        return config

    def pdl_enabled(self) -> bool:
        """Whether kernels marked ``pdl`` are launched with programmatic dependent launch
        (plans ask when selected, so their ``sku`` is truthful)."""
        if self._pdl is None:
            try:
                self._LaunchConfig(grid=(1,), block=(32,), programmatic_stream_serialization=True)
                with self._lock:
                    if self._pdl is None:
                        self._pdl = True
            except Exception as e:
                self._refuse_pdl("cuda.core's LaunchConfig refused it", e)
        return bool(self._pdl)

    def pdl_status(self) -> str:
        """``"on"``, or ``"off: <why>"`` (the setting, the architecture, or the refusal
        with its native error)."""
        return "on" if self.pdl_enabled() else f"off: {self._pdl_off}"

    def _refuse_pdl(self, what: str, error: BaseException) -> None:
        with self._lock:
            if self._pdl is False:  # already off, and said so
                return
            self._pdl = False
            self._pdl_off = f"{what} ({type(error).__name__}: {error})"
        warnings.warn(
            f"cuda: programmatic dependent launch is off from now on: {self._pdl_off}; "
            f"kernels wait for their predecessor in plain stream order instead (results "
            f"are the same). Set QLINEAR_CUDA_PDL=0 to skip it.",
            QlinearWarning, stacklevel=4)

    def launch(self, kernel: Any, name: str, grid: tuple[int, ...], threads: int, pdl: bool,
               stream: Any, *args: Any) -> None:
        """Launch ``kernel`` (``name`` for messages) on ``grid`` blocks of ``threads`` on
        the cuda.core ``stream``; with PDL where ``pdl`` asks for it and it is enabled.
        Raises :class:`DeviceError` with the native error."""
        pdl = pdl and (self._pdl if self._pdl is not None else self.pdl_enabled())
        try:
            self._launch(stream, self._config(grid, threads, pdl), kernel, *args)
            return
        except Exception as e:
            if not pdl:
                raise DeviceError(f"launching {name} on grid {grid} failed",
                                  native=str(e)) from None
            refused = e
        try:
            self._launch(stream, self._config(grid, threads, False), kernel, *args)
        except Exception as e:
            raise DeviceError(f"launching {name} on grid {grid} failed",
                              native=str(e)) from None
        self._refuse_pdl(f"the driver refused launching {name} with it", refused)
