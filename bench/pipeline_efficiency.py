"""Question 2: how much of the bare model's speed does the whole ``salmap run`` job keep?

The job (read WebDataset shards -> decode JPEGs -> explain -> post -> write Parquet, on a
local Ray instance) runs in-process through :func:`salmap.pipeline.run.run_job` on synthetic JPEG
shards; the comparison is a bare in-process loop with the same model, method and batch size
on already-decoded tensors (one no-grad forward for the predicted class + the method, as the
actor does; with metrics on, + :func:`compute_model_metrics`).

Ray's start-up is measured apart: the first job starts Ray; later jobs reuse it. Fixed
per-job costs (actor start-up and model load, scheduling, commit) are separated from the
per-image rate by running two sizes, N and 2N images: marginal rate = N / (t(2N) - t(N)).

On a 2-core machine the job's actor gets ``cpus_per_actor`` = 1 CPU (Ray sets the torch
thread count to it) and shares the cores with the read, decode, post and write tasks, while
the bare loop may use both cores: both comparisons are reported (bare loop at the machine's
threads and at 1 thread).

    PYTHONPATH=. python bench/pipeline_efficiency.py --model lite0 --images 64
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import base_parser, header, load_avg, table  # noqa: E402

MODEL_METRICS = ["deletion_auc", "insertion_auc", "average_drop", "confidence_increase"]
POST_METRICS = ["pointing_game", "energy_pointing", "gini", "pseudo_box", "pseudo_mask", "box_iou"]
SOURCES = {"lite0": ("efficientnet_lite0", None), "resnet18": ("torchvision:resnet18", "none"),
           "resnet50": ("torchvision:resnet50", "none")}


def jpeg(seed: int, size: int) -> bytes:
    """A smooth random photo-like JPEG (noise JPEGs decode unrealistically slowly)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, n_images: int, n_shards: int, size: int, prefix: str) -> list[str]:
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n_images // n_shards)
    paths = []
    for s in range(n_shards):
        path = folder / f"{prefix}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(n_images, (s + 1) * per)):
                members = {
                    "jpg": jpeg(i, size),
                    "cls": str(i % 1000).encode(),
                    "json": json.dumps({"boxes": [[size // 8, size // 8, size // 2, size // 2]],
                                        "labels": [i % 1000]}).encode(),
                }
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{prefix}_{i:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def job_config(shards: list[str], output: str, run_id: str, args, metrics: list[str]) -> str:
    source, weights = SOURCES[args.model]
    model = {"name": args.model, "source": source}
    if weights:
        model["weights"] = weights
    return json.dumps({
        "run": {"id": run_id, "output": output, "report": False},
        "input": {"shards": shards},
        "models": [model],
        "methods": [{"name": args.method}],
        "targets": "predicted",
        "metrics": metrics,
        "resources": {"batch_size": args.batch, "actors_per_unit": args.actors,
                      "cpus_per_actor": args.cpus_per_actor, "gpus_per_actor": "auto"},
        "ray": {"num_cpus": args.num_cpus, "progress": "off"},
    })


def run_pipeline(shards: list[str], work: Path, run_id: str, args, metrics: list[str]) -> float:
    """Wall seconds of one ``salmap run`` job (the driver's view, Ray already up or not)."""
    from salmap.pipeline.config import load_config
    from salmap.pipeline.run import run_job

    cfg_path = work / f"{run_id}.yaml"
    cfg_path.write_text(job_config(shards, str(work / "out"), run_id, args, metrics))
    cfg = load_config(str(cfg_path))
    t0 = time.perf_counter()
    result = run_job(cfg, out=lambda _line: None)
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"job {run_id} failed: {result.failures}")
    rows = sum(u["rows"] for u in result.units.values())
    if rows != args.images_of[run_id]:
        raise RuntimeError(f"job {run_id} wrote {rows} rows, expected {args.images_of[run_id]}")
    return elapsed


def bare_loop(args, n_images: int, metrics: list[str], threads: int) -> float:
    """Seconds for the same model + method (+ model metrics) on already-decoded tensors."""
    from salmap.workers.methods import build, get_class
    from salmap.workers.metrics import compute_model_metrics
    from salmap.workers.models import load_model

    source, weights = SOURCES[args.model]
    loaded = load_model(source, weights)
    model = loaded.model.to(memory_format=torch.channels_last)
    params = {"target_layer": loaded.target_layer} if get_class(args.method).uses_target_layer else {}
    method = build(args.method, model, **params)
    g = torch.Generator().manual_seed(0)
    crop = loaded.preprocess.crop
    data = torch.randn(n_images, 3, crop, crop, generator=g).contiguous(
        memory_format=torch.channels_last)
    model_metrics = [m for m in metrics if m in MODEL_METRICS]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for start in range(0, n_images, args.batch):
            x = data[start : start + args.batch]
            with torch.no_grad():
                t = model(x).argmax(1)
            maps = method(x, t)
            if model_metrics:
                compute_model_metrics(model_metrics, lambda z: model(z).float(), x, maps, t,
                                      mean=loaded.preprocess.mean, std=loaded.preprocess.std)
            maps.cpu().numpy()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite0", choices=sorted(SOURCES))
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--images", type=int, default=64, help="N (metrics off); 2N also runs")
    parser.add_argument("--metric-images", type=int, default=16, help="images with metrics on")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--jpeg-size", type=int, default=320)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-metrics", action="store_true", help="skip the metrics-on job")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header("Pipeline efficiency: `salmap run` vs a bare in-process loop", device)
    print(f"model {args.model}, method {args.method}, batch {args.batch}, {args.shards} shards of "
          f"{args.jpeg_size} px JPEGs, actors {args.actors} x {args.cpus_per_actor} CPU, Ray "
          f"num_cpus {args.num_cpus}; {load_avg()}\n")
    import ray

    n, n2, nm = args.images, 2 * args.images, args.metric_images
    machine_threads = torch.get_num_threads()
    all_metrics = MODEL_METRICS + POST_METRICS
    with tempfile.TemporaryDirectory(prefix="salmap-bench-") as tmp:
        work = Path(tmp)
        sets = {k: write_shards(work / k, v, args.shards, args.jpeg_size, k)
                for k, v in (("a", n), ("b", n2), ("m", nm))}
        args.images_of = {"cold": n, "warm-n": n, "warm-2n": n2, "metrics": nm}
        try:
            t_ray = time.perf_counter()
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
            t_ray = time.perf_counter() - t_ray
            times: dict[str, float] = {}
            bare: dict[str, float] = {}
            bare["t1"] = bare_loop(args, n, [], 1)  # also warms the model weights' page cache
            times["cold"] = run_pipeline(sets["a"], work, "cold", args, [])
            bare["tN"] = bare_loop(args, n, [], machine_threads)
            times["warm-n"] = run_pipeline(sets["a"], work, "warm-n", args, [])
            bare["t1"] = min(bare["t1"], bare_loop(args, n, [], 1))
            times["warm-2n"] = run_pipeline(sets["b"], work, "warm-2n", args, [])
            bare["tN"] = min(bare["tN"], bare_loop(args, n, [], machine_threads))
            if not args.no_metrics:
                bare["m1"] = bare_loop(args, nm, all_metrics, 1)
                times["metrics"] = run_pipeline(sets["m"], work, "metrics", args, all_metrics)
                bare["mN"] = bare_loop(args, nm, all_metrics, machine_threads)
        finally:
            ray.shutdown()
    fixed = max(0.0, times["warm-n"] - (times["warm-2n"] - times["warm-n"]))
    marginal = n / max(1e-9, times["warm-2n"] - times["warm-n"])
    bare_n, bare_1 = n / bare["tN"], n / bare["t1"]
    rows = [
        {"job": f"metrics off, {n} images (Ray already up)", "job img/s (end to end)": n / times["warm-n"],
         "job img/s (marginal, N->2N)": marginal, f"bare loop img/s ({machine_threads} threads)": bare_n,
         "bare loop img/s (1 thread)": bare_1, "efficiency (marginal / bare, machine)": marginal / bare_n,
         "efficiency (marginal / bare, 1 thread)": marginal / bare_1,
         "efficiency (end to end / bare, machine)": n / times["warm-n"] / bare_n},
    ]
    if "metrics" in times:
        job_m = nm / max(1e-9, times["metrics"] - fixed)
        bm_n, bm_1 = nm / bare["mN"], nm / bare["m1"]
        rows.append({
            "job": f"metrics on ({len(all_metrics)} metrics), {nm} images",
            "job img/s (end to end)": nm / times["metrics"],
            "job img/s (marginal, N->2N)": job_m,
            f"bare loop img/s ({machine_threads} threads)": bm_n, "bare loop img/s (1 thread)": bm_1,
            "efficiency (marginal / bare, machine)": job_m / bm_n,
            "efficiency (marginal / bare, 1 thread)": job_m / bm_1,
            "efficiency (end to end / bare, machine)": nm / times["metrics"] / bm_n,
        })
    table(rows)
    print(f"ray.init {t_ray:.1f} s; first job (cold: Ray workers, imports) {times['cold']:.1f} s; "
          f"warm job N={n} {times['warm-n']:.1f} s, 2N={n2} {times['warm-2n']:.1f} s -> fixed cost "
          f"per job {fixed:.1f} s (actor start-up, model load, scheduling, commit)"
          + (f"; metrics-on job {times['metrics']:.1f} s (its marginal rate subtracts the same "
             "fixed cost; the bare loop computes the model-side metrics only)"
             if "metrics" in times else "")
          + f". after: {load_avg()}\n")
    return rows


if __name__ == "__main__":
    main()
