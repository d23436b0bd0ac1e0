"""Is an optimised method's map of a photo the same alone and beside other photos?

The pipeline cuts a dataset into batches however the shards fall, so a map must not depend on
its neighbours. For each method (default: the optimised ones, DMBP and HDM) at its DEFAULT
parameters on the pretrained EfficientNet-Lite0 at 224 px: the map of the first demo photo
explained alone, beside one other photo, and in a batch of four; reported as the relative L2
difference ``||a - b|| / ||b||`` of the maps (the issue's criterion: < 1e-4), with a
different ``inner_batch_size`` too (the model sees other forward batch sizes, so conv kernels
pick other algorithms and sum in another order).

    PYTHONPATH=. python bench/batch_independence.py                 # dmbp, hdm
    PYTHONPATH=. python bench/batch_independence.py --methods hdm --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import device_name, load_avg, table, versions  # noqa: E402

LIMIT = 1e-4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    from salmap.workers.methods import build
    from salmap.workers.models import load_model

    from bench.method_quality import demo_photos

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="dmbp,hdm")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--batch4", action="store_true", help="also a batch of four photos")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load_model("efficientnet_lite0")
    model = loaded.model.to(device).eval()
    p = loaded.preprocess
    names, images, labels, _, _ = demo_photos(None, p.resize, p.crop, p.mean, p.std)
    images, labels = images[:4].to(device), labels[:4].to(device)
    print("## Batch independence of the optimised methods (defaults, EfficientNet-Lite0, 224 px)\n")
    print(f"date {time.strftime('%Y-%m-%d')}; device {device_name(device)}; {versions()}; "
          f"{load_avg()}\n")
    print(f"photo explained: {names[0]}; neighbours: {', '.join(names[1:4])}\n")
    rows = []
    for name in [m for m in args.methods.split(",") if m]:
        method = build(name, model)
        t0 = time.perf_counter()
        alone = method(images[:1], labels[:1]).cpu()
        seconds = time.perf_counter() - t0
        cases = {"beside 1 other": (2, None), "alone, inner_batch_size 1": (1, 1)}
        if args.batch4:
            cases["in a batch of 4"] = (4, None)
        for label, (n, inner) in cases.items():
            m = build(name, model, **({} if inner is None else {"inner_batch_size": inner}))
            other = m(images[:n], labels[:n])[:1].cpu()
            d = rel_l2(other, alone)
            rows.append({"method": name, "case (vs alone)": label, "relative L2": d,
                         "< 1e-4": "yes" if d < LIMIT else "NO",
                         "s per photo alone": seconds})
            print(f"... {name} {label}: {d:.3g}", file=sys.stderr, flush=True)
    table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
