"""The architecture note names files that exist: it is the map a contributor reads
first, so a moved or renamed module must move it too."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTE = ROOT / "docs" / "architecture.md"
_PATH = re.compile(r"`((?:qlinear|shaders|cuda|tests|benchmarks)/[\w/.]*)`")
_FILE = re.compile(r"`([\w]+\.(?:py|wgsl|cu))`")


def test_every_path_in_the_architecture_note_exists():
    text = NOTE.read_text()
    paths = set(_PATH.findall(text))
    assert len(paths) >= 10
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_file_name_in_the_architecture_note_exists_somewhere():
    text = NOTE.read_text()
    names = set(_FILE.findall(text))
    assert len(names) >= 10
    have = {p.name for d in ("qlinear", "shaders", "cuda", "tests") for p in (ROOT / d).rglob("*")}
    missing = sorted(names - have)
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
