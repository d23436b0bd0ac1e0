"""Mutation testing for salmap's metric formulas and seed methods: do the tests catch wrong numbers?

Each *mutant* is one single-operator change to the AST of one source file (``<`` -> ``<=``,
``+`` -> ``-``, ``a.abs()`` -> ``a``, ``1e-5`` -> ``1.00001``, ``"bilinear"`` -> ``"nearest"``,
...). For every mutant the file's own test files run (``pytest -x``, ``slow`` tests left out);
a mutant *survives* when they all pass. Survivors are either missing tests or equivalent
mutants (a change no correct test can see); TESTING.md keeps the count and the verdicts.

Speed: a parent process imports the heavy third-party modules once (torch, numpy, scipy,
scikit-image, pyarrow, pytest) without running any torch op, then forks one child per mutant;
the child installs an import hook that compiles the mutated AST in place of the file (line
numbers kept) and runs pytest in-process. Nothing is written to the source tree.

Usage (from the repository root)::

    python scripts/mutants.py                           # every target, report to stdout
    python scripts/mutants.py --only road,sparseness     # some targets (by file stem)
    python scripts/mutants.py --out mutants.json --md mutants.md --jobs 2
    python scripts/mutants.py --list --only road         # the mutants, without running them
    python scripts/mutants.py --since mutants.json       # re-run what an earlier run left alive

Equivalent mutants (a change that cannot alter any result, e.g. ``m + offsets`` ->
``m - offsets`` over symmetric offsets) are listed with the reason in
``scripts/mutants-equivalent.txt`` (``file | source line | mutation | why``); they are not run and
are counted apart. ``# pragma: no mutate`` at the end of a line keeps the whole line unmutated.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
M, T = "workers/metrics", "tests"

# file -> the test files that guard it (run in this order, -x: the first failure kills)
TARGETS: dict[str, list[str]] = {
    # the formulas first
    f"{M}/faithfulness.py": [f"{T}/test_metrics_faithfulness.py", f"{T}/test_metrics_road.py",
                             f"{T}/test_metrics_average_drop.py"],
    f"{M}/average_drop.py": [f"{T}/test_metrics_average_drop.py",
                             f"{T}/test_metrics_faithfulness.py"],
    f"{M}/road.py": [f"{T}/test_metrics_road.py", f"{T}/test_metrics_faithfulness.py"],
    f"{M}/pointing.py": [f"{T}/test_metrics_post.py", f"{T}/test_metrics_post_stage.py"],
    f"{M}/sparseness.py": [f"{T}/test_metrics_post.py", f"{T}/test_metrics_post_stage.py"],
    f"{M}/pseudo_labels.py": [f"{T}/test_metrics_post.py"],
    f"{M}/geometry.py": [f"{T}/test_metrics_post.py", f"{T}/test_metrics_post_stage.py"],
    f"{M}/post.py": [f"{T}/test_metrics_post.py", f"{T}/test_metrics_post_stage.py"],
    f"{M}/engine.py": [f"{T}/test_metrics_faithfulness.py", f"{T}/test_metrics_average_drop.py",
                       f"{T}/test_metrics_road.py", f"{T}/test_metrics_summary.py"],
    f"{M}/jobs.py": [f"{T}/test_metrics_jobs.py", f"{T}/test_metrics_faithfulness.py", f"{T}/test_metrics_average_drop.py",
                     f"{T}/test_metrics_road.py"],
    f"{M}/randomization.py": [f"{T}/test_metrics_randomization.py"],
    f"{M}/summary.py": [f"{T}/test_metrics_summary.py"],
    f"{M}/registry.py": [f"{T}/test_metrics_summary.py", f"{T}/test_metrics_post.py",
                         f"{T}/test_metrics_faithfulness.py", f"{T}/test_metrics_average_drop.py",
                         f"{T}/test_metrics_road.py"],
    # the seed methods' cores (DMBP and HDM are iterative optimisers: too slow per mutant)
    "workers/methods/gradcam_pp.py": [f"{T}/test_methods_cam.py"],
    "workers/methods/rectgrad.py": [f"{T}/test_methods_backprop.py"],
    "workers/methods/nobias_rectgrad.py": [f"{T}/test_methods_backprop.py"],
    "workers/methods/tsgb.py": [f"{T}/test_methods_tsgb.py"],
}

BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
              ast.MatMult: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
            ast.In: ast.NotIn, ast.NotIn: ast.In}
NAME_SWAP = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "maximum": "minimum",
             "minimum": "maximum", "floor": "ceil", "ceil": "floor", "clamp_min": "clamp_max",
             "clamp_max": "clamp_min", "argmax": "argmin", "argmin": "argmax", "any": "all",
             "all": "any", "sum": "mean", "mean": "sum"}
DROP_CALLS = {"abs", "relu", "sort", "nan_to_num", "flatten", "float", "double", "detach"}
METHOD_ONLY = {"float", "double"}  # float(x) / double(x) builtins convert types: not mutated
STRING_SWAP = {"bilinear": "nearest", "relu": "abs", "abs": "relu", "signed": "abs",
               "softmax": "logit", "minmax": "max", "pixel": "normalized", "zero": "black",
               "blur": "zero"}


@dataclass
class Mutant:
    file: str
    index: int
    line: int
    what: str
    end_line: int = 0
    tests: int = 0  # tests selected for it (those that run its lines)
    status: str = ""
    seconds: float = 0.0


def _op(node: ast.AST) -> str:
    return {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
            ast.Pow: "**", ast.Mod: "%", ast.MatMult: "@", ast.BitAnd: "&", ast.BitOr: "|",
            ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
            ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
            ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}.get(type(node), type(node).__name__)


class _Skip(ast.NodeVisitor):
    """Marks nodes never to mutate: docstrings, annotations, raise/assert statements,
    f-strings, ``__all__``, lines with ``# pragma: no mutate``."""

    def __init__(self, source: str) -> None:
        self.skip: set[int] = set()
        self.lines = {i + 1 for i, text in enumerate(source.splitlines())
                      if text.rstrip().endswith("# pragma: no mutate")}

    def _mark(self, node: ast.AST | None) -> None:
        if node is not None:
            for sub in ast.walk(node):
                self.skip.add(id(sub))

    def generic_visit(self, node: ast.AST) -> None:
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            self._mark(body[0])
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom)):
            self._mark(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._mark(node.returns)
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                      node.args.vararg, node.args.kwarg]:
                if a is not None:
                    self._mark(a.annotation)
        if isinstance(node, ast.AnnAssign):
            self._mark(node.annotation)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            self._mark(node)
        if getattr(node, "lineno", None) in self.lines:
            self._mark(node)
        super().generic_visit(node)


def _mutations(node: ast.AST) -> list[tuple[str, object]]:
    """The single-operator mutations of one node: (description, replacement spec)."""
    out: list[tuple[str, object]] = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
        new = BINOP_SWAP[type(node.op)]
        out.append((f"{_op(node.op)} -> {_op(new())}", ("binop", new)))
    elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAP:
        new = BINOP_SWAP[type(node.op)]
        out.append((f"{_op(node.op)}= -> {_op(new())}=", ("augop", new)))
    elif isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            if type(op) in CMP_SWAP:
                new = CMP_SWAP[type(op)]
                out.append((f"{_op(op)} -> {_op(new())}", ("cmp", k, new)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{_op(node.op)} -> {_op(new())}", ("boolop", new)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        out.append((f"drop unary {type(node.op).__name__}", ("unwrap",)))
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v} -> {not v}", ("const", not v)))
        elif isinstance(v, int):
            out.append((f"{v} -> {v + 1}", ("const", v + 1)))
        elif isinstance(v, float):
            out.append((f"{v!r} -> {v + 1!r}", ("const", v + 1)))
        elif isinstance(v, str) and v in STRING_SWAP:
            out.append((f"{v!r} -> {STRING_SWAP[v]!r}", ("const", STRING_SWAP[v])))
    elif isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in NAME_SWAP:
            out.append((f"{name}() -> {NAME_SWAP[name]}()", ("rename", NAME_SWAP[name])))
        if name in DROP_CALLS:
            if isinstance(f, ast.Attribute) and not node.args and not (
                    isinstance(f.value, ast.Name) and f.value.id in ("np", "torch", "F", "math")):
                out.append((f"x.{name}() -> x", ("method_to_receiver",)))
            elif len(node.args) == 1 and not node.keywords and name not in METHOD_ONLY:
                out.append((f"{name}(x) -> x", ("call_to_arg",)))
    return out


def _points(tree: ast.AST, source: str) -> list[tuple[ast.AST, str, object]]:
    skip = _Skip(source)
    skip.visit(tree)
    return [(node, what, spec) for node in ast.walk(tree) if id(node) not in skip.skip
            for what, spec in _mutations(node)]


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST, spec: tuple) -> None:
        self.target, self.spec = target, spec

    def visit(self, node: ast.AST) -> ast.AST:
        if node is not self.target:
            return super().visit(node)
        kind = self.spec[0]
        if kind in ("binop", "augop", "boolop"):
            node.op = self.spec[1]()
        elif kind == "cmp":
            node.ops[self.spec[1]] = self.spec[2]()
        elif kind == "unwrap":
            return node.operand if not isinstance(node.op, ast.Not) else node.operand
        elif kind == "const":
            node.value = self.spec[1]
        elif kind == "rename":
            if isinstance(node.func, ast.Attribute):
                node.func.attr = self.spec[1]
            else:
                node.func.id = self.spec[1]
        elif kind == "method_to_receiver":
            return node.func.value
        elif kind == "call_to_arg":
            return node.args[0]
        return node


def mutants_of(path: str) -> list[Mutant]:
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    return [Mutant(path, i, node.lineno, what, node.end_lineno or node.lineno)
            for i, (node, what, _) in enumerate(_points(tree, source))]


EQUIVALENT = Path(__file__).with_name("mutants-equivalent.txt")


def equivalent_keys() -> dict[tuple[str, str, str], str]:
    """(file, stripped source line, mutation) -> why the mutant cannot change a result."""
    out = {}
    if EQUIVALENT.exists():
        for row in EQUIVALENT.read_text().splitlines():
            if row.strip() and not row.startswith("#"):
                file, line, what, why = (part.strip() for part in row.split(" | ", 3))
                out[(file, line, what)] = why
    return out


def _lines_of(since: str, path: str) -> list[str] | None:
    """The source lines a previous run saw (stored next to its JSON), if kept."""
    kept = Path(since).with_suffix(".src") / path
    return kept.read_text().splitlines() if kept.exists() else None


def mutant_keys(path: str, mutants: list[Mutant], lines: list[str] | None = None) -> list[tuple]:
    """A key per mutant that survives edits elsewhere in the file: (file, the stripped source
    line, the mutation, its occurrence among equal pairs)."""
    text = lines if lines is not None else (ROOT / path).read_text().splitlines()
    seen: dict[tuple, int] = {}
    out = []
    for m in mutants:
        base = (path, text[m.line - 1].strip() if 0 < m.line <= len(text) else "", m.what)
        seen[base] = seen.get(base, 0) + 1
        out.append((*base, seen[base]))
    return out


def import_time_lines(path: str) -> set[int]:
    """Lines that run when the module is imported (module and class bodies, decorators,
    signatures with their default values), not inside function bodies: a mutant there
    affects every test."""
    tree = ast.parse((ROOT / path).read_text())
    lines: set[int] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines.update(range(start, node.body[0].lineno))
            elif isinstance(node, ast.ClassDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines.update(range(start, node.body[0].lineno))
                visit(node.body)
            else:
                lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))

    visit(tree.body)
    return lines


def mutated_code(path: str, index: int):
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    node, _, spec = _points(tree, source)[index]
    tree = _Apply(node, spec).visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, str(ROOT / path), "exec")


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


class _Hook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module from a mutated code object."""

    def __init__(self, name: str, code) -> None:
        self.name, self.code = name, code

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        origin = str(ROOT / (fullname.replace(".", "/") + ".py"))
        return importlib.util.spec_from_file_location(fullname, origin, loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.code, module.__dict__)


class _Threads:
    """pytest plugin: one torch thread per child (conftest asks for two; several children
    share the cores)."""

    def pytest_sessionstart(self, session) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("MUTANTS_TORCH_THREADS", "1")))


class _Cover:
    """pytest plugin: which lines of one file each test runs, and how long each test takes."""

    def __init__(self, filename: str) -> None:
        self.filename = os.path.realpath(filename)
        self.current: str | None = None
        self.lines: dict[str, set[int]] = {}
        self.seconds: dict[str, float] = {}
        self._files: dict[str, bool] = {}
        sys.settrace(self._global)

    def _mine(self, name: str) -> bool:
        if name not in self._files:
            self._files[name] = os.path.realpath(name) == self.filename
        return self._files[name]

    def _global(self, frame, event, arg):
        if self.current is None or not self._mine(frame.f_code.co_filename):
            return None
        self.lines[self.current].add(frame.f_lineno)
        return self._local

    def _local(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.lines[self.current].add(frame.f_lineno)
        return self._local

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self.lines.setdefault(item.nodeid, set())

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = None

    def pytest_runtest_logreport(self, report) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration


def _coverage_child(path: str, tests: list[str], out: str) -> None:
    import pytest

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    cover = _Cover(str(ROOT / path))
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", "-o", "addopts=",
                        *tests], plugins=[_Threads(), cover])
    sys.settrace(None)
    Path(out).write_text(json.dumps({"code": int(code), "seconds": cover.seconds,
                                     "lines": {k: sorted(v) for k, v in cover.lines.items()}}))
    os._exit(0)


def baseline(path: str, tests: list[str]) -> dict:
    """Run the tests unmutated, tracing the lines of ``path`` each test runs."""
    out = f"/tmp/mutants-cover-{os.getpid()}.json"
    pid = os.fork()
    if pid == 0:
        try:
            _coverage_child(path, tests, out)
        finally:
            os._exit(99)
    os.waitpid(pid, 0)
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def select_tests(m: Mutant, cover: dict, at_import: set[int]) -> list[str]:
    """The tests that run the mutant's lines (every test when the lines run at import),
    fastest first."""
    span = set(range(m.line, m.end_line + 1))
    by_time = sorted(cover["lines"], key=lambda t: cover["seconds"].get(t, 0.0))
    if span & at_import:
        return by_time
    return [t for t in by_time if span & set(cover["lines"][t])]


def _child(path: str, index: int | None, tests: list[str], quiet: bool) -> None:
    """In the forked child: serve the mutant, run the tests, exit with pytest's code."""
    import pytest

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    if index is not None:
        sys.meta_path.insert(0, _Hook(module_name(path), mutated_code(path, index)))
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    args = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-o", "addopts=",
            *tests]
    code = pytest.main(args, plugins=[_Threads()])
    os._exit(int(code))


def run_one(path: str, index: int | None, tests: list[str], timeout: float,
            quiet: bool = True) -> tuple[str, float]:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            _child(path, index, tests, quiet)
        finally:
            os._exit(99)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    verdict = {0: "survived", 1: "killed", 5: "no tests"}.get(code, f"error {code}")
    return verdict, time.perf_counter() - t0


def _preload() -> None:
    """Import the heavy third-party modules once in the parent (no torch op is run, so the
    forked children start with a clean thread pool)."""
    import importlib

    for name in ("numpy", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "pytest", "PIL.Image",
                 "scipy.ndimage", "scipy.sparse.linalg", "scipy.stats", "skimage.filters",
                 "skimage.measure", "skimage.metrics", "matplotlib.figure",
                 "matplotlib.backends.backend_agg", "torch", "torchvision", "ray", "ray.data",
                 "omegaconf"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra: the tests that need it import it themselves
            pass


def summarize(results: list[Mutant]) -> str:
    """Per-file counts and the list of survivors (a mutant no test runs counts as one)."""
    lines = ["| file | mutants | killed | timeout | equivalent | survived | "
             "of which no test runs it |", "|---|---|---|---|---|---|---|"]
    by_file: dict[str, list[Mutant]] = {}
    for m in results:
        by_file.setdefault(m.file, []).append(m)
    tot = [0, 0, 0, 0, 0, 0]
    for f, ms in by_file.items():
        row = [len(ms), sum(m.status == "killed" or m.status.startswith("error") for m in ms),
               sum(m.status == "timeout" for m in ms), sum(m.status == "equivalent" for m in ms),
               sum(m.status in ("survived", "uncovered") for m in ms),
               sum(m.status == "uncovered" for m in ms)]
        tot = [a + b for a, b in zip(tot, row)]
        lines.append(f"| `{f}` | " + " | ".join(map(str, row)) + " |")
    lines.append("| **total** | " + " | ".join(f"**{v}**" for v in tot) + " |")
    survivors = [m for m in results if m.status in ("survived", "uncovered")]
    if survivors:
        lines += ["", "Surviving mutants:", ""]
        src: dict[str, list[str]] = {}
        for m in survivors:
            text = src.setdefault(m.file, (ROOT / m.file).read_text().splitlines())
            code = text[m.line - 1].strip() if 0 < m.line <= len(text) else ""
            tag = " (no test runs it)" if m.status == "uncovered" else ""
            lines.append(f"- `{m.file}:{m.line}` {m.what}{tag}: `{code}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated file stems (road,sparseness)")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout-factor", type=float, default=3.0,
                    help="a mutant running longer than this many baselines is a timeout")
    ap.add_argument("--since", help="a previous --out JSON: skip the mutants it found killed "
                    "(matched by file, source line text and mutation), run the others")
    ap.add_argument("--out", help="write every mutant's verdict here (JSON)")
    ap.add_argument("--md", help="write the summary table here (Markdown)")
    args = ap.parse_args(argv)
    for out in (args.out, args.md):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    targets = {f: t for f, t in TARGETS.items() if not only or Path(f).stem in only}
    if not targets:
        ap.error(f"--only matched nothing; stems: {', '.join(Path(f).stem for f in TARGETS)}")
    if args.list:
        for f in targets:
            for m in mutants_of(f):
                print(f"{m.file}:{m.line} #{m.index} {m.what}")
        return 0
    earlier: dict[tuple, str] = {}
    if args.since:
        before = [Mutant(**m) for m in json.loads(Path(args.since).read_text())]
        by_file: dict[str, list[Mutant]] = {}
        for m in before:
            by_file.setdefault(m.file, []).append(m)
        for f, ms in by_file.items():
            verdicts = [m.status if m.status != "timeout" else "killed" for m in ms]
            earlier.update(zip(mutant_keys(f, ms, lines=_lines_of(args.since, f)), verdicts))
    _preload()
    results: list[Mutant] = []
    started = time.time()
    for path, tests in targets.items():
        cover = baseline(path, tests)
        if cover["code"] != 0:
            print(f"{path}: the unmutated tests do not pass (pytest exit {cover['code']}); "
                  "fix them first", file=sys.stderr)
            return 2
        at_import = import_time_lines(path)
        todo = mutants_of(path)
        print(f"{path}: {len(todo)} mutants, {len(cover['lines'])} tests, "
              f"{sum(cover['seconds'].values()):.0f} s unmutated", file=sys.stderr, flush=True)
        chosen = [select_tests(m, cover, at_import) for m in todo]
        known = equivalent_keys()
        same = [known.get(k[:3]) is not None for k in mutant_keys(path, todo)]
        for m, eq in zip(todo, same):
            if eq:
                m.status = "equivalent"
                results.append(m)
        chosen = [c for c, eq in zip(chosen, same) if not eq]
        todo = [m for m, eq in zip(todo, same) if not eq]
        if earlier:
            keys = mutant_keys(path, todo)
            skip = [earlier.get(k) == "killed" for k in keys]
            for m, skipped in zip(todo, skip):
                if skipped:
                    m.status = "killed"
                    m.seconds = 0.0
                    results.append(m)
            chosen = [c for c, skipped in zip(chosen, skip) if not skipped]
            todo = [m for m, skipped in zip(todo, skip) if not skipped]
            print(f"  {sum(skip)} killed in {args.since}, {len(todo)} to run", file=sys.stderr,
                  flush=True)

        def one(m: Mutant, ids: list[str], cover=cover, path=path) -> tuple[str, float]:
            m.tests = len(ids)
            if not ids:
                return "uncovered", 0.0
            budget = sum(cover["seconds"].get(t, 1.0) for t in ids)
            return run_one(path, m.index, ids, max(60.0, args.timeout_factor * budget + 20))

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for m, (m.status, m.seconds) in zip(todo, pool.map(one, todo, chosen)):
                results.append(m)
                if m.status in ("survived", "uncovered"):
                    print(f"  {m.status} {m.file}:{m.line} {m.what}", file=sys.stderr,
                          flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps([asdict(m) for m in results], indent=1))
            kept = Path(args.out).with_suffix(".src") / path
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text((ROOT / path).read_text())
    table = summarize(results)
    reused = sum(m.status == "killed" and m.seconds == 0.0 for m in results) if earlier else 0
    head = (f"Mutation run {time.strftime('%Y-%m-%d')}, {len(results)} mutants in "
            f"{(time.time() - started) / 60:.0f} min"
            + (f" ({reused} found killed by {args.since}, not re-run)" if reused else ""))
    print(head + "\n\n" + table)
    if args.md:
        Path(args.md).write_text(head + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
