"""Test configuration: load the qlinear plugin when the package is not installed
(running from the tree with PYTHONPATH=.), and hypothesis profiles."""

import importlib.metadata
import os

from hypothesis import HealthCheck, settings

if not any(ep.value == "qlinear.pytest_plugin"
           for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["qlinear.pytest_plugin"]

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

settings.register_profile(
    "ci", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QLINEAR_HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = list(globals().get("pytest_plugins", [])) + ["pytester"]
