"""A planted shortcut on the project's ground-truth data: a corner mark that predicts the class
in part of the images, a small CNN trained on them, its Grad-CAM maps written as a committed
salmap run, for ``salmap analyze`` to find.

The images are :func:`salmap.workers.synthetic.make_dataset`'s (one shape per image, its
class: square or disc, on a textured background), its spurious-cue variant: in ``cue_share``
of the images a bright 3 x 3 mark sits in the corner of the image's class (class 0: top left,
class 1: top right), never on the object. The CNN (``synthetic.train_model``'s ``"vgg"``,
pure ReLU) learns the mark: where it is, it is a far easier cue than the shape. The maps of
the marked images then sit on their class's corner; the others on the object. With
``cue_share=0`` nothing is planted, and the analysis must flag nothing. Where the object
lies is the synthetic module's business; this file only reads its masks (boxes = the masks'
bounding boxes).

Used by ``tests/test_analyze_planted.py`` (small) and ``bench/analyze_shortcut.py`` (full).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

SIZE = 32
MODEL, METHOD = "cnn", "gradcam"
UNIT = f"{MODEL}__{METHOD}"
LAYER = "features.11"  # SmallVGG's last ReLU: an 8 x 8 grid at 32 x 32 input


def make_images(n: int, cue_share: float, seed: int = 0, **dataset: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images [n, 3, S, S] float32 in [0, 1], labels [n], cue [n] bool, boxes [n, 4] x0 y0
    x1 y1)`` from ``synthetic.make_dataset(n, seed, spurious_fraction=cue_share)``: two
    classes, ``cue_share`` of the images with their class's corner mark; the boxes enclose
    each object's mask (pixel edges). ``dataset``: more ``make_dataset`` arguments
    (``texture``, ``min_radius``, ...); ``style`` defaults to ``"colour"``, the data this
    analysis was built and checked on (a saturated object is easy to learn in a few epochs)."""
    from salmap.workers.synthetic import make_dataset

    data = make_dataset(n, seed=seed, spurious_fraction=cue_share, size=SIZE, num_classes=2,
                        **{"style": "colour", **dataset})
    return (data.images.numpy(), data.labels.numpy(), data.cue_flags.numpy().astype(bool),
            mask_boxes(data.masks.numpy()))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """``[n, 4]`` float32 ``x0 y0 x1 y1``: the bounding box of each bool mask ``[n, H, W]``
    in pixel edges (a one-pixel mask at (0, 0) is ``0 0 1 1``); the whole image if empty."""
    n, h, w = masks.shape
    out = np.tile(np.array([0, 0, w, h], np.float32), (n, 1))
    for i in range(n):
        ys, xs = np.nonzero(masks[i])
        if len(ys):
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def train(x: np.ndarray, y: np.ndarray, epochs: int = 4, seed: int = 0,
          batch: int = 64, width: int = 16) -> nn.Module:
    """``synthetic.train_model("vgg", ...)`` on images ``x`` in [0, 1] (no cache: each caller
    trains its own; ``width``: the first layer's channels); the model takes
    ``synthetic.normalise``d images."""
    from salmap.workers.synthetic import SyntheticData, train_model

    xt, yt = torch.from_numpy(x), torch.from_numpy(np.asarray(y)).long()
    # cue_flags all set: train_model then never flips an image (a flip moves a corner mark)
    data = SyntheticData(xt, yt, torch.zeros(len(x), SIZE, SIZE, dtype=torch.bool),
                         torch.ones(len(x), dtype=torch.bool), 3)
    return train_model("vgg", data, seed=seed, epochs=epochs, batch_size=batch, width=width,
                       cache_dir=None, init="torch")  # the init this analysis was checked with


def predict(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's class for each image ``x`` in [0, 1]."""
    from salmap.workers.synthetic import normalise

    with torch.no_grad():
        return torch.cat([model(normalise(torch.from_numpy(x[i:i + batch]))).argmax(1)
                          for i in range(0, len(x), batch)]).numpy()


def gradcam_maps(model: nn.Module, x: np.ndarray, targets: np.ndarray,
                 batch: int = 256) -> np.ndarray:
    """salmap's Grad-CAM (``salmap.workers.methods``) of ``targets`` on images ``x`` in [0, 1]
    (at the layer's 8 x 8 grid, as salmap stores CAM maps)."""
    from salmap.workers.methods import build
    from salmap.workers.synthetic import normalise

    cam = build("gradcam", model, target_layer=LAYER)
    out = []
    for i in range(0, len(x), batch):
        m = cam(normalise(torch.from_numpy(x[i:i + batch])),
                torch.from_numpy(targets[i:i + batch]).long())
        out.append(np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m,
                              dtype=np.float32))
    return np.concatenate(out)


def energy_in_box(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The share of each non-negative map inside its box (the run's energy_pointing; boxes
    in image pixels, maps at any grid: cells whose centre lies in the box)."""
    from salmap.pipeline.analyze.core import box_mask

    m = np.maximum(np.nan_to_num(maps), 0)
    out = np.full(len(m), np.nan, dtype=np.float32)
    whole = {"x0": 0.0, "y0": 0.0, "x1": float(SIZE), "y1": float(SIZE)}
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        inside = box_mask({"x0": x0, "y0": y0, "x1": x1, "y1": y1}, whole, m.shape[1])
        total = m[i].sum()
        if total > 0:
            out[i] = m[i][inside].sum() / total
    return out


def _png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def map_png(m: np.ndarray) -> bytes:
    """A map as salmap's ``saliency_png``: min-max scaled to 0..255 at the image's size."""
    m = np.nan_to_num(m.astype(np.float64))
    rep = SIZE // m.shape[0]
    big = np.kron(m, np.ones((rep, rep))) if rep > 1 else m
    lo, hi = big.min(), big.max()
    g = np.zeros(big.shape, np.uint8) if hi <= lo else ((big - lo) / (hi - lo) * 255).astype(np.uint8)
    return _png(g)


def write_shard(path: str, images: np.ndarray, n: int) -> None:
    """The images as one WebDataset tar (``<key>.png``), keys as :func:`write_run` names them."""
    import io
    import tarfile

    lo, hi = images.min(), images.max()
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            rgb = ((images[i].transpose(1, 2, 0) - lo) / (hi - lo) * 255).astype(np.uint8)
            data = _png(rgb)
            info = tarfile.TarInfo(f"{i:07d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_run(root: str, maps: np.ndarray, targets: np.ndarray, preds: np.ndarray,
              boxes: np.ndarray | None = None, per_file: int = 2000,
              images: np.ndarray | None = None, model: str = MODEL) -> str:
    """A committed salmap run at ``root`` holding ``maps`` as unit ``<model>__gradcam``: the
    real output schema, commit records and manifest (what ``salmap run`` writes), with
    ``energy_pointing`` against ``boxes`` when given. With ``images``, also their shard
    (``<root>.shards/synthetic.tar``, named in the manifest's config), each row's
    ``saliency_png`` and its box as ``pseudo_box``, so the report and exports show them.
    ``model``: the unit's model name (``<model>__gradcam``)."""
    from salmap.pipeline.execute import part_name
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.storage import Store
    from salmap.workers.columns import output_schema

    store = Store.open(root)
    unit = f"{model}__{METHOD}"
    n = len(maps)
    h, w = maps.shape[1:]
    schema = output_schema(h, w, map_dtype="float32")
    energy = energy_in_box(maps, boxes) if boxes is not None else np.full(n, np.nan)
    ids = [f"synthetic/{i:07d}" for i in range(n)]
    files = []
    for a in range(0, n, per_file):
        b = min(n, a + per_file)
        cols = {"sample_id": ids[a:b], "shard": ["synthetic"] * (b - a),
                "key": [s.split("/")[1] for s in ids[a:b]],
                "image_file": [f"{s.split('/')[1]}.png" for s in ids[a:b]],
                "model": [model] * (b - a), "method": [METHOD] * (b - a),
                "target": targets[a:b].astype(int).tolist(), "target_source": ["label"] * (b - a),
                "label": targets[a:b].astype(int).tolist(), "pred": preds[a:b].astype(int).tolist(),
                "orig_height": [SIZE] * (b - a), "orig_width": [SIZE] * (b - a),
                "crop_box": [{"x0": 0.0, "y0": 0.0, "x1": float(SIZE), "y1": float(SIZE)}] * (b - a),
                "energy_pointing": [None if not np.isfinite(v) else float(v) for v in energy[a:b]],
                "saliency_png": [map_png(m) for m in maps[a:b]] if images is not None else None,
                "pseudo_box": [dict(zip(("x0", "y0", "x1", "y1"), map(float, bx)))
                               for bx in boxes[a:b]] if images is not None and boxes is not None
                else None,
                "status": ["ok"] * (b - a), "error": [""] * (b - a)}
        arrays = []
        for f in schema:
            if f.name == "saliency":
                flat = pa.array(maps[a:b].reshape(-1).astype(np.float32))
                arrays.append(pa.ExtensionArray.from_storage(
                    f.type, pa.FixedSizeListArray.from_arrays(flat, h * w)))
            else:
                arrays.append(pa.array(cols.get(f.name) or [None] * (b - a), type=f.type))
        keys = [(s, int(t)) for s, t in zip(ids[a:b], targets[a:b])]
        key = f"data/{model}/{METHOD}/w{a // per_file:05d}/{part_name(unit, keys)}"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), sink)
        store.write_bytes(key, sink.getvalue().to_pybytes())
        files.append(key)
    ledger = Ledger(store)
    for w, key in enumerate(files):
        ledger.commit(unit, {"unit": unit, "wave": f"w{w:05d}", "files": [key],
                             "rows": min(per_file, n - w * per_file), "errors": 0,
                             "samples": min(per_file, n - w * per_file), "shards": ["synthetic"],
                             "shard_identity": {}, "per_shard": {}})
    config: dict = {"models": [{"name": model}]}
    if images is not None:
        import os

        shards = root.rstrip("/") + ".shards"
        os.makedirs(shards, exist_ok=True)
        write_shard(os.path.join(shards, "synthetic.tar"), images, n)
        config["input"] = {"shards": [os.path.join(shards, "synthetic.tar")]}
    store.write_json("manifest.json", {"run_id": root.rstrip("/").rsplit("/", 1)[-1],
                                       "status": "complete", "units": {unit: {}},
                                       "config": config})
    return store.uri


def planted_run(root: str, n_train: int, n_test: int, cue_share: float, epochs: int = 3,
                seed: int = 0, test_cue_share: float | None = None,
                model: nn.Module | None = None, with_images: bool = False,
                dataset: dict | None = None, width: int = 16, batch: int = 64
                ) -> tuple[str, np.ndarray, dict, nn.Module]:
    """Train on a planted dataset (or take ``model``), explain a fresh test set (seed + 1)
    with Grad-CAM (target: the label), the mark on ``test_cue_share`` of its images (default
    ``cue_share``), and write the run: ``(run, cue [n_test], facts, model)``, facts = the
    model's accuracy overall, on marked and on unmarked images, how many are marked.
    ``dataset``: more ``make_dataset`` arguments, for both sets; ``width``, ``batch``: the
    CNN's and the training's (:func:`train`)."""
    if model is None:
        x, y, _, _ = make_images(n_train, cue_share, seed, **(dataset or {}))
        model = train(x, y, epochs=epochs, seed=seed, batch=batch, width=width)
    share = cue_share if test_cue_share is None else test_cue_share
    xt, yt, cue, boxes = make_images(n_test, share, seed + 1, **(dataset or {}))
    pred = predict(model, xt)
    maps = gradcam_maps(model, xt, yt)
    run = write_run(root, maps, yt, pred, boxes, images=xt if with_images else None)
    facts = {"acc": float((pred == yt).mean()),
             "acc_marked": float((pred[cue] == yt[cue]).mean()) if cue.any() else float("nan"),
             "acc_unmarked": float((pred[~cue] == yt[~cue]).mean()) if (~cue).any()
             else float("nan"),
             "marked": int(cue.sum())}
    return run, cue, facts, model
