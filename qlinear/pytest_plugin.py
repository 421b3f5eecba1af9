"""pytest plugin: the ``qlinear_backend`` fixture, parametrised over every registered backend.

Installed through the ``pytest11`` entry point. ``--qlinear-backend=NAME`` (repeatable)
restricts the run to the named backends. A backend that is unavailable here is
reported as *skipped* with its reason, never as passed.
"""

from __future__ import annotations

import pytest

from .backends import Backend, backend_names
from .backends import backend as _get_backend
from .errors import BackendUnavailable

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests", "qlinear_backend"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--qlinear-backend``."""
    group = parser.getgroup("qlinear")
    group.addoption("--qlinear-backend", action="append", default=None, metavar="NAME",
                    help=f"run qlinear_backend tests on this backend only (repeatable); "
                         f"one of {backend_names()}")


def _selected(config: pytest.Config) -> list[str]:
    names = config.getoption("qlinear_backend") or backend_names()
    unknown = [n for n in names if n not in backend_names()]
    if unknown:
        raise pytest.UsageError(
            f"--qlinear-backend: expected one of {backend_names()}, got {unknown}")
    return names


def pytest_configure(config: pytest.Config) -> None:
    """Refuse an unknown ``--qlinear-backend`` before collection."""
    _selected(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that takes ``qlinear_backend`` over the selected backends."""
    if "qlinear_backend" in metafunc.fixturenames:
        names = _selected(metafunc.config)
        metafunc.parametrize("qlinear_backend", names, indirect=True, ids=names)


@pytest.fixture
def qlinear_backend(request: pytest.FixtureRequest) -> Backend:
    """A :class:`qlinear.Backend`; skipped with the reason when it is unavailable here."""
    name = getattr(request, "param", None) or _selected(request.config)[0]
    try:
        return _get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(f"qlinear backend {name!r} unavailable: {e.reason}"
                    + (f" (install: {e.install})" if e.install else ""))
