"""Ground-truth benchmark: every method on images whose evidence is known by construction.

Data and models from :mod:`salmap.workers.synthetic`: a shape (the class) with an exact mask on a
textured background; a VGG-style and a ResNet-style pure-ReLU CNN (no BatchNorm, no biases)
trained on a TRAINING split (seed 0), weights cached under ``runs/synthetic_models``. Scored on
a separate EVALUATION split (seed 2) of images the model classifies correctly, each explained
for its label: relevance mass accuracy and relevance rank accuracy inside the mask (CLEVR-XAI,
Arras et al. 2022) and the pointing game, with 95 % bootstrap intervals over the images; plus
the model-blind maps ``random`` (uniform noise), ``centre`` (a centred Gaussian), ``edge``
(Sobel magnitude) and ``input`` (|image| in model space). Tuning split: defaults of the
optimised methods (DMBP, HDM) are chosen on images of seed 1 (``--split tuning``), never on
the evaluation split.

    PYTHONPATH=. python bench/groundtruth.py                       # all methods, both archs
    PYTHONPATH=. python bench/groundtruth.py --methods gradcam,hdm --images 16 --archs vgg
    PYTHONPATH=. python bench/groundtruth.py --methods none --variant hdm:guidance=none
    PYTHONPATH=. python bench/groundtruth.py --methods gradient_x_input --randomised

``--variant NAME:key=value,...`` adds a row of ``NAME`` with those parameters (values parsed
as Python literals where they can be) and, where ``NAME`` has its own row, the per-image
difference to it (a paired comparison); ``--randomised`` adds the model-randomisation sanity
check: the same methods on an untrained model of the same architecture (seeded), explaining
the same images for the same labels; a method that scores as well there does not read the
model.

Defaults: 4 classes (square, disc, cross, ring) at 32 px, ``"texture"`` style (the object
drawn like its background, found only by its shape), 3,000 training images, 20 epochs, 200
evaluation images: sized to train and score on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import load_avg, mean_ci, table, versions  # noqa: E402

# CAM target layers of the synthetic models (their last conv block)
TARGET_LAYERS = {"vgg": "features.11", "resnet": "layer3"}


BASELINES = ("random", "centre", "edge", "input")


def baseline_maps(name: str, images: torch.Tensor) -> torch.Tensor:
    """A map that knows nothing of the model: uniform noise, a centred Gaussian, the Sobel
    magnitude (:func:`edge_map`), or ``input``: |model-space image| summed over channels (the
    contrast to mid-grey: on the ``"colour"`` data it finds every object, on ``"texture"``
    data it should not)."""
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


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    """``"hdm:guidance=none,steps=10"`` -> ``("hdm", {"guidance": "none", "steps": 10})``;
    commas inside parentheses belong to the value (``auxiliary_sizes=(16, 32)``)."""
    name, _, rest = spec.partition(":")
    params: dict[str, object] = {}
    for item in filter(None, re.split(r",(?![^()]*\))", rest)):
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    return name.strip(), params


def method_maps(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, arch: str,
                batch: int, params: dict[str, object] | None = None) -> torch.Tensor:
    """``name``'s maps of ``x`` for the classes ``y`` at its defaults updated by ``params``,
    ``batch`` images a call."""
    from salmap.workers.methods import build, get_class

    params = dict(params or {})
    if get_class(name).uses_target_layer:
        params.setdefault("target_layer", TARGET_LAYERS[arch])
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


def paired_rows(names: list[tuple[str, str, dict]], scores: dict[str, dict[str, list[float]]]
                ) -> list[dict[str, object]]:
    """For each variant row (a label other than its method's name) whose method also has its
    default row: the per-image difference variant - default, mean [95 % bootstrap interval]
    (the same images, so a paired comparison is sharper than two rows' intervals)."""
    rows = []
    for label, name, _ in names:
        if label == name or name not in scores:
            continue
        diff = {k: [a - b for a, b in zip(scores[label][k], scores[name][k])]
                for k in ("mass", "rank", "pointing")}
        rows.append({"variant - default": f"{label} - {name}", "Δ mass": mean_ci(diff["mass"]),
                     "Δ rank accuracy": mean_ci(diff["rank"]), "Δ pointing": mean_ci(diff["pointing"])})
    return rows


def score_rows(names: list[tuple[str, str, dict]], model: torch.nn.Module, arch: str,
               data, batch: int, scores: dict | None = None) -> list[dict[str, object]]:
    """One table row per ``(label, method, params)`` (methods in :data:`BASELINES` are the
    model-blind maps), scored on ``data``'s images for their labels; the per-image scores go
    into ``scores[label]`` when given."""
    from salmap.workers.synthetic import normalise

    x, y, masks = normalise(data.images), data.labels, data.masks
    rows = []
    for label, name, params in names:
        t0 = time.perf_counter()
        if name in BASELINES:
            maps = baseline_maps(name, data.images)
        else:
            maps = method_maps(name, model, x, y, arch, batch, params)
        seconds = (time.perf_counter() - t0) / len(data)
        per_image = ground_truth_scores(maps, masks)
        if scores is not None:
            scores[label] = per_image
        rows.append({"method": label, "mass in mask ↑": mean_ci(per_image["mass"]),
                     "rank accuracy ↑": mean_ci(per_image["rank"]),
                     "pointing ↑": mean_ci(per_image["pointing"]),
                     "s / image": "" if name in BASELINES else seconds})
        if data.cue_flags.any():  # where the corner cue is, on the images that carry it
            from salmap.workers.synthetic import cue_masks

            flags = data.cue_flags
            cue = cue_masks(data.labels[flags], masks.shape[-1], data.cue_size)
            on_cue = ground_truth_scores(maps[flags], cue)["mass"]
            rows[-1]["mass on the cue"] = mean_ci(on_cue)
        print(f"... {arch} {label}: {rows[-1]['mass in mask ↑']} | {rows[-1]['rank accuracy ↑']}"
              f" | {rows[-1]['pointing ↑']} | {seconds:.3f} s per image", file=sys.stderr,
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from salmap.workers.methods import names as method_names
    from salmap.workers.synthetic import (
        STYLES,
        accuracy,
        build_model,
        make_dataset,
        normalise,
        train_model,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="",
                        help="comma-separated (default: all; none: the model-blind rows only)")
    parser.add_argument("--variant", action="append", default=[],
                        help="an extra row: NAME:key=value,... (repeatable)")
    parser.add_argument("--archs", default="vgg,resnet")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=4, help="shapes (2 to 4)")
    parser.add_argument("--style", default="texture", choices=STYLES,
                        help="texture: the object drawn like the background (default); colour: "
                        "the earlier saturated objects on grey")
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--images", type=int, default=200, help="evaluation images scored")
    parser.add_argument("--split", default="evaluation", choices=("evaluation", "tuning"),
                        help="score the evaluation split (seed 2) or the tuning split (seed 1)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--spurious", type=float, default=0.0,
                        help="share of training images with the class's corner cue")
    parser.add_argument("--eval-spurious", type=float, default=0.0,
                        help="share of evaluation images with the class's corner cue (adds a "
                        "column: the share of positive relevance on the cue)")
    parser.add_argument("--randomised", action="store_true",
                        help="also score the methods on an untrained model (sanity check)")
    parser.add_argument("--batch", type=int, default=50, help="images per method call")
    parser.add_argument("--cache", default="runs/synthetic_models", help="model weights folder")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ([] if args.methods == "none" else
               [m for m in args.methods.split(",") if m] or method_names())
    rows_spec = [(m, m, {}) for m in methods]
    for spec in args.variant:
        name, params = parse_variant(spec)
        label = f"{name} ({', '.join(f'{k}={v}' for k, v in params.items())})"
        rows_spec.append((label, name, params))
    data_kw = {"size": args.size, "num_classes": args.classes, "style": args.style}
    seed = 2 if args.split == "evaluation" else 1
    train = make_dataset(args.train, seed=0, spurious_fraction=args.spurious, **data_kw)
    evaluation = make_dataset(2 * args.images, seed=seed, spurious_fraction=args.eval_spurious,
                              **data_kw)
    print("## Ground-truth benchmark: synthetic shapes with exact masks\n")
    print(f"date {time.strftime('%Y-%m-%d')}; CPU, {torch.get_num_threads()} threads; "
          f"{versions()}; {load_avg()}\n")
    print(f"{args.classes} classes ({args.size} px, style {args.style}, object centre uniform "
          f"over the frame); training split: {args.train} images (seed 0, corner cue on "
          f"{args.spurious:.0%}), {args.epochs} epochs, width {args.width}; {args.split} split: "
          f"seed {seed} (corner cue on {args.eval_spurious:.0%}), the first {args.images} "
          f"correctly classified of {len(evaluation)} "
          "images; tuning split (for defaults of optimised methods): seed 1, evaluation "
          "split: seed 2.\n")
    for arch in [a for a in args.archs.split(",") if a]:
        t0 = time.perf_counter()
        model = train_model(arch, train, seed=0, epochs=args.epochs, width=args.width,
                            cache_dir=args.cache)
        trained = time.perf_counter() - t0
        with torch.no_grad():
            pred = model(normalise(evaluation.images)).argmax(1)
        keep = (pred == evaluation.labels).nonzero()[:, 0][: args.images]
        data = evaluation.subset(keep)
        print(f"### {arch}: accuracy {accuracy(model, train):.3f} on the training split, "
              f"{accuracy(model, evaluation):.3f} on the {args.split} split; trained (or "
              f"loaded) in {trained:.0f} s; {len(data)} images scored; mask area "
              f"{data.masks.float().mean():.3f} of the image\n", flush=True)
        print(f"... {arch} trained: {accuracy(model, evaluation):.3f} {args.split} accuracy",
              file=sys.stderr, flush=True)
        baselines = [(b, b, {}) for b in BASELINES]
        scores: dict[str, dict[str, list[float]]] = {}
        table(score_rows([*baselines, *rows_spec], model, arch, data, args.batch, scores))
        table(paired_rows(rows_spec, scores))
        if args.randomised:
            torch.manual_seed(0)
            untrained = build_model(arch, args.classes, args.width).eval()  # train_model's init
            for p in untrained.parameters():
                p.requires_grad_(False)
            print(f"### {arch}, untrained (model-randomisation check: the same images and "
                  "labels, weights at their seeded initialisation)\n", flush=True)
            table(score_rows([r for r in rows_spec if r[0] == r[1]], untrained, arch, data,
                             args.batch))  # the methods at their defaults, not the variants
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
