"""The qlinear error family.

Every error raised by qlinear is a :class:`QlinearError`. Messages name the
argument at fault, what was expected and what was given.
"""

__all__ = [
    "QlinearError",
    "InvalidProblem",
    "Unsupported",
    "BackendUnavailable",
    "DeviceError",
    "QlinearWarning",
]


class QlinearError(Exception):
    """Base class of every error qlinear raises."""


class InvalidProblem(QlinearError, ValueError):
    """A problem or argument is malformed: bad shape, dtype, range, stride or aliasing."""


class Unsupported(QlinearError, NotImplementedError):
    """A valid problem that this backend (or this dtype on it) cannot run."""


class BackendUnavailable(QlinearError, RuntimeError):
    """A backend cannot be used here; the message says why and what to install."""

    def __init__(self, backend: str, reason: str, install: str = ""):
        self.backend = backend
        self.reason = reason
        self.install = install
        text = f"backend {backend!r} is unavailable: {reason}"
        if install:
            text += f" (to enable it: {install})"
        super().__init__(text)


class DeviceError(QlinearError, RuntimeError):
    """The device failed: compile error (with the compiler log), launch failure,
    device lost, or out of memory. ``native`` holds the underlying message."""

    def __init__(self, message: str, native: str = ""):
        self.native = native
        super().__init__(message + (f"\n{native}" if native else ""))


class QlinearWarning(RuntimeWarning):
    """Something qlinear fell back from at run time (e.g. a launch feature the driver
    refused); results stay correct, the message says what changed and why."""
