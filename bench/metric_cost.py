"""Question 3: what do deletion + insertion (RISE, 28 steps) cost per image, in forward passes?

Both curves need 28 perturbed forwards each plus one clean forward they share: 57 forwards
per image. Three things are timed round-robin on the same images, maps and targets:

  * ``floor``: 57 x B plain forwards of unrelated images in chunks of ``max_batch`` (the
    best any implementation can do: rendering the perturbed images costs extra);
  * ``batched``: :func:`salmap.workers.metrics.compute_model_metrics` (jobs of all samples and
    steps share chunks of ``max_batch`` images);
  * ``naive``: a per-image, per-step loop (one forward of one image per curve point), using
    the same ranking and substrates, so its AUCs must equal the batched ones.

Goal (issue 6): batched within 1.3x of 57 plain forwards.

    PYTHONPATH=. python bench/metric_cost.py --model lite0 --batch 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import base_parser, inputs, load_avg, load_bench_model, table  # noqa: E402
from bench.timing import measure, parse_timed_args  # noqa: E402

NORM = {"lite0": ((127 / 255,) * 3, (128 / 255,) * 3)}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def naive_deletion_insertion(model, images, maps, targets, steps: int = 28) -> torch.Tensor:
    """Per image, per curve point, one single-image forward; returns [B, 2] (deletion, insertion)."""
    from salmap.workers.metrics.engine import upsample_maps
    from salmap.workers.metrics.faithfulness import auc, blur, pixel_ranks, step_counts

    h, w = images.shape[-2:]
    sal = upsample_maps(maps, (h, w))
    out = torch.empty(images.shape[0], 2)
    with torch.inference_mode():
        for b in range(images.shape[0]):
            x = images[b : b + 1]
            c = int(targets[b])
            ranks = pixel_ranks(sal[b : b + 1])[0].view(1, 1, h, w)
            zero, blurred = torch.zeros_like(x), blur(x)

            def prob(img: torch.Tensor, c: int = c) -> float:
                return float(model(img).float().softmax(1)[0, c])

            clean = prob(x)
            counts = step_counts(h * w, steps)
            deletion = [clean] + [prob(torch.where(ranks < counts[i], zero, x))
                                  for i in range(1, steps + 1)]
            insertion = [prob(torch.where(ranks < counts[i], x, blurred))
                         for i in range(steps)] + [clean]
            out[b, 0] = auc(torch.tensor(deletion))
            out[b, 1] = auc(torch.tensor(insertion))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(batch=4, repeats=2)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--max-batch", type=int, default=64, help="engine chunk size (default 64)")
    parser.add_argument("--no-naive", action="store_true", help="skip the slow naive loop")
    args, device, timer_line = parse_timed_args(
        parser, argv, "Deletion + insertion cost: batched engine vs naive loop vs plain forwards")
    print(f"model {args.model}, batch {args.batch}, {args.size} px, steps {args.steps}, "
          f"max_batch {args.max_batch}, repeats {args.repeats}; {timer_line}; {load_avg()}\n")

    from salmap.workers.methods import build
    from salmap.workers.metrics import compute_model_metrics

    model, layer = load_bench_model(args.model, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = inputs(args.batch, args.size, device)
    with torch.no_grad():
        t = model(x).argmax(1)
    maps = build("gradcam", model, target_layer=layer)(x, t)
    mean, std = NORM.get(args.model, IMAGENET)
    per_image = 2 * args.steps + 1
    n_floor = per_image * args.batch
    chunk = torch.randn(min(args.max_batch, n_floor), 3, args.size, args.size, device=device)

    def forward(z: torch.Tensor) -> torch.Tensor:
        return model(z).float()

    def floor() -> None:
        with torch.inference_mode():
            done = 0
            while done < n_floor:
                k = min(chunk.shape[0], n_floor - done)
                model(chunk[:k])
                done += k

    def batched() -> dict:
        return compute_model_metrics(["deletion_auc", "insertion_auc"], forward, x, maps, t,
                                     {"steps": args.steps}, mean=mean, std=std,
                                     max_batch=args.max_batch)

    fns = {"floor": floor, "batched": batched}
    if not args.no_naive:
        fns["naive"] = lambda: naive_deletion_insertion(model, x, maps, t, args.steps)
    with torch.inference_mode():  # warm the chunk shapes once, cheaply
        model(chunk)
        model(x[:1])
    times = measure(fns, device, args.timer, repeats=args.repeats, warmup=0)
    check = ""
    if not args.no_naive:  # same AUCs? (first image only: the naive loop is slow)
        got = compute_model_metrics(["deletion_auc", "insertion_auc"], forward, x[:1], maps[:1],
                                    t[:1], {"steps": args.steps}, mean=mean, std=std,
                                    max_batch=args.max_batch)
        ref = naive_deletion_insertion(model, x[:1], maps[:1], t[:1], args.steps)
        diff = max(float((got["deletion_auc"] - ref[:, 0]).abs().max()),
                   float((got["insertion_auc"] - ref[:, 1]).abs().max()))
        check = f"max |AUC batched - AUC naive| = {diff:.2e} (image 0)"
    fwd_ms = 1000 * times["floor"] / n_floor
    rows = []
    for key in fns:
        ms = 1000 * times[key] / args.batch
        rows.append({
            "implementation": {"floor": f"{per_image} plain forwards", "batched":
                               "compute_model_metrics", "naive": "per-image per-step loop"}[key],
            "ms / image": ms, "forward-equivalents / image": ms / fwd_ms,
            "x of floor": times[key] / times["floor"],
        })
    table(rows)
    print(f"one forward = {fwd_ms:.2f} ms/image (chunks of {chunk.shape[0]}); {check}; "
          f"goal: batched <= 1.3x floor; after: {load_avg()}\n")
    return rows


if __name__ == "__main__":
    main()
