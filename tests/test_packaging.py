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
    for name in ("pyproject.toml", "README.md", "constraints.txt", "constraints-lock.txt"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("salmap", "pipeline", "workers"):
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
    assert {"salmap/__init__.py", "salmap/pipeline/constraints.txt",
            "salmap/pipeline/configs/demo.yaml", "salmap/pipeline/configs/example.yaml"} <= names
    # one installed package: nothing named pipeline or workers lands in site-packages
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"salmap"}, tops
    # -I -S: no site-packages, no PYTHONPATH: what `pip install --no-deps` leaves
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_module('salmap.pipeline.constraints', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (REPO / "constraints-lock.txt").read_text()


def test_the_packaged_constraints_are_the_lock():
    assert (REPO / "pipeline" / "constraints.txt").read_text() == \
        (REPO / "constraints-lock.txt").read_text(), \
        "pipeline/constraints.txt is the copy the wheel carries: copy constraints-lock.txt onto it"


def test_salmap_constraints_prints_them(capsys):
    from salmap.pipeline.cli import main

    assert main(["constraints"]) == 0
    assert capsys.readouterr().out == (REPO / "constraints-lock.txt").read_text()


def test_the_readme_shows_the_install_without_a_clone():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Installing without a clone"):]
    section = section[:section.index("\n## ", 1)]
    steps = [line.split("#")[0].strip() for line in section.splitlines()
             if line.startswith((".venv/bin/", "python3 -m venv"))]
    assert steps[:5] == [
        "python3 -m venv .venv",
        ".venv/bin/pip install --no-deps SALMAP",
        ".venv/bin/python -m salmap.pipeline.constraints > constraints.txt",
        ".venv/bin/pip install -c constraints.txt SALMAP",
        ".venv/bin/salmap init",
    ]
    # CPU-only torch: PyTorch's CPU index, held to the same pins (documented, not reachable here)
    assert (".venv/bin/pip install -c constraints.txt torch torchvision --index-url "
            "https://download.pytorch.org/whl/cpu") in steps
    # the pins the README quotes are the file's
    torch = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert f"`torch=={torch}`" in section and f"`{torch}+cpu`" in section


def test_every_subpackage_folder_is_installed():
    """pyproject.toml lists the packages by hand (salmap.pipeline is the folder pipeline/):
    a new subpackage folder that is not listed would be missing from every wheel."""
    import tomllib
    from setuptools import find_namespace_packages

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"salmap", "salmap.pipeline", "salmap.workers"}
    for top in ("pipeline", "workers"):  # code and data folders alike (configs/ holds YAML)
        folders |= {f"salmap.{top}.{name}" for name in find_namespace_packages(
            where=str(REPO / top), exclude=["*__pycache__*"])}
    assert listed == folders


def test_import_salmap_is_the_entry_point():
    from salmap.pipeline import api

    import salmap

    assert salmap.Explainer is api.Explainer and salmap.run is api.run
    assert salmap.read is api.read and salmap.maps is api.maps
    assert salmap.__version__ == salmap.pipeline.__version__
