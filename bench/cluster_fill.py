"""Question 7: does the default config fill the cluster, with cost-aware shares?

Three parts (``--part``):

  * ``cpu-stages``: CPU seconds per image of the CPU stages (decode, post + write of a map)
    against one forward+backward of EfficientNet-Lite0, both on one thread: the basis of
    ``salmap.pipeline.cluster.CPU_STAGE_WORK`` (the CPUs kept for those stages when actors run on
    CPUs);
  * ``logical``: a local cluster of ``--nodes`` nodes x ``--gpus`` logical GPUs (Ray schedules
    GPUs as logical resources, so this runs on a CPU machine; the actors hold a GPU each and
    run on the CPU) runs a cheap and a costly unit with the default config. The model is
    ``tests/sleepy_model.py`` (each forward takes ``--sleepy-ms`` per image without using a
    CPU), so the timing does not depend on the machine's load. Printed: each unit's pool,
    share, actors and device-seconds from the manifest, and the GPUs held over time (sampled
    from ``ray.available_resources()`` every 0.25 s), which shows whether a GPU freed by the
    unit that finishes first goes to the one still running;
  * ``gpu`` (a CUDA device only): on one GPU, ``auto`` gives the unit's pool the GPU, and the
    images/s of one actor holding it vs two actors sharing it (``gpus_per_actor: 0.5``).

    PYTHONPATH=. python bench/cluster_fill.py --part logical
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import base_parser, header, load_avg, table  # noqa: E402


# -- CPU stages vs a forward+backward --------------------------------------------------------------
def cpu_stages(args) -> list[dict[str, object]]:
    import skimage.data as data
    from PIL import Image
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.pipeline.post import post_batch
    from salmap.workers.actor import ActorSpec, Explainer
    from salmap.workers.models import load_model

    torch.set_num_threads(1)
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    rows = []
    for i, name in enumerate(names * 4):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()[..., :3]).save(buf, format="JPEG", quality=90)
        rows.append({"__key__": f"k{i}", "__url__": "s.tar", "jpg": buf.getvalue()})
    spec = DecodeSpec(("jpg",), "cls", "json", 224, 256, 10**8)
    decode_batch(rows[:2], spec)
    t0 = time.process_time()
    batch = decode_batch(rows, spec)
    decode = (time.process_time() - t0) / len(rows)
    explainer = Explainer(ActorSpec(model={"name": "l", "source": "efficientnet_lite0"},
                                    method="gradcam", device="cpu"))
    out = explainer(batch)
    post_metrics = {"pointing_game": {}, "energy_pointing": {}, "gini": {}, "pseudo_box": {},
                    "pseudo_mask": {}, "box_iou": {}}
    post = {}
    for label, metrics in (("none", {}), ("6 post metrics", post_metrics)):
        post_batch(out, metrics, False)
        t0 = time.process_time()
        table_ = post_batch(out, metrics, False)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(table_, pa.BufferOutputStream(), compression="zstd")
        post[label] = (time.process_time() - t0) / len(rows)
    loaded = load_model("efficientnet_lite0")
    model = loaded.model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def fb():
        xx = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xx).max(1).values.sum(), xx)

    fb()
    t0 = time.process_time()
    for _ in range(3):
        fb()
    fwd_bwd = (time.process_time() - t0) / (3 * len(x))
    sizes = sorted({getattr(data, n)().shape[:2] for n in names})
    print(f"{len(rows)} JPEGs (quality 90) of skimage photos {sizes}, 224 px crop; CPU time, "
          f"1 torch thread\n")
    out_rows = [
        {"stage": "decode + resize + crop", "ms / image": decode * 1000,
         "x Lite0 F+B": decode / fwd_bwd},
        *({"stage": f"post + Parquet (metrics: {k})", "ms / image": v * 1000,
           "x Lite0 F+B": v / fwd_bwd} for k, v in post.items()),
        {"stage": "Lite0 forward+backward to the input", "ms / image": fwd_bwd * 1000,
         "x Lite0 F+B": 1.0},
    ]
    table(out_rows)
    return out_rows


# -- the logical-GPU cluster --------------------------------------------------------------------------
def logical(args) -> list[dict[str, object]]:
    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import jpeg_bytes, write_shard
    from salmap.pipeline.config import load_config
    from salmap.pipeline.run import run_job

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    os.environ["SLEEPY_MS"] = str(args.sleepy_ms)
    slots = args.nodes * args.gpus
    with tempfile.TemporaryDirectory(prefix="salmap-fill-") as tmp:
        shards = []
        for s in range(args.shards):
            path = Path(tmp) / f"shard-{s:06d}.tar"
            write_shard(path, [{"__key__": f"s{s}_{i}", "jpg": jpeg_bytes(s * 10 + i)}
                               for i in range(args.per_shard)])
            shards.append(str(path))
        job = {"run": {"id": "fill", "output": f"{tmp}/out", "report": False,
                       "shards_per_wave": 4},
               "input": {"shards": shards},
               "models": [{"name": "sleepy", "source": "sleepy_model:sleepy_net",
                           "input_size": 32}],
               "methods": [{"name": "gradient"},
                           {"name": "smoothgrad", "params": {"nsamples": args.nsamples}}],
               "resources": {"batch_size": 2, "decode_batch_size": 2},
               "ray": {"progress": "off"}}
        (Path(tmp) / "job.yaml").write_text(json.dumps(job))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": args.node_cpus, "num_gpus": args.gpus, "object_store_memory": 2**27})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.node_cpus, num_gpus=args.gpus,
                             object_store_memory=2**27)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        trace: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                trace.append((time.time(), slots - ray.available_resources().get("GPU", 0)))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            cfg = load_config(str(Path(tmp) / "job.yaml"), [f"ray.address={cluster.address}"])
            t0 = time.time()
            sampler.start()
            result = run_job(cfg, out=lambda _line: None)
            elapsed = time.time() - t0
            done.set()
            sampler.join()
            manifest = json.loads((Path(tmp) / "out" / "fill" / "manifest.json").read_text())
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(f"{args.nodes} nodes x ({args.node_cpus} CPUs, {args.gpus} logical GPUs); sleepy "
          f"model {args.sleepy_ms} ms per image and forward; {args.shards} shards x "
          f"{args.per_shard} images; gradient (2 forwards / image) and SmoothGrad "
          f"({args.nsamples} samples: {args.nsamples + 1} forwards / image); exit "
          f"{result.exit_code}, {elapsed:.1f} s; cluster: "
          f"{ {k: v for k, v in manifest['cluster'].items() if k != 'order'} }\n")
    rows = []
    for uid, u in manifest["units"].items():
        a = u["actors"]
        rows.append({"unit": uid, "cost / image": a["cost_per_image"], "share": a["share"],
                     "pool": str(a["pool"]), "actors": a["actors"], "peak": a["peak"],
                     "devices": json.dumps(a["devices"]), "device-s": a["device_s"],
                     "busy device-s": a["busy_device_s"],
                     "first start s": a["first_start"] - t0, "last end s": a["last_end"] - t0})
    table(rows)
    changes = [(round(t - t0, 2), held) for i, (t, held) in enumerate(trace)
               if i == 0 or held != trace[i - 1][1]]
    print(f"GPUs held by actors (t s since the driver started, GPUs) at each change: {changes}\n")
    return rows


# -- one real GPU ---------------------------------------------------------------------------------------
def one_gpu(args) -> list[dict[str, object]]:
    from salmap.pipeline.config import load_config
    from salmap.pipeline.run import run_job

    from bench.pipeline_efficiency import write_shards

    rows = []
    with tempfile.TemporaryDirectory(prefix="salmap-gpu-") as tmp:
        shards = write_shards(Path(tmp) / "s", args.images, 8, 320, "g")
        warm = write_shards(Path(tmp) / "w", 4 * args.batch, 1, 320, "w")
        for label, overrides in (("auto (1 GPU)", []),
                                 ("2 actors x 0.5 GPU", ["resources.actors_per_unit=2",
                                                         "resources.gpus_per_actor=0.5"])):
            for run_id, files in ((f"warm-{len(rows)}", warm), (f"run-{len(rows)}", shards)):
                job = {"run": {"id": run_id, "output": f"{tmp}/out", "report": False},
                       "input": {"shards": files},
                       "models": [{"name": "lite0", "source": "efficientnet_lite0"}],
                       "methods": [{"name": args.method}],
                       "resources": {"batch_size": args.batch}, "ray": {"progress": "off"}}
                (Path(tmp) / "job.yaml").write_text(json.dumps(job))
                cfg = load_config(str(Path(tmp) / "job.yaml"), overrides)
                t0 = time.perf_counter()
                result = run_job(cfg, out=lambda _line: None)
                elapsed = time.perf_counter() - t0
            manifest = json.loads((Path(tmp) / "out" / run_id / "manifest.json").read_text())
            (unit,) = manifest["units"].values()
            rows.append({"set-up": label, "exit": result.exit_code, "images": args.images,
                         "s": elapsed, "images/s end to end": args.images / elapsed,
                         "pool": str(unit["actors"]["pool"]),
                         "devices": json.dumps(unit["actors"]["devices"]),
                         "busy s / image": unit["actors"]["busy_s_per_image"]})
    table(rows)
    return rows


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", default="auto", choices=["auto", "cpu-stages", "logical", "gpu"],
                        help="auto: cpu-stages and logical, and gpu on a CUDA device")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=2, help="logical GPUs per node")
    parser.add_argument("--node-cpus", type=int, default=4)
    parser.add_argument("--sleepy-ms", type=float, default=150)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=24)
    parser.add_argument("--images", type=int, default=512, help="gpu part")
    parser.add_argument("--method", default="gradcam", help="gpu part")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header("Cluster fill: slots, cost-aware shares, actor accounting", device)
    print(f"{load_avg()}\n")
    parts = ["cpu-stages", "logical", *(["gpu"] if device.type == "cuda" else [])] \
        if args.part == "auto" else [args.part]
    out = {}
    for part in parts:
        print(f"### {part}\n")
        out[part] = {"cpu-stages": cpu_stages, "logical": logical, "gpu": one_gpu}[part](args)
    print(f"after: {load_avg()}")
    return out


if __name__ == "__main__":
    main()
