"""Question 5: peak memory of each method at the default batch size (``resources.batch_size``).

Each (model, method) runs in a fresh Python subprocess, so no allocator cache or earlier peak
leaks from one measurement into the next.

  * CPU: ``peak RSS - RSS before the call``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    after the call minus the resident size (``/proc/self/statm``) just before it, with the
    model, the inputs and one warm forward already in memory. tracemalloc does not see
    torch's allocations, hence RSS.
  * CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call.

Iterative methods (Integrated Gradients, SmoothGrad, Score-CAM, ...) hold one chunk of
``inner_batch_size`` images at a time; their peak is reached in the first chunks and does not
grow with the number of steps, so each run is stopped after ``--max-forwards`` model calls
(the peak is then already measured, and Score-CAM's B x K forwards need not all run).
Reported with the floors: a plain forward and a forward + input-gradient backward.

    PYTHONPATH=. python bench/memory.py --models lite0,resnet50 --batch 16
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import base_parser, header, table  # noqa: E402

CORE = ("gradient", "guided_backprop", "integrated_gradients", "smoothgrad", "gradcam",
        "gradcam_pp", "layercam", "scorecam")


class Stop(Exception):
    """Raised by the forward-counting hook once enough forwards ran."""


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(model_name: str, method: str, batch: int, size: int, device_name: str,
          max_forwards: int) -> dict:
    import resource

    from bench.common import inputs, load_bench_model

    device = torch.device(device_name)
    model, layer = load_bench_model(model_name, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = inputs(batch, size, device)
    with torch.no_grad():
        t = model(x).argmax(1)
    if method == "forward":
        def fn():
            with torch.no_grad():
                return model(x)
    elif method == "forward+backward":
        def fn():
            xx = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(xx).gather(1, t.view(-1, 1)).sum(), xx)[0]
    else:
        from salmap.workers.methods import build, get_class

        params = {"target_layer": layer} if get_class(method).uses_target_layer else {}
        m = build(method, model, **params)

        def fn():
            return m(x, t)
    calls = {"n": 0}

    def count(_module, _inputs):
        calls["n"] += 1
        if calls["n"] > max_forwards:
            raise Stop

    handle = model.register_forward_pre_hook(count)
    stopped = False
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before_rss = current_rss_mb()
    try:
        fn()
    except Stop:
        stopped = True
    finally:
        handle.remove()
    if device.type == "cuda":
        torch.cuda.synchronize()
        delta = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        delta = peak - before_rss
    return {"delta_mb": delta, "forwards": min(calls["n"], max_forwards), "stopped": stopped}


def run_child(model_name: str, method: str, args) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    call = (f"child({model_name!r}, {method!r}, {args.batch}, {args.size}, {args.device!r}, "
            f"{args.max_forwards})")
    code = (f"import json, sys; sys.path.insert(0, {root!r}); from bench.memory import child; "
            f"print('RESULT' + json.dumps({call}))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": tail[:120]}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(batch=16)
    parser.add_argument("--models", default="lite0,resnet50")
    parser.add_argument("--methods", default=",".join(CORE), help="'all' = every registered method")
    parser.add_argument("--max-forwards", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header("Peak memory per method (fresh subprocess each)", device)
    if args.methods == "all":
        from salmap.workers.methods import names

        methods = names()
    else:
        methods = [m for m in args.methods.split(",") if m]
    kind = "peak CUDA allocated" if device.type == "cuda" else "peak RSS"
    print(f"batch {args.batch} (resources.batch_size default 16), {args.size} px, inner_batch_size "
          f"64 (default), stopped after {args.max_forwards} model calls; {kind} minus the "
          f"memory in use just before the call\n")
    rows = []
    for model_name in args.models.split(","):
        base = None
        for method in ("forward", "forward+backward", *methods):
            res = run_child(model_name, method, args)
            if "error" in res:
                rows.append({"model": model_name, "method": method, "MiB over baseline": None,
                             "x forward": None, "MiB / image": None,
                             "note": f"failed: {res['error']}"})
                continue
            delta = res["delta_mb"]
            if method == "forward":
                base = delta
            rows.append({
                "model": model_name, "method": method, "MiB over baseline": delta,
                "x forward": delta / base if base else None, "MiB / image": delta / args.batch,
                "note": (f"stopped after {res['forwards']} model calls" if res["stopped"] else
                         f"{res['forwards']} model calls"),
            })
    table(rows)
    return rows


if __name__ == "__main__":
    main()
