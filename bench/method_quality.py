"""Which method explains the model best? Every registered method at its default parameters on
the bundled demo photos with the pretrained EfficientNet-Lite0, scored with salmap's own
metrics, next to three maps that know nothing about the model.

The faithfulness columns are REGION-level deletion and insertion (16-px patches replaced by /
copied onto the blurred image, ``workers/metrics/region.py``) compared with a random patch
order (the ``random`` row: patch means of uniform noise, so the same granularity), and ROAD
(noisy linear imputation) with MoRF (score left when the most relevant pixels are removed,
lower is better) and LeRF (score kept when the least relevant are removed, higher is better)
reported separately and their gap LeRF - MoRF; each is a mean over the photos with a 95 %
bootstrap interval. Pixel-level deletion
against a per-pixel random order is kept as a secondary column only: scattered pixels push
the image off the data distribution, so a random or high-frequency order and the centred
blob can look "faithful" (README, "Which method explains the model best?").

Also, per method: the pixel-level deletion AUC (RISE protocol, 28 steps, zero substrate,
softmax probability; secondary, last column), pointing game (hits / photos with a box of the
explained class, on the map in original pixels), Gini (sparseness, original pixels) and the
wall time per image. Baselines: ``random`` (uniform noise maps, the mean over ``--seeds``
seeds; its region deletion AUC is the denominator of ``region del / random``), ``centre`` (a
Gaussian at the image centre, sigma a quarter of the side: the photographer's bias) and
``edge`` (Sobel magnitude of the photo). ``--road-percentiles`` thins ROAD's percentiles
(its cost is one imputation per percentile and curve) when the default nine do not fit.

The explained class is each photo's label (as ``configs/demo.yaml``, ``targets: label``);
photos are resized and cropped as the pipeline does (``salmap.pipeline.decode.preprocess``), from
the arrays themselves (the demo shards hold them as quality-92 JPEGs).
Deletion and insertion are averaged over the photos (a photo the model does not recognise
scores near 0 for every method); ``del / random`` is the ratio of those averages.

    PYTHONPATH=. python bench/method_quality.py                      # all 14 methods, 8 photos
    PYTHONPATH=. python bench/method_quality.py --methods gradcam,tsgb --photos chelsea,coffee

Also printed: the TSGB relevance balance on Lite0, whose ReLU6 units drop the relevance of
saturated units (``workers/methods/tsgb.py``): ``|sum M| / sum |M|`` per photo (0 on a ReLU
network with gamma=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import device_name, load_avg, mean_ci, table, versions  # noqa: E402

BASELINES = ("random", "centre", "edge")
MODEL_METRICS = ["region_deletion_auc", "region_insertion_auc", "road", "deletion_auc"]
ROAD_COLUMNS = ("road", "road_morf", "road_lerf", "road_gap")


def demo_photos(names: list[str] | None, resize: int, crop: int, mean, std):
    """``(names, images [N,3,crop,crop], labels [N], boxes per photo, transforms)``."""
    from PIL import Image
    from salmap.pipeline.decode import preprocess
    from salmap.pipeline.demo_data import PHOTOS, _photo

    chosen = [n for n in PHOTOS if names is None or n in names]
    unknown = sorted(set(names or ()) - set(PHOTOS))
    if unknown:
        raise SystemExit(f"unknown photo(s) {unknown}; the demo has {', '.join(PHOTOS)}")
    images, labels, boxes, transforms = [], [], [], []
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for name in chosen:
        loader, label, annotated = PHOTOS[name]
        img = Image.fromarray(_photo(loader)).convert("RGB")
        arr, geo = preprocess(img, resize, crop)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
        images.append((x - m) / s)
        labels.append(label)
        boxes.append([b for b, c in annotated if c == label] or None)
        transforms.append({"orig_h": img.height, "orig_w": img.width, **geo})
    return chosen, torch.stack(images), torch.tensor(labels), boxes, transforms


def centre_gaussian(n: int, h: int, w: int) -> torch.Tensor:
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    g = torch.exp(-(ys[:, None] ** 2 / (2 * (h / 4) ** 2) + xs[None] ** 2 / (2 * (w / 4) ** 2)))
    return g.expand(n, h, w).clone()


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the channel-mean image: where the photo has edges. The
    border is replicated: zero padding would make the image's frame its strongest edge."""
    import torch.nn.functional as F

    g = F.pad(images.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3)
    gx = F.conv2d(g, kx)
    gy = F.conv2d(g, kx.transpose(2, 3))
    return (gx.square() + gy.square()).sqrt()[:, 0]


def run_method(name: str, model, images, labels, batch: int, device) -> tuple[torch.Tensor, float]:
    """Maps ``[N,h,w]`` on the CPU and wall seconds per image."""
    from salmap.workers.methods import build

    method = build(name, model)
    parts = []
    t0 = time.perf_counter()
    for start in range(0, images.shape[0], batch):
        sl = slice(start, start + batch)
        parts.append(method(images[sl].to(device), labels[sl].to(device)).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(parts), (time.perf_counter() - t0) / images.shape[0]


def score(maps, model, images, labels, boxes, transforms, mean, std, device,
          params: dict | None = None) -> dict:
    """Per-photo region deletion / insertion AUC, ROAD columns, pixel deletion AUC, pointing
    hits and Gini of ``maps``."""
    from salmap.workers.metrics import compute_model_metrics, compute_post_metrics
    from salmap.workers.metrics.geometry import map_to_input, map_to_original

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).float()

    with torch.inference_mode():
        faith = compute_model_metrics(MODEL_METRICS, forward,
                                      images.to(device), maps.to(device), labels.to(device),
                                      params, mean=mean, std=std)
    hits, ginis = [], []
    for i in range(maps.shape[0]):
        orig = map_to_original(maps[i], transforms[i])
        post = compute_post_metrics(["pointing_game", "gini"], orig, boxes[i],
                                    saliency_input=map_to_input(maps[i], transforms[i]))
        hits.append(post["pointing_hit"])
        ginis.append(post["gini"])
    return {"deletion": faith["deletion_auc"].tolist(),
            "region_deletion": faith["region_deletion_auc"].tolist(),
            "region_insertion": faith["region_insertion_auc"].tolist(),
            **{c: faith[c].tolist() for c in ROAD_COLUMNS}, "hits": hits, "gini": ginis}


def tsgb_balance(model, images, labels, device) -> list[float]:
    """``|sum M| / sum |M|`` of the TSGB map per photo."""
    from salmap.workers.methods import build

    maps = build("tsgb", model)(images.to(device), labels.to(device)).cpu().flatten(1)
    return (maps.sum(1).abs() / maps.abs().sum(1)).tolist()


def main(argv: list[str] | None = None) -> int:
    from salmap.workers.methods import names as method_names
    from salmap.workers.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--photos", default="", help="comma-separated demo photos (default: all)")
    parser.add_argument("--batch", type=int, default=4, help="photos per method call")
    parser.add_argument("--seeds", type=int, default=5, help="random maps averaged")
    parser.add_argument("--road-percentiles", default="10,20,30,40,50,60,70,80,90",
                        help="ROAD's percentiles (comma-separated; default the metric's nine)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--results", default="",
                        help="JSON file that keeps each row's scores as they come; a rerun with "
                             "the same photos, seeds and percentiles scores only what is missing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    road_p = tuple(float(v) for v in args.road_percentiles.split(",") if v)
    mp = {"road": {"road_percentiles": road_p}}
    methods = [m for m in args.methods.split(",") if m] or method_names()
    bad = [m for m in methods if m not in method_names()]
    if bad:
        parser.error(f"unknown method(s) {bad}")

    loaded = load_model("efficientnet_lite0")
    model = loaded.model.to(device).eval()
    p = loaded.preprocess
    photos, images, labels, boxes, transforms = demo_photos(
        [n for n in args.photos.split(",") if n] or None, p.resize, p.crop, p.mean, p.std)
    n = len(photos)

    print("## Method quality: every method at its defaults, EfficientNet-Lite0, demo photos\n")
    print(f"date {time.strftime('%Y-%m-%d')}; device {device_name(device)}; {versions()}; "
          f"{load_avg()}\n")
    print(f"photos ({n}, explained class = label): {', '.join(photos)}\n")

    warm = images[:1].to(device).requires_grad_(True)  # first-call costs out of the timings
    model(warm)[0, 0].backward()
    h, w = images.shape[-2:]
    key = repr((photos, args.seeds, road_p))
    saved = {}
    if args.results and Path(args.results).exists():
        saved = json.loads(Path(args.results).read_text())
        if saved.get("key") != key:
            saved = {}
    results: dict[str, dict] = saved.get("results", {})
    times: dict[str, float | None] = saved.get("times", {})

    def keep() -> None:
        if args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps({"key": key, "results": results,
                                                      "times": times}))

    rand = [] if "random" in results else [score(torch.rand(n, h, w, generator=torch.Generator().manual_seed(s)), model,
                  images, labels, boxes, transforms, p.mean, p.std, device, mp)
            for s in range(args.seeds)]
    if rand:
        results["random"] = {k: [statistics.mean(r[k][i] for r in rand) if k != "hits" else
                                 rand[0][k][i] for i in range(n)] for k in rand[0]}
        results["random"]["hits"] = [None if rand[0]["hits"][i] is None else
                                     statistics.mean(float(r["hits"][i]) for r in rand)
                                     for i in range(n)]
        times["random"] = None
        keep()
    if "centre" not in results:
        results["centre"] = score(centre_gaussian(n, h, w), model, images, labels, boxes,
                                  transforms, p.mean, p.std, device, mp)
        times["centre"] = None
    if "edge" not in results:
        results["edge"] = score(edge_map(images), model, images, labels, boxes, transforms,
                                p.mean, p.std, device, mp)
        times["edge"] = None
    keep()
    print("... baselines scored", file=sys.stderr, flush=True)
    for name in methods:
        if name in results:
            continue
        maps, per_image = run_method(name, model, images, labels, args.batch, device)
        results[name] = score(maps, model, images, labels, boxes, transforms, p.mean, p.std,
                              device, mp)
        times[name] = per_image
        keep()
        print(f"... {name}: {per_image:.2f} s per image", file=sys.stderr, flush=True)

    random_region = statistics.mean(results["random"]["region_deletion"])
    rows = []
    methods = [m for m in methods if m in results]
    for name in [*BASELINES, *methods]:
        r = results[name]
        trials = [float(v) for v in r["hits"] if v is not None]
        rows.append({
            "method": name,
            "region deletion ↓": mean_ci(r["region_deletion"]),
            "region del / random ↓": statistics.mean(r["region_deletion"]) / random_region,
            "region insertion ↑": mean_ci(r["region_insertion"]),
            "ROAD MoRF ↓": mean_ci(r["road_morf"]),
            "ROAD LeRF ↑": mean_ci(r["road_lerf"]),
            "ROAD gap ↑": mean_ci(r["road_gap"]),
            "pointing ↑": f"{sum(trials):.1f}/{len(trials)}" if name == "random" else
                          f"{int(sum(trials))}/{len(trials)}",
            "Gini": statistics.mean(r["gini"]),
            "pixel deletion (secondary) ↓": statistics.mean(r["deletion"]),
            "s / image": "" if times[name] is None else times[name],
        })
    table(rows)
    print("Intervals: 95 % percentile bootstrap over the photos. `random`: region and ROAD "
          f"scores of uniform-noise maps, mean of {args.seeds} seeds (its patch order is "
          "random at the metrics' granularity). ROAD percentiles "
          f"{', '.join(f'{v:g}' for v in road_p)}; MoRF / LeRF: mean softmax probability of "
          "the label over them; gap = LeRF - MoRF (= 2 x ROAD Combined). Pixel deletion: "
          "RISE, per-pixel order, zero substrate; secondary (see the module docstring).\n")
    print("Per photo ROAD gap (LeRF - MoRF; " + ", ".join(photos) + "):\n")
    table([{"method": k, **{ph: results[k]["road_gap"][i] for i, ph in enumerate(photos)}}
           for k in [*BASELINES, *methods]])
    balance = tsgb_balance(model, images, labels, device)
    print("TSGB relevance balance |sum M| / sum |M| on Lite0 (0 = zero-sum): "
          + ", ".join(f"{ph} {b:.3f}" for ph, b in zip(photos, balance))
          + f"; mean {np.mean(balance):.3f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
