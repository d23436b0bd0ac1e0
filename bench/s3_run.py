"""A real ``salmap run`` with its input shards AND its output on a local S3 API, every HTTP
request counted at the server: requests by type per shard and per commit, requests per record
when the finished run is run again (resume), the driver's peak RSS, images/s over time (first
vs last quarter of the commits) and the wall time.

    PYTHONPATH=. .venv/bin/python bench/s3_run.py --images 100000 --per-shard 1000

What is real: moto's S3 server (in its own process, on 127.0.0.1, in memory), the CLI's own
driver (``salmap run`` with ``SALMAP_NO_SUPERVISOR=1``, so that the process measured is the
driver itself), the run lock, ledger, commit records, manifest, the reader and writer, one
local Ray instance. What is not: the model (``bench.tiny_model:tiny_net``, one convolution at
random weights: the pipeline's costs, not a model's), the images (small synthetic JPEGs), the
network (loopback: no latency, no throttling).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
for _k, _v in CREDENTIALS.items():
    os.environ.setdefault(_k, _v)

COMMIT = re.compile(r"committed wave \S+ \((\d+) rows")
PROGRESS = re.compile(r": (\d+)/~?\d+ samples")
RUN_ID = "s3run"


# --- the S3 server, in its own process --------------------------------------------------------

def serve(log_path: str, port_path: str) -> None:
    """moto's S3 API on 127.0.0.1 (threaded WSGI server, in memory), one log line per request:
    ``time kind path query``."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from s3_counting import _kind
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log(self, *args: Any, **kwargs: Any) -> None:
            pass

    app = DomainDispatcherApplication(create_backend_app)
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()

    def counted(environ: dict, start_response: Any) -> Any:
        kind = _kind(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""))
        if kind == "PUT" and environ.get("HTTP_IF_NONE_MATCH") == "*":
            kind = "PUT-IF-NONE-MATCH"
        with lock:
            log.write(f"{time.time():.3f}\t{kind}\t{environ.get('PATH_INFO', '')}\t"
                      f"{environ.get('QUERY_STRING', '')}\n")
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
    Path(port_path).write_text(str(server.server_address[1]))
    server.serve_forever()


class Server:
    """The counting server's process, its endpoint and its request log."""

    def __init__(self, work: Path) -> None:
        self.log = work / "requests.tsv"
        port = work / "port"
        port.unlink(missing_ok=True)  # a previous run's
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.log), str(port)],
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        for _ in range(600):
            if port.exists() and port.read_text():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the moto server did not start")
        self.endpoint = f"http://127.0.0.1:{port.read_text()}"

    def mark(self) -> int:
        return len(self.entries())

    def entries(self, since: int = 0) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [ln.split("\t") for ln in lines[since:]]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# --- the data ---------------------------------------------------------------------------------

def jpeg(i: int, size: int = 64) -> bytes:
    """A small photo-like JPEG: smooth colour fields (an 8x8 random image scaled up) + noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size))
    px = np.asarray(low, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def upload_shards(endpoint: str, images: int, per_shard: int) -> tuple[list[str], int]:
    """Tars of ``per_shard`` JPEGs (+ .cls) PUT to ``s3://wds/``: (URLs, total bytes)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="wds")
    client.create_bucket(Bucket="out")
    urls, total = [], 0
    for s in range(0, images, per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s, min(images, s + per_shard)):
                for ext, data in (("jpg", jpeg(i)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        key = f"img-{s // per_shard:06d}.tar"
        client.put_object(Bucket="wds", Key=key, Body=buf.getvalue())
        total += buf.tell()
        urls.append(f"s3://wds/{key}")
    return urls, total


# --- one salmap run, the driver measured ------------------------------------------------------

def run_salmap(job: Path, work: Path, tag: str) -> dict[str, Any]:
    """``salmap run job`` as a subprocess whose process is the driver: its lines timestamped,
    its VmHWM / VmRSS sampled from /proc, the load average sampled."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SALMAP_NO_SUPERVISOR="1",
               RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "salmap.pipeline.cli", "run", str(job)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int, int, float]] = []  # (t, VmHWM kB, VmRSS kB, load 1 min)

    def sample() -> None:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            vals = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
            hwm = int(vals.get("VmHWM", "0 kB").split()[0])
            rss = int(vals.get("VmRSS", "0 kB").split()[0])
            if hwm:
                samples.append((time.time() - start, hwm, rss, os.getloadavg()[0]))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(work / f"{tag}.log", "w") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            t = time.time() - start
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:8.1f}  {line}")
            log.flush()
    code = proc.wait()
    wall = time.time() - start
    sampler.join()
    if code != 0:
        tail = "\n".join(ln for _, ln in lines[-30:])
        raise RuntimeError(f"salmap run ({tag}) exited {code}:\n{tail}")
    return {"start": start, "wall": wall, "lines": lines, "samples": samples}


def retried(server: Server, job: Path, work: Path, tag: str, tries: int = 5) -> tuple[dict, list]:
    """One ``salmap run`` and the requests it made; again when Ray could not start in time on
    a loaded machine (nothing was done then: the next try's requests are counted alone)."""
    for attempt in range(1, tries + 1):
        mark = server.mark()
        try:
            return run_salmap(job, work, tag), server.entries(mark)
        except RuntimeError as err:
            if "timed out during startup" not in str(err) or attempt == tries:
                raise
            print(f"<!-- {tag}: Ray did not start in time; again -->", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


# --- the figures ------------------------------------------------------------------------------

def category(path: str, query: str) -> str:
    """What a request was about, from its path (and a listing's prefix)."""
    if path.startswith("/wds"):
        return "input shards"
    name = path.rsplit("/", 1)[-1]
    if "list-type" in query or "prefix=" in query:
        return "listing"
    if name == "_lock.json":
        return "lock"
    if name == "manifest.json":
        return "manifest"
    if "/_commits/" in path:
        return "commit records"
    if name.endswith(".parquet"):
        return "data files"
    if name.startswith("_plan"):
        return "plan"
    return "other"


def table(entries: list[list[str]]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for _, kind, path, query in entries:
        out.setdefault(category(path, query), Counter())[kind] += 1
    return out


def rates(commits: list[tuple[float, int]], start: float) -> dict[str, float]:
    """images/s over the first and the last ``q`` intervals between commits (q = a quarter of
    the commits): rows committed at the interval's end over its length; the first commit's own
    rows (start-up included) are left out of both."""
    q = max(1, len(commits) // 4)

    def rate(part: list[tuple[float, int]], since: float) -> float:
        return sum(n for _, n in part) / max(1e-9, part[-1][0] - since)

    ok = len(commits) > q
    first = rate(commits[1:q + 1], commits[0][0]) if ok else float("nan")
    last = rate(commits[-q:], commits[-q - 1][0]) if ok else float("nan")
    steady = rate(commits[1:], commits[0][0]) if len(commits) > 1 else float("nan")
    return {"first": first, "last": last, "steady": steady, "quarter": q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--method", default="gradient")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shards-per-wave", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--input", choices=("prefix", "names"), default="prefix",
                    help="input.shards as the bucket's prefix (one LIST) or every shard's URL")
    ap.add_argument("--report-only", action="store_true",
                    help="print the tables again from --work's raw.json (no run)")
    ap.add_argument("--work", default=None, help="keep the logs and the request log here")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--device", default=None, help="not used: the job picks its device")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    if args.report_only:
        report(args, json.loads((work / "raw.json").read_text()))
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / "requests.tsv").unlink(missing_ok=True)
    load0 = os.getloadavg()
    server = Server(work)
    try:
        t0 = time.time()
        urls, nbytes = upload_shards(server.endpoint, args.images, args.per_shard)
        print(f"<!-- uploaded {len(urls)} shards ({nbytes / 1e6:.0f} MB) in {time.time() - t0:.0f} s"
              " -->", file=sys.stderr, flush=True)
        cfg = {
            "run": {"id": RUN_ID, "output": "s3://out/runs", "report": False,
                    "shards_per_wave": args.shards_per_wave},
            "ray": {"progress": "lines", "num_cpus": args.num_cpus, "include_dashboard": False},
            "input": {"shards": ["s3://wds/"] if args.input == "prefix" else urls},
            "storage": {"endpoint": server.endpoint, "region": "us-east-1"},
            "models": [{"name": "tiny", "source": "bench.tiny_model:tiny_net", "weights": "none",
                        "input_size": 64}],
            "methods": [{"name": args.method}],
            "targets": "predicted",
            "metrics": [],
            "resources": {"batch_size": args.batch_size},
        }
        job = work / "job.json"
        job.write_text(json.dumps(cfg))
        first, run_entries = retried(server, job, work, "run")
        again, resume_entries = retried(server, job, work, "resume")
    finally:
        server.stop()
    raw = {"images": args.images, "per_shard": args.per_shard, "shards": len(urls),
           "bytes": nbytes, "first": first, "again": again, "run_entries": run_entries,
           "resume_entries": resume_entries, "load": [load0, os.getloadavg()],
           "input": args.input, "cpus": os.cpu_count()}
    (work / "raw.json").write_text(json.dumps(raw))
    report(args, raw)


def report(args: Any, raw: dict) -> None:
    first, again = raw["first"], raw["again"]
    run_entries, resume_entries = raw["run_entries"], raw["resume_entries"]
    (load0, load1), nbytes, n_shards = raw["load"], raw["bytes"], raw["shards"]
    commits = [(t + first["start"], int(m.group(1))) for t, ln in first["lines"]
               if (m := COMMIT.search(ln))]
    rows = sum(n for _, n in commits)
    r = rates(commits, first["start"])
    by = table(run_entries)
    n_commits = by.get("commit records", Counter())["PUT-IF-NONE-MATCH"]
    peak_mb = max(s[1] for s in first["samples"]) / 1024
    rss = [s[2] / 1024 for s in first["samples"]]
    loads = [s[3] for s in first["samples"]]
    resume_records = table(resume_entries).get("commit records", Counter())
    print(f"## {rows} images through salmap run, input and output on moto S3 "
          f"({n_shards} shards of {raw['per_shard']}, {nbytes / 1e6:.0f} MB, input.shards by "
          f"{raw['input']}; {n_commits} commits)\n")
    print(f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, "
          f"{sum(loads) / max(1, len(loads)):.1f} mean over the run (1-min, sampled every 0.5 s); "
          f"{raw['cpus']} CPUs\n")
    print("| rows | wall s | images/s overall | first quarter | last quarter | last / first | "
          "driver peak RSS MB (VmHWM) | driver RSS MB at 25% / end |")
    print("|---|---|---|---|---|---|---|---|")
    q1 = rss[len(rss) // 4] if rss else float("nan")
    print(f"| {rows} | {first['wall']:.0f} | {rows / first['wall']:.1f} | {r['first']:.1f} | "
          f"{r['last']:.1f} | {r['last'] / r['first']:.2f} | {peak_mb:.0f} | {q1:.0f} / "
          f"{rss[-1] if rss else float('nan'):.0f} |\n")
    if len(commits) > 2 * r["quarter"]:
        def mean_load(a: float, b: float) -> float:
            xs = [s[3] for s in first["samples"] if a <= s[0] + first["start"] <= b]
            return sum(xs) / max(1, len(xs))

        q = int(r["quarter"])
        print(f"Load average (1 min) during the first quarter of the commits "
              f"{mean_load(commits[0][0], commits[q][0]):.1f}, during the last "
              f"{mean_load(commits[-q - 1][0], commits[-1][0]):.1f}\n")
    done = [(t, int(m.group(1))) for t, ln in first["lines"] if (m := PROGRESS.search(ln))]
    if done and done[-1][1]:
        n = done[-1][1]

        def when(k: float) -> float:  # the first progress line at or past k samples
            return next(t for t, d in done if d >= k)

        start = next(t for t, d in done if d > 0)
        print(f"From the progress lines (samples done, every 10 s): first quarter of the images "
              f"{(n / 4) / max(1e-9, when(n / 4) - start):.1f} images/s (from the first done "
              f"batch), last quarter {(n / 4) / max(1e-9, when(n) - when(3 * n / 4)):.1f} "
              f"images/s; first sample done at {start:.0f} s\n")
    print("Requests during the run, counted at the server, by what they touched:\n")
    print("| object | requests by type | total | per shard | per commit |")
    print("|---|---|---|---|---|")
    for cat in sorted(by):
        c = by[cat]
        total = sum(c.values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        print(f"| {cat} | {kinds} | {total} | {total / n_shards:.2f} | "
              f"{total / max(1, n_commits):.2f} |")
    control = sum(sum(by.get(c, Counter()).values()) for c in ("lock", "manifest", "commit records"))
    print(f"\ncontrol requests (lock + record + manifest) per commit, whole run: "
          f"{control / max(1, n_commits):.2f}; input GETs per shard: "
          f"{by.get('input shards', Counter())['GET'] / n_shards:.2f}\n")
    steady(run_entries, first)
    print(f"Resume (the same salmap run again on the finished run, {again['wall']:.0f} s): "
          + ", ".join(f"{cat}: " + " ".join(f"{k} {v}" for k, v in sorted(c.items()))
                      for cat, c in sorted(table(resume_entries).items()))
          + f"; GETs per commit record: {resume_records['GET'] / max(1, n_commits):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "wall": first["wall"], "rates": r, "peak_mb": peak_mb,
            "run": {k: dict(v) for k, v in by.items()},
            "resume": {k: dict(v) for k, v in table(resume_entries).items()},
            "commits": [(t - first["start"], n) for t, n in commits], "load": [load0, load1],
            "rss": [(s[0], s[2]) for s in first["samples"][::20]]}, indent=1))


def steady(entries: list, first: dict) -> None:
    """Requests per commit between the first and the last commit record (the run's start and
    end left out), and the lock's heartbeats per minute (they follow the clock, not commits)."""
    puts = [float(t) for t, kind, path, _ in entries
            if "/_commits/" in path and kind == "PUT-IF-NONE-MATCH"]
    if len(puts) < 3:
        print("(fewer than 3 commits: no steady-state window)")
        return
    inside = [e for e in entries if puts[0] < float(e[0]) <= puts[-1]]
    n = len(puts) - 1
    by = table(inside)
    minutes = (puts[-1] - puts[0]) / 60
    print(f"Between the first and the last commit ({n} commits, {minutes:.1f} min):\n")
    print("| object | requests by type | per commit |")
    print("|---|---|---|")
    for cat in sorted(by):
        kinds = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(by[cat].items()))
        print(f"| {cat} | {kinds} | {sum(by[cat].values()) / n:.2f} |")
    beats = by.get("lock", Counter())["PUT"]
    commit_side = sum(by.get("commit records", Counter()).values()) + by.get(
        "manifest", Counter())["PUT"] + by.get("lock", Counter())["GET"] - beats
    print(f"\nlock heartbeats: {beats} PUTs ({beats / max(minutes, 1e-9):.1f} per minute), each "
          "with its GET; per commit, lock check + record + manifest = "
          f"{commit_side / n:.2f} (the lock GETs less one per heartbeat)\n")


if __name__ == "__main__":
    main()
