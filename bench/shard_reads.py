"""GETs per shard, counted at the server: salmap's reader (one streaming GET, 8 MiB buffer)
against the previous reader (pyarrow's unbuffered S3 input stream, which the tar parser reads
10 KiB at a time) and pyarrow with an 8 MiB buffer. Real S3 API: moto's server on 127.0.0.1
(tests/s3_counting.py records every request); shards of ~100 KB samples.

    .venv/bin/python bench/shard_reads.py [--sizes 0.4,2.1,10,100] [--old-max 10]

The previous reader is not run above ``--old-max`` MB (moto copies the object for every
ranged GET, so 10,000 GETs of a 100 MB shard take hours); its GET count there is size / 10 KiB.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from s3_counting import CountingMotoServer  # noqa: E402


def shard(size_mb: float, sample_kb: int = 100) -> bytes:
    """A tar of incompressible ~``sample_kb`` KB .jpg members with a .cls each."""
    n = max(1, int(size_mb * 1e6) // (sample_kb * 1000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for suffix, data in (("jpg", os.urandom(sample_kb * 1000)), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from salmap.pipeline.shard_reader import iter_samples, read_shard
from salmap.pipeline.storage import s3_client, s3_filesystem
storage = {storage!r}
client, fs = s3_client(storage), s3_filesystem(storage)  # made once per worker process
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if {buffer!r} == "salmap":
    n = sum(1 for chunk in read_shard({url!r}, storage) for r in chunk if not r["shard_end"])
else:
    with fs.open_input_stream({path!r}, buffer_size={buffer!r}) as f:
        n = sum(1 for _ in iter_samples(f))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"n": n, "s": dt, "rss_mb": (peak - base) / 1024}}))
"""


def count(server, url: str, storage: dict, buffer) -> tuple[int, float, int, float]:
    """(GETs of the shard, seconds, samples, peak RSS growth in MB) of one read of ``url``
    in a fresh process (the server's own copies of the object stay out of the figure)."""
    import json
    import subprocess

    path = url[len("s3://"):]
    before = len(server.requests)
    code = CHILD.format(root=str(ROOT), storage=storage, buffer=buffer, url=url, path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    gets = sum(m == "GET" and p == "/" + path for m, p, _ in server.requests[before:])
    return gets, res["s"], res["n"], res["rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0.4,2.1,10,100")
    ap.add_argument("--old-max", type=float, default=10)
    ap.add_argument("--device", default=None, help="ignored (no model here; run_all passes it)")
    args = ap.parse_args()
    server = CountingMotoServer()
    server.start()
    storage = {"endpoint": server.endpoint, "region": "us-east-1"}
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="wds")
    print("| shard | samples | reader | GETs | s | peak RSS growth, MB |")
    print("|---|---|---|---|---|---|")
    for size in (float(s) for s in args.sizes.split(",")):
        data = shard(size)
        key = f"s-{size}.tar"
        client.put_object(Bucket="wds", Key=key, Body=data)
        url = f"s3://wds/{key}"
        runs = [("salmap (one streaming GET)", "salmap"),
                ("pyarrow stream, 8 MiB buffer", 8 << 20)]
        if size <= args.old_max:
            runs.append(("previous: pyarrow stream, unbuffered", None))
        for name, buffer in runs:
            gets, dt, n, rss = count(server, url, storage, buffer)
            print(f"| {len(data) / 1e6:.1f} MB | {n} | {name} | {gets} | {dt:.2f} | {rss:.0f} |",
                  flush=True)
        if size > args.old_max:
            print(f"| {len(data) / 1e6:.1f} MB | | previous (not run) | ~{len(data) // 10240} | | |")
        client.delete_object(Bucket="wds", Key=key)
    server.stop()


if __name__ == "__main__":
    main()
