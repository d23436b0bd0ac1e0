"""The installed test environment is the locked one (constraints-lock.txt).

A fresh ``make test`` resolves every package from the lock, so an upgrade upstream (moto's
policy evaluation, a new numpy) cannot change what the suite runs against without a commit of
the lock. These tests fail when the venv drifts: a package at another version, or one the lock
does not know (installed by hand).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints-lock.txt"
OURSELVES = {"salmap"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pins[canonical(req.name)] = spec.version
    return pins


def installed() -> dict[str, str]:
    """The venv's distributions (its site-packages only: setuptools puts its vendored packages
    on sys.path once imported, and those are not installed)."""
    import sysconfig

    where = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=where)}


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """What differs between the lock and the installed set, one line each."""
    out = []
    for name, version in sorted(have.items()):
        if name in OURSELVES:
            continue
        if name not in pins:
            out.append(f"{name}=={version} is installed but not in the lock")
        elif pins[name] != version.split("+")[0]:
            out.append(f"{name}=={version} is installed, the lock says {pins[name]}")
    return out


def test_the_installed_environment_is_the_locked_one():
    problems = drift(read_pins(LOCK), installed())
    assert not problems, (
        "the venv differs from constraints-lock.txt (rebuild it with `make clean test`, or, for a "
        "deliberate upgrade, `make lock` and commit the file):\n  " + "\n  ".join(problems))


def test_drift_is_detected():
    pins = {"numpy": "2.4.6", "moto": "5.2.6"}
    assert drift(pins, {"numpy": "2.4.6", "moto": "5.2.6", "salmap": "0.1.0"}) == []
    assert drift(pins, {"numpy": "2.5.0", "moto": "5.2.6"}) == [
        "numpy==2.5.0 is installed, the lock says 2.4.6"]
    assert drift(pins, {"numpy": "2.4.6", "moto": "5.2.6", "left-pad": "1.0"}) == [
        "left-pad==1.0 is installed but not in the lock"]


def test_the_lock_covers_the_declared_dependencies_and_keeps_the_hand_pins():
    import tomllib

    pins = read_pins(LOCK)
    hand = read_pins(ROOT / "constraints.txt")
    assert {k: pins.get(k) for k in hand} == hand, "constraints.txt and the lock disagree: make lock"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for line in declared:
        req = Requirement(line)
        name = canonical(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])


# -- no test joins whatever Ray it finds ---------------------------------------------------------
STATE_CALLS = {"list_actors", "list_nodes", "list_tasks", "list_jobs", "list_objects",
               "list_workers", "list_placement_groups", "summarize_tasks",
               "summarize_actors"}


def auto_connections(source: str) -> list[int]:
    """Lines that connect to a Ray found on the machine: ``ray.init(address="auto")`` or a state
    API call without ``address=`` (its default is "auto")."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
            node.func, "id", "")
        kwargs = {k.arg: k.value for k in node.keywords}
        if name == "init" and isinstance(kwargs.get("address"), ast.Constant) and \
                kwargs["address"].value == "auto":
            lines.append(node.lineno)
        elif name in STATE_CALLS and "address" not in kwargs:
            lines.append(node.lineno)
    return lines


def test_no_test_or_benchmark_connects_to_the_ray_it_happens_to_find():
    found = {str(p.relative_to(ROOT)): auto_connections(p.read_text())
             for folder in ("tests", "bench", "pipeline", "workers") for p in (ROOT / folder).rglob("*.py")}
    assert not {k: v for k, v in found.items() if v}, (
        "a second Ray instance on the machine makes these fail: pass the cluster's address")


def test_auto_connections_are_found():
    assert auto_connections("import ray\nray.init(address='auto')\n") == [2]
    assert auto_connections("from ray.util.state import list_actors\nlist_actors(detail=True)\n") == [2]
    assert auto_connections("list_actors(address=a)\nray.init(address=x)\n") == []
