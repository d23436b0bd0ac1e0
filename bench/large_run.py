"""A real run at dataset scale on this machine: N small images (64 px) through ``run_job`` with
a small torchvision model at random weights, and images/s over time from the commit times:
the first vs the last quarter of the run (a run must not slow down as it grows), and the fixed
cost (start-up before the pipeline reaches its steady rate) as a share of the run.

    .venv/bin/python bench/large_run.py --images 20000 --per-shard 200
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salmap.pipeline.config import load_config  # noqa: E402
from salmap.pipeline.run import run_job  # noqa: E402

from bench.small_shards import write_shards  # noqa: E402

COMMIT = re.compile(r"committed wave \S+ \((\d+) rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="not used: the job picks its device")
    p.add_argument("--keep", default=None, help="keep the shards and the run in this folder")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.keep or tmp.name)
    t0 = time.perf_counter()
    shards = write_shards(root / "shards", args.images, args.per_shard)
    print(f"wrote {len(shards)} shards of {args.per_shard} images in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cfg = {
        "run": {"id": "large", "output": str(root / "runs"), "report": False},
        "ray": {"progress": "lines"},
        "input": {"shards": shards},
        "models": [{"name": "m", "source": f"torchvision:{args.model}", "weights": "none",
                    "input_size": 64}],
        "methods": [{"name": args.method}],
        "resources": {"batch_size": args.batch_size},
    }
    job = root / "large.yaml"
    job.write_text(json.dumps(cfg))
    commits: list[tuple[float, int]] = []
    start = time.perf_counter()

    def out(line: str) -> None:
        m = COMMIT.search(line)
        if m:
            commits.append((time.perf_counter(), int(m.group(1))))
        print(f"{time.perf_counter() - start:7.1f} s  {line}", file=sys.stderr, flush=True)

    result = run_job(load_config(str(job)), out=out)
    total = time.perf_counter() - start
    assert result.exit_code == 0, result.failures
    rows = sum(n for _, n in commits)
    q = len(commits) // 4

    def rate(part: list[tuple[float, int]], since: float) -> float:
        return sum(n for _, n in part) / (part[-1][0] - since)

    first = rate(commits[:q], commits[0][0]) if q > 1 else float("nan")
    last = rate(commits[-q:], commits[-q - 1][0])
    steady = rate(commits[1:], commits[0][0])
    fixed = (commits[0][0] - start) - commits[0][1] / steady
    print(f"## {args.images} images at 64 px, {args.model} ({args.method}), "
          f"{len(shards)} shards of {args.per_shard}, {len(commits)} commits\n")
    print("| rows | wall s | images/s overall | first quarter | last quarter | last / first | "
          "fixed cost s (share) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {rows} | {total:.0f} | {rows / total:.1f} | {first:.1f} | {last:.1f} | "
          f"{last / first:.2f} | {fixed:.1f} ({100 * fixed / total:.1f}%) |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
