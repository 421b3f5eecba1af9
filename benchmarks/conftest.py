"""Load the qlinear plugin when running from the tree without installing."""

import importlib.metadata
import os

if not any(ep.value == "qlinear.pytest_plugin"
           for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["qlinear.pytest_plugin"]

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
