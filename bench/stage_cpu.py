"""CPU per image of each stage of a shared execution, in one process and without Ray.

The stages a run's units of one model go through (read, decode once, one pool per unit,
post + write of every unit), called directly on the photo-like 400x300 JPEGs of
``bench/cpu_per_image.py`` with its tiny model, one torch thread: what the stages cost
themselves, so that the whole-run figure's remainder is what Ray adds (moving batches
between stages, worker processes, daemons). Nothing is stubbed: the rows are written as
Parquet to a local folder, as a run writes them.

    PYTHONPATH=. python bench/stage_cpu.py --images 128 --methods gradient,gradcam
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--methods", default="gradient,gradcam", help="one unit per method")
    p.add_argument("--batch", type=int, default=16, help="images per actor call")
    p.add_argument("--repeat", type=int, default=3, help="timed passes (after one warm-up)")
    p.add_argument("--extra-config", default="{}", help="JSON merged into the config")
    p.add_argument("--device", default="cpu", help="accepted for run_all; the stages run on CPU")
    args = p.parse_args(argv)

    import ray
    import torch
    from salmap.pipeline.config import load_config
    from salmap.pipeline.decode import decode_batch
    from salmap.pipeline.plan import units_of, waves_of
    from salmap.pipeline.run import unit_execution
    from salmap.pipeline.shard_reader import read_shard
    from salmap.pipeline.shared import _PostWriteGroup, link_class
    from salmap.pipeline.storage import Store

    from bench.cpu_per_image import job_config, write_shards

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="salmap-stages-"))
    shards = write_shards(tmp / "shards", args.images, args.images)
    args.num_cpus, args.per_shard = 2, args.images
    cfg_path = tmp / "job.json"
    cfg_path.write_text(json.dumps(job_config(shards, str(tmp / "out"), "t", args)))
    cfg = load_config(str(cfg_path))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the config's resources
    store = Store.open(str(tmp / "out" / "t"))
    exs = [unit_execution(cfg, u, waves_of(shards, 4), store, 1) for u in units_of(cfg)]
    ray.shutdown()
    samples = [r for chunk in read_shard(shards[0], None, chunk=64) for r in chunk][:-1]
    links = [link_class(ex.unit.id, k, False, last=k == len(exs) - 1)(ex.actor_spec)
             for k, ex in enumerate(exs)]
    post = _PostWriteGroup([ex.write for ex in exs])
    cpu: dict[str, float] = {}

    def timed(name: str, fn, *a):
        t = time.process_time()
        out = fn(*a)
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - t
        return out

    def one_pass() -> None:
        for s in range(0, len(samples), 32):
            decoded = timed("decode", decode_batch, samples[s:s + 32], exs[0].decode)
            for b in range(0, len(decoded["sample_id"]), args.batch):
                batch = {c: v[b:b + args.batch] for c, v in decoded.items()}
                for k, link in enumerate(links):
                    batch = timed(f"pool {exs[k].unit.id}", link, batch)
                timed("post + write (all units)", post, batch)

    one_pass()
    cpu.clear()
    for _ in range(args.repeat):
        one_pass()
    n = len(samples) * args.repeat
    print(f"## CPU per image of each stage, one process, no Ray\n\n{time.strftime('%Y-%m-%d')}; "
          f"load average {os.getloadavg()[0]:.1f}; {len(samples)} images x {args.repeat} passes; "
          f"units {', '.join(ex.unit.id for ex in exs)}; one torch thread\n")
    print("| stage | CPU-ms per image |\n|---|---|")
    for name, v in cpu.items():
        print(f"| {name} | {v * 1000 / n:.2f} |")
    total = sum(cpu.values()) * 1000 / n
    print(f"\n**{total:.2f} CPU-ms per image, {total / len(exs):.2f} per image per unit** "
          "(the model's own forwards and backwards included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
