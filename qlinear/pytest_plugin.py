"""pytest plugin: the ``qlinear_backend`` fixture, parametrised over every registered backend.

Installed through the ``pytest11`` entry point. ``--qlinear-backend=NAME`` (repeatable)
restricts the run to the named backends. A backend that is unavailable here is
reported as *skipped* with its reason, never as passed; with ``--qlinear-require`` the
run stops with an error instead (a CI job that asks for cuda must not go green having
tested nothing).

The cpu backend is run twice: ``cpu`` with the engine it picks here (oneDNN where it can,
see :mod:`qlinear.backends.cpu_engine`) and ``cpu-numpy`` with the numpy engine forced,
skipped with the reason where numpy is what ``cpu`` runs already.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .backends import Backend, backend_names
from .backends import backend as _get_backend
from .errors import BackendUnavailable

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests", "qlinear_backend",
           "CPU_NUMPY"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--qlinear-backend``."""
    group = parser.getgroup("qlinear")
    group.addoption("--qlinear-backend", action="append", default=None, metavar="NAME",
                    help=f"run qlinear_backend tests on this backend only (repeatable); "
                         f"one of {backend_names()}")
    group.addoption("--qlinear-require", action="store_true", default=False,
                    help="fail, instead of skipping, when a selected backend (every "
                         "registered one without --qlinear-backend) is unavailable here")


def _selected(config: pytest.Config) -> list[str]:
    names = config.getoption("qlinear_backend") or backend_names()
    unknown = [n for n in names if n not in backend_names()]
    if unknown:
        raise pytest.UsageError(
            f"--qlinear-backend: expected one of {backend_names()}, got {unknown}")
    return names


def _why(e: BackendUnavailable) -> str:
    return f"qlinear backend {e.backend!r} unavailable: {e.reason}" \
        + (f" (install: {e.install})" if e.install else "")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse an unknown ``--qlinear-backend`` before collection and, with
    ``--qlinear-require``, a selected backend that is unavailable here."""
    names = _selected(config)
    if config.getoption("qlinear_require"):
        missing = []
        for name in names:
            try:
                _get_backend(name)
            except BackendUnavailable as e:
                missing.append(f"{name}: {e.reason}"
                               + (f" (install: {e.install})" if e.install else ""))
        if missing:
            raise pytest.UsageError(
                f"--qlinear-require: expected every selected backend ({', '.join(names)}) "
                f"to be available, got unavailable {'; '.join(missing)}")


#: The parameter that runs the cpu backend with its numpy engine forced.
CPU_NUMPY = "cpu-numpy"


def _params(names: list[str]) -> list[str]:
    return [p for name in names for p in ((name, CPU_NUMPY) if name == "cpu" else (name,))]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that takes ``qlinear_backend`` over the selected backends
    (and ``cpu-numpy`` beside ``cpu``)."""
    if "qlinear_backend" in metafunc.fixturenames:
        params = _params(_selected(metafunc.config))
        metafunc.parametrize("qlinear_backend", params, indirect=True, ids=params)


@pytest.fixture
def qlinear_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A :class:`qlinear.Backend`; skipped with the reason when it is unavailable here
    (failed instead under ``--qlinear-require``). ``cpu-numpy`` is the cpu backend with
    plans selected under ``engine="numpy"`` for the test's duration."""
    name = getattr(request, "param", None) or _selected(request.config)[0]
    try:
        be = _get_backend("cpu" if name == CPU_NUMPY else name)
    except BackendUnavailable as e:
        if request.config.getoption("qlinear_require"):
            pytest.fail(_why(e), pytrace=False)
        pytest.skip(_why(e))
    if name != CPU_NUMPY:
        yield be
        return
    engine = be.engine  # type: ignore[attr-defined]
    if engine.engine == "numpy":
        pytest.skip(f"the cpu backend runs the numpy engine here already: {engine.why}")
    with be.configured(engine="numpy"):  # type: ignore[attr-defined]
        yield be
