"""The wheel: built from the tree, installed into a fresh venv, imported and run there."""

import email.parser
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from the tree."""
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (test extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(ROOT)])
    wheels = list((tmp / "dist").glob("qlinear-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    """The paths in the sdist built from the tree, relative to its top folder."""
    pytest.importorskip("hatchling", reason="building the sdist needs hatchling (test extra)")
    tmp = tmp_path_factory.mktemp("sdist")
    _sh([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp)], cwd=ROOT)
    (sdist,) = tmp.glob("qlinear-*.tar.gz")
    with tarfile.open(sdist) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def _metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(python of a fresh venv holding the wheel, a working directory outside the tree)."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _sh([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    # The dependencies (numpy, ml_dtypes, wgpu) come from this environment, offline; the
    # wheel's own qlinear comes first on the path.
    site = _sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    Path(site, "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    return py, work


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_wheel_imports_from_the_venv(installed):
    py, work = installed
    out = _sh([str(py), "-c", "import qlinear, sys; print(qlinear.__file__)"], cwd=work,
              env=_clean_env())
    assert str(py.parent.parent) in out, f"qlinear imported from {out}, not the venv"


def test_wheel_ships_kernel_sources(installed):
    py, work = installed
    code = ("from qlinear import resources\n"
            "for kind in ('shaders', 'cuda'):\n"
            "    d = resources.resource_dir(kind)\n"
            "    print(kind, str(d), ' '.join(resources.list_sources(kind)))\n")
    out = _sh([str(py), "-c", code], cwd=work, env=_clean_env())
    for line in out.splitlines():
        kind, where, *names = line.split()
        assert "site-packages" in where, f"{kind} found at {where}, not in the wheel"
        tree = sorted(p.name for p in (ROOT / kind).iterdir() if p.is_file())
        assert sorted(names) == tree


def test_wheel_ships_its_type_information(installed):
    """PEP 561: ``py.typed`` beside the package, so type checkers read qlinear's annotations."""
    py, work = installed
    out = _sh([str(py), "-c", "import pathlib, qlinear; "
               "print((pathlib.Path(qlinear.__file__).parent / 'py.typed').is_file())"],
              cwd=work, env=_clean_env())
    assert out.strip() == "True"


def test_console_script_info(installed):
    py, work = installed
    out = _sh([str(py.parent / "qlinear"), "info"], cwd=work, env=_clean_env())
    assert "[cpu] available" in out and "[wgpu]" in out and "[cuda]" in out


def test_wheel_runs_a_plan(installed):
    """One plan end to end from the wheel, on every backend available there (wgpu runs a
    WGSL kernel loaded from the wheel's shaders/)."""
    py, work = installed
    code = """
import numpy as np, qlinear as ql
ran = []
for st in ql.backend_status():
    if not st.available:
        continue
    be = st.backend
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    y_cpu = ql.QuantizedLinear.from_float(w, backend="cpu")(x)
    y = ql.QuantizedLinear.from_float(w, backend=be)(x)
    assert (y.view(np.uint32) == y_cpu.view(np.uint32)).all(), be.name
    ran.append(be.name)
print(' '.join(ran))
"""
    out = _sh([str(py), "-c", code], cwd=work, env=_clean_env())
    import qlinear as ql

    here = {s.name for s in ql.backend_status() if s.available}
    assert here <= set(out.split()), f"ran on {out.split()}, available here: {sorted(here)}"


def test_wheel_ships_the_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist()
                    if re.fullmatch(r"[^/]+\.dist-info/licenses/LICENSE", n)]
        assert len(licenses) == 1, z.namelist()
        assert z.read(licenses[0]).decode() == (ROOT / "LICENSE").read_text()
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "Copyright (c) 2026 the qlinear authors" in (ROOT / "LICENSE").read_text()


def test_wheel_classifiers(wheel):
    classifiers = set(_metadata(wheel).get_all("Classifier"))
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Operating System :: OS Independent" in classifiers
    assert "Topic :: Scientific/Engineering" in classifiers
    # The license is the SPDX License-Expression; PyPI refuses a "License ::" classifier
    # beside it (PEP 639).
    assert not any(c.startswith("License ::") for c in classifiers)


def test_test_extra_does_not_pull_cuda(wheel):
    """The test extra stays light (no 190 MB of CUDA wheels); CI adds the cuda extra. The
    one NVIDIA wheel in it is nvdisasm, a 6 MB disassembler for the machine-code tests."""
    requires = _metadata(wheel).get_all("Requires-Dist")
    test = [r for r in requires if re.search(r"extra\s*==\s*['\"]test['\"]", r)]
    assert any(r.startswith("pytest") for r in test), requires
    assert any(r.startswith("nvidia-cuda-nvdisasm") for r in test), test
    assert not any(re.match(r"(qlinear|cuda|nvidia(?!-cuda-nvdisasm))", r) for r in test), test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test,cuda]'" in ci


def test_sdist_ships_license_docs_examples_and_linked_files(sdist_names):
    for name in ("LICENSE", "CHANGELOG.md", "BENCHMARKS.md", "README.md", "pyproject.toml"):
        assert name in sdist_names
    for folder in ("examples", "docs"):
        tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
        assert tree and tree <= sdist_names, sorted(tree - sdist_names)
    links = re.findall(r"\]\(([^)#\s]+)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local, "the README links to files of the tree"
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which is not in the tree"
        assert link in sdist_names or any(n.startswith(link.rstrip("/") + "/")
                                          for n in sdist_names), link
