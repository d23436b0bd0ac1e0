"""Installing salmap without a clone: the wheel carries the example configs and the pinned
torch / torchvision / Ray set (printed with the standard library alone, before the deps are
installed), the README shows the commands, and the build says no warning."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """A wheel built from a copy of the sources with the venv's setuptools (no index needed),
    and what the build printed."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("pipeline", "workers"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    code = ("import sys; from setuptools import build_meta as b; "
            "print('WHEEL', b.build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name = re.search(r"^WHEEL (\S+)$", proc.stdout, re.M).group(1)
    return out / name, proc.stdout + proc.stderr


def test_the_build_prints_no_warning_and_declares_the_spdx_license(wheel):
    path, said = wheel
    assert "Warning" not in said and "deprecated" not in said, said
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta


def test_the_wheel_prints_its_constraints_without_any_dependency(wheel, tmp_path):
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"pipeline/constraints.txt", "pipeline/configs/demo.yaml",
            "pipeline/configs/example.yaml"} <= names
    # -I -S: no site-packages, no PYTHONPATH: what `pip install --no-deps` leaves
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_module('pipeline.constraints', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (REPO / "constraints.txt").read_text()


def test_the_packaged_constraints_are_the_top_level_file():
    assert (REPO / "pipeline" / "constraints.txt").read_text() == \
        (REPO / "constraints.txt").read_text(), \
        "pipeline/constraints.txt is the copy the wheel carries: copy constraints.txt onto it"


def test_salmap_constraints_prints_them(capsys):
    from pipeline.cli import main

    assert main(["constraints"]) == 0
    assert capsys.readouterr().out == (REPO / "constraints.txt").read_text()


def test_the_readme_shows_the_install_without_a_clone():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Installing without a clone"):]
    section = section[:section.index("\n## ", 1)]
    steps = [line.split("#")[0].strip() for line in section.splitlines()
             if line.startswith((".venv/bin/", "python3 -m venv"))]
    assert steps[:5] == [
        "python3 -m venv .venv",
        ".venv/bin/pip install --no-deps SALMAP",
        ".venv/bin/python -m pipeline.constraints > constraints.txt",
        ".venv/bin/pip install -c constraints.txt SALMAP",
        ".venv/bin/salmap init",
    ]
    # CPU-only torch: PyTorch's CPU index, held to the same pins (documented, not reachable here)
    assert (".venv/bin/pip install -c constraints.txt torch torchvision --index-url "
            "https://download.pytorch.org/whl/cpu") in steps
    # the pins the README quotes are the file's
    torch = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert f"`torch=={torch}`" in section and f"`{torch}+cpu`" in section
