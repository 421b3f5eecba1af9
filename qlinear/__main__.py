"""``python -m qlinear``: the command line (see :mod:`qlinear.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
