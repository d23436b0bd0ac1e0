"""Question 4: does the job scale from 1 to 2 actors, on one node and on two nodes?

Three set-ups run the same ``salmap run`` job (read -> decode -> explain -> post -> write):

  * local Ray, ``actors_per_unit`` = 1;
  * local Ray, ``actors_per_unit`` = 2;
  * a two-node local cluster (:class:`ray.cluster_utils.Cluster`, ``--node-cpus`` logical CPUs
    each), ``actors_per_unit`` = 2.

Each set-up runs N and 2N images; the marginal rate N / (t(2N) - t(N)) removes the fixed
per-job costs (actor start-up, model load, commit). Every actor asks for ``--cpus-per-actor``
CPUs (default 0.5, so that two actors leave room for the read/decode/post tasks on 2 logical
CPUs); Ray gives each actor's torch one thread (probed and printed).

Honest limit: this machine has 2 physical cores. Two actors with one thread each can at best
double the rate of one actor with one thread, the read/decode/post/write tasks compete for the
same two cores, and the "two nodes" are two raylets on the same two cores: the cluster row
shows that nothing assumes one node and what the cross-node object transfer costs, not a
second machine's throughput.

    PYTHONPATH=. python bench/scaling.py --images 48
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import base_parser, header, load_avg, table  # noqa: E402
from bench.pipeline_efficiency import SOURCES, run_pipeline, write_shards  # noqa: E402


def actor_threads(cpus: float) -> int:
    import ray

    @ray.remote(num_cpus=cpus)
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    probe = Probe.remote()
    try:
        return int(ray.get(probe.threads.remote(), timeout=120))
    finally:
        ray.kill(probe)


def measure(label: str, work: Path, sets: dict[str, list[str]], args, actors: int,
            n: int) -> dict[str, object]:
    args.actors = actors
    tag = f"{label}-{actors}a".replace(" ", "_").replace(",", "")  # a fresh run id per set-up
    args.images_of = {f"{tag}-warm": 2 * args.batch, f"{tag}-n": n, f"{tag}-2n": 2 * n}
    run_pipeline(sets["w"], work, f"{tag}-warm", args, [])  # starts workers, loads the model
    t1 = run_pipeline(sets["a"], work, f"{tag}-n", args, [])
    t2 = run_pipeline(sets["b"], work, f"{tag}-2n", args, [])
    return {"set-up": label, "actors": actors, f"t(N={n}) s": t1, f"t(2N={2 * n}) s": t2,
            "img/s end to end (2N)": 2 * n / t2,
            # N / (t(2N) - t(N)); None when noise makes t(2N) <= t(N) (too few images)
            "img/s marginal": n / (t2 - t1) if t2 > t1 else None}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite0", choices=sorted(SOURCES))
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--images", type=int, default=48, help="N; 2N also runs")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--jpeg-size", type=int, default=320)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--node-cpus", type=int, default=1, help="logical CPUs per cluster node")
    parser.add_argument("--no-cluster", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header("Scaling: 1 vs 2 actors, one node and two nodes", device)
    print(f"model {args.model}, method {args.method}, batch {args.batch}, {args.shards} shards, "
          f"{args.cpus_per_actor} CPU per actor, local Ray num_cpus {args.num_cpus}; {load_avg()}\n")
    import ray

    n = args.images
    rows: list[dict[str, object]] = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="salmap-scaling-") as tmp:
        work = Path(tmp)
        sets = {k: write_shards(work / k, v, args.shards, args.jpeg_size, k)
                for k, v in (("w", args.batch * 2), ("a", n), ("b", 2 * n))}
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        try:
            notes.append(f"local actor torch threads: {actor_threads(args.cpus_per_actor)}")
            for actors in (1, 2):
                rows.append(measure(f"local, {args.num_cpus} CPUs", work, sets, args, actors, n))
        finally:
            ray.shutdown()
        if not args.no_cluster:
            from ray.cluster_utils import Cluster

            t0 = time.perf_counter()
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": args.node_cpus,
                                              "object_store_memory": 256 * 1024 * 1024})
            cluster.add_node(num_cpus=args.node_cpus, object_store_memory=256 * 1024 * 1024)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
            notes.append(f"2-node cluster up in {time.perf_counter() - t0:.1f} s")
            try:
                rows.append(measure(f"2 nodes x {args.node_cpus} CPU", work, sets, args, 2, n))
            finally:
                ray.shutdown()
                cluster.shutdown()
    base = rows[0]["img/s end to end (2N)"]
    for r in rows:
        r["speed-up vs 1 actor (end to end, 2N)"] = r["img/s end to end (2N)"] / base
    table(rows)
    print("; ".join(notes) + f". after: {load_avg()}\n")
    return rows


if __name__ == "__main__":
    main()
