"""Run every benchmark (with small, CPU-friendly sizes on a CPU) and print their Markdown tables.

    make bench                                   # = .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --only methods_vs_peers,precision --device cuda
    .venv/bin/python bench/run_all.py --out bench-results.md

Each script runs in its own subprocess (one at a time: they measure speed), with the
repository on PYTHONPATH. Extra options for a script: ``--args SCRIPT="--flag value"``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("methods_vs_peers", "pipeline_efficiency", "metric_cost", "scaling", "memory",
           "precision", "control_plane", "small_shards", "storage_faults", "method_quality",
           "cluster_fill", "end_of_run", "cpu_per_image", "stage_cpu", "shard_reads", "batch_independence",
           "groundtruth", "analyze_shortcut")
# long end-to-end runs, only with --only (e.g. --only s3_run --args s3_run="--images 100000")
OPTIONAL = ("large_run", "s3_run")
# small sizes that keep the whole run around half an hour on a 2-core CPU (none on CUDA)
CPU_DEFAULTS = {
    "pipeline_efficiency": ["--images", "32", "--metric-images", "8"],
    "metric_cost": ["--batch", "2"],
    "scaling": ["--images", "32"],
    "precision": ["--models", "resnet50", "--batch", "4", "--repeats", "1"],
    "end_of_run": ["--sizes", "10000,1000000"],  # 10^7 rows: run it alone (BENCHMARKS.md)
    # the full size (--train 4000 --test 10000, BENCHMARKS.md section 13): run it alone
    "analyze_shortcut": ["--train", "2000", "--test", "4000"],
}


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated subset of "
                        + ", ".join(SCRIPTS) + "; optional, only when named: " + ", ".join(OPTIONAL))
    parser.add_argument("--device", default=None, help="passed to every script (cpu | cuda)")
    parser.add_argument("--args", action="append", default=[],
                        help='extra options for one script: NAME="--flag value"')
    parser.add_argument("--out", default=None, help="also write everything to this file")
    args = parser.parse_args(argv)
    chosen = [s for s in (args.only.split(",") if args.only else SCRIPTS) if s]
    unknown = [s for s in chosen if s not in SCRIPTS + OPTIONAL]
    if unknown:
        parser.error(f"unknown script(s): {', '.join(unknown)}")
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra.setdefault(name, []).extend(shlex.split(rest))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sink = open(args.out, "w") if args.out else None
    failed = []
    try:
        for name in chosen:
            cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py")]
            if args.device:
                cmd += ["--device", args.device]
            if (args.device or "cpu") == "cpu" and not torch_cuda():
                cmd += CPU_DEFAULTS.get(name, [])
            cmd += extra.get(name, [])
            print(f"<!-- {' '.join(cmd[1:])} -->", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            text = proc.stdout + f"\n_{name}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode}_\n\n"
            print(text, flush=True)
            if sink:
                sink.write(text)
                sink.flush()
            if proc.returncode:
                failed.append(name)
    finally:
        if sink:
            sink.close()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
