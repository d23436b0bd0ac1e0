"""Many small shards vs a few big ones, end to end through ``run_job``: the same images cut
into 200 shards of 2 or 4 shards of 100 (commits of at most 8 shards either way). With one
streaming execution per unit the fixed costs are paid once per unit, not once per wave, so
the ratio should stay near 1 (the goal: at most 2).

    .venv/bin/python bench/small_shards.py [--images 400] [--repeat 2]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salmap.pipeline.config import load_config  # noqa: E402
from salmap.pipeline.run import run_job  # noqa: E402


def jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(folder: Path, images: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, images, per_shard):
        path = folder / f"img-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(images, s + per_shard)):
                data = jpeg(i)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def job(folder: Path, shards: list[str], run_id: str, method: str) -> Path:
    cfg = {
        "run": {"id": run_id, "output": str(folder / "runs"), "report": False},
        "ray": {"progress": "off"},
        "input": {"shards": shards},
        "models": [{"name": "r18", "source": "torchvision:resnet18", "weights": "none",
                    "input_size": 64}],
        "methods": [{"name": method}],
        "resources": {"batch_size": 16},
    }
    path = folder / f"{run_id}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--device", default=None, help="not used: the job picks CUDA when the actors see a GPU")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        layouts = {"4 x 100": write_shards(root / "big", args.images, args.images // 4),
                   "200 x 2": write_shards(root / "small", args.images, 2)}
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for r in range(args.repeat):
            for name, shards in layouts.items():
                run_id = f"{name.replace(' ', '')}-{r}"
                cfg = load_config(str(job(root, shards, run_id, args.method)))
                t0 = time.perf_counter()
                result = run_job(cfg, out=lambda *a: None)
                times[name].append(time.perf_counter() - t0)
                assert result.exit_code == 0, result.failures
        print(f"## {args.images} images, resnet18 at 64 px ({args.method}), "
              f"one local Ray instance (2 CPUs)\n")
        print("| layout | waves | seconds per run (each repeat) | images/s (best) |")
        print("|---|---|---|---|")
        for name, shards in layouts.items():
            waves = -(-len(shards) // 8)
            best = min(times[name])
            print(f"| {name} | {waves} | {', '.join(f'{t:.1f}' for t in times[name])} | "
                  f"{args.images / best:.1f} |")
        ratio = min(times["200 x 2"]) / min(times["4 x 100"])
        print(f"\n200 x 2 / 4 x 100 (best of {args.repeat}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
