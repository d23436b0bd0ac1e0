"""Ground-truth benchmark: every method on images whose evidence is known by construction.

Data and models from :mod:`salmap.workers.synthetic`: a shape (the class) with an exact mask on a
textured background; a VGG-style and a ResNet-style pure-ReLU CNN (no BatchNorm, no biases)
trained on a TRAINING split (seed 0), weights cached under ``runs/synthetic_models``. Scored on
a separate EVALUATION split (seed 2) of images the model classifies correctly, each explained
for its label: relevance mass accuracy and relevance rank accuracy inside the mask (CLEVR-XAI,
Arras et al. 2022) and the pointing game, with 95 % bootstrap intervals over the images; plus
the model-blind maps ``random`` (uniform noise), ``centre`` (a centred Gaussian) and ``edge``
(Sobel magnitude). Tuning split: defaults of the optimised methods (DMBP, HDM) may be chosen
on images from ``--tune-seed`` (seed 1), never on the evaluation split.

    PYTHONPATH=. python bench/groundtruth.py                       # all methods, both archs
    PYTHONPATH=. python bench/groundtruth.py --methods gradcam,hdm --images 16 --archs vgg

Defaults: 4 classes (square, disc, cross, ring) at 32 px, 3,000 training images, 10 epochs,
200 evaluation images: sized to train and score on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import load_avg, table, versions  # noqa: E402

# CAM target layers of the synthetic models (their last conv block)
TARGET_LAYERS = {"vgg": "features.11", "resnet": "layer3"}


BASELINES = ("random", "centre", "edge", "input")


def baseline_maps(name: str, images: torch.Tensor) -> torch.Tensor:
    """A map that knows nothing of the model: uniform noise, a centred Gaussian, the Sobel
    magnitude, or ``input``: |model-space image| summed over channels (the objects are
    saturated colours on a mid-grey background, so a map x input scores on this data partly
    through the input alone)."""
    from salmap.workers.synthetic import normalise

    from bench.method_quality import centre_gaussian, edge_map

    n, _, h, w = images.shape
    if name == "random":
        return torch.rand(n, h, w, generator=torch.Generator().manual_seed(0))
    if name == "centre":
        return centre_gaussian(n, h, w)
    if name == "input":
        return normalise(images).abs().sum(1)
    return edge_map(images)


def method_maps(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, arch: str,
                batch: int) -> torch.Tensor:
    """``name``'s maps of ``x`` for the classes ``y`` at its defaults, ``batch`` images a call."""
    from salmap.workers.methods import build, get_class

    params = {"target_layer": TARGET_LAYERS[arch]} if get_class(name).uses_target_layer else {}
    method = build(name, model, **params)
    return torch.cat([method(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])


def ground_truth_scores(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, list[float]]:
    """Per image: relevance mass and rank accuracy inside the mask, pointing hit (0/1); maps
    at another resolution are resized bilinearly to the masks' first."""
    from salmap.workers.synthetic import pointing_hits, relevance_mass, relevance_rank

    if maps.shape[-2:] != masks.shape[-2:]:
        maps = torch.nn.functional.interpolate(maps[:, None].float(), size=masks.shape[-2:],
                                               mode="bilinear", align_corners=False)[:, 0]
    return {"mass": relevance_mass(maps, masks).tolist(),
            "rank": relevance_rank(maps, masks).tolist(),
            "pointing": pointing_hits(maps, masks).float().tolist()}


def main(argv: list[str] | None = None) -> int:
    from salmap.workers.methods import names as method_names
    from salmap.workers.metrics.summary import summarize
    from salmap.workers.synthetic import accuracy, make_dataset, normalise, train_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="",
                        help="comma-separated (default: all; none: the model-blind rows only)")
    parser.add_argument("--archs", default="vgg,resnet")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=4, help="shapes (2 to 4)")
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--images", type=int, default=200, help="evaluation images scored")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--spurious", type=float, default=0.0,
                        help="share of training images with the class's corner cue")
    parser.add_argument("--batch", type=int, default=50, help="images per method call")
    parser.add_argument("--cache", default="runs/synthetic_models", help="model weights folder")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ([] if args.methods == "none" else
               [m for m in args.methods.split(",") if m] or method_names())
    data_kw = {"size": args.size, "num_classes": args.classes}
    train = make_dataset(args.train, seed=0, spurious_fraction=args.spurious, **data_kw)
    evaluation = make_dataset(2 * args.images, seed=2, **data_kw)
    print("## Ground-truth benchmark: synthetic shapes with exact masks\n")
    print(f"date {time.strftime('%Y-%m-%d')}; CPU, {torch.get_num_threads()} threads; "
          f"{versions()}; {load_avg()}\n")
    print(f"{args.classes} classes ({args.size} px, object centre uniform over the frame); "
          f"training split: {args.train} images (seed 0, corner cue on {args.spurious:.0%}), "
          f"{args.epochs} epochs, width {args.width}; evaluation split: seed 2, the first "
          f"{args.images} correctly classified of {len(evaluation)} images; tuning split (for "
          "defaults of optimised methods): seed 1, never reported.\n")
    for arch in [a for a in args.archs.split(",") if a]:
        t0 = time.perf_counter()
        model = train_model(arch, train, seed=0, epochs=args.epochs, width=args.width,
                            cache_dir=args.cache)
        trained = time.perf_counter() - t0
        with torch.no_grad():
            pred = model(normalise(evaluation.images)).argmax(1)
        keep = (pred == evaluation.labels).nonzero()[:, 0][: args.images]
        data = evaluation.subset(keep)
        x, y, masks = normalise(data.images), data.labels, data.masks
        print(f"### {arch}: accuracy {accuracy(model, train):.3f} on the training split, "
              f"{accuracy(model, evaluation):.3f} on the evaluation split; trained (or loaded) "
              f"in {trained:.0f} s; {len(data)} images scored; mask area "
              f"{masks.float().mean():.3f} of the image\n", flush=True)
        print(f"... {arch} trained: {accuracy(model, evaluation):.3f} evaluation accuracy",
              file=sys.stderr, flush=True)
        rows = []
        for name in [*BASELINES, *methods]:
            t0 = time.perf_counter()
            if name in BASELINES:
                maps = baseline_maps(name, data.images)
            else:
                maps = method_maps(name, model, x, y, arch, args.batch)
            seconds = (time.perf_counter() - t0) / len(data)
            scores = ground_truth_scores(maps, masks)

            def ci(v: list[float]) -> str:
                s = summarize(v)
                return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"

            rows.append({"method": name, "mass in mask ↑": ci(scores["mass"]),
                         "rank accuracy ↑": ci(scores["rank"]),
                         "pointing ↑": ci(scores["pointing"]),
                         "s / image": "" if name in BASELINES else seconds})
            print(f"... {arch} {name}: {rows[-1]['mass in mask ↑']} | {rows[-1]['rank accuracy ↑']}"
                  f" | {rows[-1]['pointing ↑']} | {seconds:.3f} s per image", file=sys.stderr,
                  flush=True)
        table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
