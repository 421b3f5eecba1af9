"""pytest plugin: the ``qlinear_backend`` fixture, parametrised over every registered backend.

Installed through the ``pytest11`` entry point. ``--qlinear-backend=NAME`` (repeatable)
restricts the run to the named backends. A backend that is unavailable here is
reported as *skipped* with its reason, never as passed; with ``--qlinear-require`` the
run stops with an error instead (a CI job that asks for cuda must not go green having
tested nothing).
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that takes ``qlinear_backend`` over the selected backends."""
    if "qlinear_backend" in metafunc.fixturenames:
        names = _selected(metafunc.config)
        metafunc.parametrize("qlinear_backend", names, indirect=True, ids=names)


@pytest.fixture
def qlinear_backend(request: pytest.FixtureRequest) -> Backend:
    """A :class:`qlinear.Backend`; skipped with the reason when it is unavailable here
    (failed instead under ``--qlinear-require``)."""
    name = getattr(request, "param", None) or _selected(request.config)[0]
    try:
        return _get_backend(name)
    except BackendUnavailable as e:
        if request.config.getoption("qlinear_require"):
            pytest.fail(_why(e), pytrace=False)
        pytest.skip(_why(e))
