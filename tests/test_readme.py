"""The README's Python snippets run, in order, as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert "qlinear bench" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
