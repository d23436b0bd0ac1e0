"""How many CPUs does a GPU need? Marginal CPU-ms per image per unit of a whole ``salmap run``.

A whole ``salmap run`` (driver, its own local Ray instance: GCS, raylet, workers, the read,
decode, actor, post and write tasks) runs as a subprocess at two dataset sizes, N and 4N
photo-like JPEGs of about 400x300 (crops of the scikit-image sample photos), with a model
whose own cost is negligible (``bench.tiny_model:tiny_net``: one stride-4 convolution) and
the default outputs (no metrics). The CPU time counted is that of the whole process tree of
the run and nothing else: this process makes itself the child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every process the run starts stays below it in the process
tree, orphaned or not, and :class:`TreeCPU` sums the user + system time of every process of
that tree, sampled from /proc every 0.2 s (other agents' processes never count).

    marginal CPU-ms per image per unit = (CPU(4N) - CPU(N)) / (3N x units)

Wall time on a shared machine means little; CPU seconds do not depend on the load (cache
and memory-bandwidth effects aside).

    PYTHONPATH=. python bench/cpu_per_image.py --images 100 --methods gradcam,gradient
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (Ray's daemons after the driver exits) are reparented to this
    process, so their CPU time reaches our RUSAGE_CHILDREN when we reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed (Linux only)")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, int, float] | None:
    """(ppid, start time, user + system seconds of the process itself) from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLK_TCK


class TreeCPU:
    """CPU seconds of every process below this one (the run and whatever it starts, orphans
    reparented to this subreaper included), sampled from /proc every ``interval`` seconds:
    the last value seen of each process counts (it loses at most one interval of a process
    that exits between samples). Children's CPU is not read from RUSAGE_CHILDREN: Ray's
    raylet ignores SIGCHLD, so its workers' CPU never reaches their parent's counters."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.seen: dict[tuple[int, int], float] = {}
        self.kind: dict[tuple[int, int], str] = {}
        # CPU by what the process was doing: the growth since the last sample goes to its
        # title then (Ray names a worker after the task or actor it runs)
        self.by_role: dict[str, float] = {}
        self.pids_of_role: dict[str, set[int]] = {}

    def sample(self) -> None:
        me = os.getpid()
        stats = _tree_stats()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(children.get(me, []))
        while stack:
            pid = stack.pop()
            _, start, cpu = stats[pid]
            before = self.seen.get((pid, start), 0.0)
            role = None
            if cpu > before:
                role = _role(pid, stats[pid][0] == me)
                self.by_role[role] = self.by_role.get(role, 0.0) + cpu - before
                self.pids_of_role.setdefault(role, set()).add(pid)
            self.seen[(pid, start)] = max(cpu, before)
            if (pid, start) not in self.kind or self.kind[(pid, start)] == "daemons":
                self.kind[(pid, start)] = _kind(role or _role(pid, stats[pid][0] == me))
            stack.extend(children.get(pid, []))

    def total(self, kind: str | None = None) -> float:
        return sum(v for k, v in self.seen.items() if kind is None or self.kind.get(k) == kind)


def _kind(role: str) -> str:
    """``workers``: the driver and Ray's worker processes (tasks and actors: the per-image
    work); ``daemons``: GCS, raylet, dashboard, monitors (their CPU grows with wall time)."""
    return "workers" if role == "driver" or role.startswith("ray::") else "daemons"


def _role(pid: int, top: bool) -> str:
    """What the process is: the driver, a Ray task or actor by its title (``ray::<name>``,
    arguments dropped), or a daemon by its executable's name."""
    if top:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    head = argv[0].decode(errors="replace")
    if head.startswith("ray::"):
        return head.split(" ")[0][:60]
    words = [os.path.basename(a.decode(errors="replace")) for a in argv if a][:3]
    return " ".join(w for w in words if not w.startswith("-"))[:60] or "?"


def reap_all(tree: TreeCPU, grace_s: float = 60.0) -> int:
    """Sample and wait until no process is left below this one (Ray's daemons exit after the
    driver); past ``grace_s`` SIGKILL the ones still alive (they are this run's, by pid).
    Returns how many were killed."""
    deadline, killed = time.monotonic() + grace_s, 0
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        tree.sample()
        left = [pid for pid, (ppid, _, _) in _tree_stats().items() if ppid == os.getpid()]
        if not left:
            return killed
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10.0
        time.sleep(0.2)


def _tree_stats() -> dict[int, tuple[int, int, float]]:
    return {int(p): s for p in os.listdir("/proc") if p.isdigit() for s in [_stat(p)] if s}


def photos() -> list:
    """Photo-like 400x300 RGB crops of the scikit-image sample photos (and their mirrors)."""
    import numpy as np
    from skimage import data

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              np.stack([data.camera()] * 3, -1)]
    crops = []
    for img in images:
        h, w = img.shape[:2]
        for top, left in ((0, 0), (max(0, h - 300), max(0, w - 400))):
            c = img[top:top + 300, left:left + 400]
            crops += [c, c[:, ::-1]]
    return crops


def write_shards(folder: Path, n_images: int, per_shard: int) -> list[str]:
    from PIL import Image

    crops = photos()
    encoded = []
    for i, c in enumerate(crops):
        buf = io.BytesIO()
        Image.fromarray(c).save(buf, format="JPEG", quality=85 + i % 10)
        encoded.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(-(-n_images // per_shard)):
        path = folder / f"photos-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
                for suffix, blob in (("jpg", encoded[i % len(encoded)]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"img_{i:06d}.{suffix}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        paths.append(str(path))
    return paths


def job_config(shards: list[str], output: str, run_id: str, args) -> dict:
    cfg = _base_config(shards, output, run_id, args)
    for key, value in json.loads(args.extra_config).items():  # merged one level deep
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def _base_config(shards: list[str], output: str, run_id: str, args) -> dict:
    return {
        "run": {"id": run_id, "output": output, "report": False},
        "input": {"shards": shards},
        "models": [{"name": "tiny", "source": "bench.tiny_model:tiny_net", "weights": "none",
                    "target_layer": "features"}],
        "methods": [{"name": m} for m in args.methods.split(",")],
        "targets": "predicted",
        "resources": {"batch_size": args.batch, "actors_per_unit": 1, "cpus_per_actor": 0.5},
        "ray": {"num_cpus": args.num_cpus, "progress": "off", "include_dashboard": False},
    }


def run_once(work: Path, n_images: int, args, tag: str, tries: int = 6) -> dict:
    """One run; again (up to ``tries``) when Ray could not start on a loaded machine."""
    for attempt in range(1, tries + 1):
        try:
            return _run_once(work, n_images, args, f"{tag}{attempt}" if attempt > 1 else tag)
        except RuntimeError as err:
            if "timed out during startup" not in str(err) or attempt == tries:
                raise
            print(f"<!-- {tag}: Ray did not start in time; again -->", file=sys.stderr)
    raise AssertionError("unreachable")


def _run_once(work: Path, n_images: int, args, tag: str) -> dict:
    shards = write_shards(work / f"shards-{tag}", n_images, args.per_shard)
    cfg = work / f"{tag}.json"
    cfg.write_text(json.dumps(job_config(shards, str(work / "out"), tag, args)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    tree = TreeCPU()
    t0 = time.perf_counter()
    log = open(work / f"{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "salmap.pipeline.cli", "run", str(cfg)], cwd=work,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        tree.sample()
        time.sleep(tree.interval)
    log.close()
    killed = reap_all(tree)
    wall = time.perf_counter() - t0
    cpu = tree.total()
    if proc.returncode != 0:
        text = (work / f"{tag}.log").read_text()[-3000:]
        raise RuntimeError(f"salmap run ({tag}) exited {proc.returncode}:\n{text}")
    return {"images": n_images, "cpu_s": cpu, "wall_s": wall, "killed": killed,
            "workers_s": tree.total("workers"), "daemons_s": tree.total("daemons"),
            "by_role": dict(tree.by_role),
            "processes": {r: len(p) for r, p in tree.pids_of_role.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100, help="N: the runs have N and 4N images")
    p.add_argument("--methods", default="gradcam,gradient", help="one unit per method")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=2, help="the run's Ray CPUs")
    p.add_argument("--extra-config", default="{}",
                   help="JSON merged into the config, one level deep (e.g. resources.share_decode)")
    p.add_argument("--device", default="cpu", help="accepted for run_all; the model is on CPU")
    args = p.parse_args(argv)
    become_subreaper()
    units = len(args.methods.split(","))
    with tempfile.TemporaryDirectory(prefix="salmap-cpu-") as tmp:
        work = Path(tmp)
        small = run_once(work, args.images, args, "small")
        large = run_once(work, 4 * args.images, args, "large")
    delta_images = large["images"] - small["images"]
    marginal = (large["cpu_s"] - small["cpu_s"]) * 1000.0 / (delta_images * units)
    print("## Marginal CPU per image per unit of a whole salmap run\n")
    print(f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; model bench.tiny_model:tiny_net; {units} unit(s) "
          f"({args.methods}); ~400x300 JPEGs, {args.per_shard} per shard; default outputs, "
          "no metrics; CPU = user + system of every process of the run\n")
    print("| images | CPU s (whole tree) | of which driver + Ray workers | of which Ray daemons | wall s |")
    print("|---|---|---|---|---|")
    for r in (small, large):
        print(f"| {r['images']} | {r['cpu_s']:.1f} | {r['workers_s']:.1f} | {r['daemons_s']:.1f} "
              f"| {r['wall_s']:.1f} |")
    work = (large["workers_s"] - small["workers_s"]) * 1000.0 / (delta_images * units)
    print(f"\nmarginal of the driver + Ray workers alone: {work:.2f} CPU-ms per image per unit "
          "(the daemons' CPU grows with wall time, which a loaded machine stretches)")
    roles = sorted(set(small["by_role"]) | set(large["by_role"]),
                   key=lambda r: -(large["by_role"].get(r, 0.0) - small["by_role"].get(r, 0.0)))
    print("\nWhere it goes (CPU by process title at each sample; a Ray worker is named after "
          "the task or actor it runs):\n")
    print(f"| process | CPU s at {small['images']} | CPU s at {large['images']} "
          "| processes | marginal CPU-ms per image per unit |")
    print("|---|---|---|---|---|")
    for r in roles:
        a, b = small["by_role"].get(r, 0.0), large["by_role"].get(r, 0.0)
        if max(a, b) >= 0.05:
            procs = f"{small['processes'].get(r, 0)} / {large['processes'].get(r, 0)}"
            print(f"| `{r}` | {a:.1f} | {b:.1f} | {procs} "
                  f"| {(b - a) * 1000.0 / (delta_images * units):.2f} |")
    print(f"\n**marginal: {marginal:.2f} CPU-ms per image per unit** "
          f"({(large['cpu_s'] - small['cpu_s']):.1f} CPU-s for {delta_images} more images x "
          f"{units} units)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
