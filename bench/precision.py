"""Question 6: what do bf16 / fp16 autocast and channels_last buy, and what do they cost in
map agreement?

Each method is built with the common option ``precision`` (autocast of the forward passes;
maps come back float32) and run on the same model, images and targets, fp32 contiguous being
the reference. ``channels_last`` = model and input in ``torch.channels_last`` memory format
(what the pipeline's actor does by default, ``resources.channels_last``). All variants of a
model are timed round-robin in one process.

Agreement with the fp32 map of the same image: Pearson correlation (mean and min over the
batch) and max |diff| / (max - min of the fp32 map) (worst image). fp16 autocast on CPU is
tried and reported as unsupported if it fails.

    PYTHONPATH=. python bench/precision.py --models resnet50,lite0
    PYTHONPATH=. python bench/precision.py --device cuda --models resnet50 --methods gradcam_pp
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import base_parser, inputs, load_avg, load_bench_model, table  # noqa: E402
from bench.timing import measure, parse_timed_args  # noqa: E402


def agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """(mean Pearson r, min Pearson r, max |diff| / range of ref) over the batch."""
    a, b = ref.flatten(1).double(), got.flatten(1).double()
    a0, b0 = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a0 * b0).sum(1) / (a0.norm(dim=1) * b0.norm(dim=1)).clamp_min(1e-30)
    span = (a.amax(1) - a.amin(1)).clamp_min(1e-30)
    rel = ((a - b).abs().amax(1) / span).amax()
    return float(r.mean()), float(r.min()), float(rel)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,lite0")
    parser.add_argument("--methods", default="gradcam,gradcam_pp,gradient")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    args, device, timer_line = parse_timed_args(
        parser, argv, "Precision (autocast) and channels_last: speed and map agreement")
    print(f"batch {args.batch}, {args.size} px, repeats {args.repeats}; {timer_line}; {load_avg()}\n")
    from salmap.workers.methods import build

    rows = []
    for model_name in args.models.split(","):
        model, layer = load_bench_model(model_name, device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        x, _ = inputs(args.batch, args.size, device)
        with torch.no_grad():
            t = model(x).argmax(1)  # the predicted class: CAM maps are rarely all zero for it
        model_cl = None
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns, unsupported = {}, {}
        for method in args.methods.split(","):
            params = {"target_layer": layer} if method.startswith(("gradcam", "layercam",
                                                                   "scorecam")) else {}
            for prec in args.precisions.split(","):
                for cl in (False, True):
                    if cl and model_cl is None:
                        import copy

                        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
                    m = build(method, model_cl if cl else model, precision=prec, **params)
                    xi = x_cl if cl else x
                    key = (method, prec, cl)
                    try:
                        m(xi[:1], t[:1])
                    except Exception as err:  # noqa: BLE001 - e.g. fp16 autocast on CPU
                        unsupported[key] = f"{type(err).__name__}: {str(err)[:80]}"
                        continue
                    fns[key] = (lambda m=m, xi=xi, t=t: m(xi, t))
        times = measure({str(k): f for k, f in fns.items()}, device, args.timer,
                        repeats=args.repeats, warmup=1)
        maps = {k: f() for k, f in fns.items()}
        for key in [*fns, *unsupported]:
            method, prec, cl = key
            row = {"model": model_name, "method": method, "precision": prec,
                   "channels_last": cl}
            if key in unsupported:
                row.update({"img/s": None, "speed vs fp32": None, "r mean": None, "r min": None,
                            "max|diff|/range": None, "note": unsupported[key]})
            else:
                ref_key = (method, "fp32", False)
                rm, rmin, rel = agreement(maps[ref_key], maps[key])
                rate = args.batch / times[str(key)]
                row.update({"img/s": rate, "speed vs fp32": times[str(ref_key)] / times[str(key)],
                            "r mean": rm, "r min": rmin, "max|diff|/range": rel, "note": ""})
            rows.append(row)
    table(rows)
    print(f"after: {load_avg()}\n")
    return rows


if __name__ == "__main__":
    main()
