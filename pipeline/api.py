"""salmap from Python (a notebook, a script): run a job, explain in-memory images without Ray,
read a run as pandas.

    from salmap.pipeline import api

    result = api.run("configs/example.yaml", overrides=["run.id=nb"])  # or a dict
    df = api.read(result.output, maps=True)      # pandas; each row's map a float32 [h, w] array

    ex = api.Explainer(model, "integrated_gradients", metrics=["deletion_auc", "gini"])
    out = ex.explain(images)   # [B, 3, H, W] normalised tensor, PIL images, arrays or files
    out = ex.explain(loader)   # a DataLoader of images, (images, labels) or {"image", "label"}

:class:`Explainer` is the pipeline's own model actor (:class:`salmap.workers.actor.Explainer`: the
model, the method, the model-side metrics) followed by its post stage
(:func:`salmap.pipeline.post.post_batch`: maps back to the image, PNGs, box metrics), called
in-process: the rows are the rows a run would write, with the same methods and metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .read import maps, read_frame, to_maps

__all__ = ["Explainer", "maps", "read", "run"]


def run(config: str | os.PathLike | dict, overrides: Sequence[str] = (), verbose: bool = False,
        out=print, allow_remote_code: bool = False):
    """Run (or resume) a job from a config file or a dict of the same keys; returns the
    :class:`salmap.pipeline.run.RunResult` (``exit_code``, ``output``, ``units``, ``failures``,
    ``report``). Ray starts as the config says (``ray.address``); its log lines are kept off
    the console unless ``verbose``. ``allow_remote_code``: run an ``s3://`` config that names
    custom code (README, Security)."""
    from .config import load_config
    from .logs import quiet_ray_logging
    from .run import run_job

    if isinstance(config, dict):
        cfg = load_config(config, list(overrides))
    else:
        cfg = load_config(str(config), list(overrides), allow_remote_code=allow_remote_code)
    quiet_ray_logging(verbose)
    return run_job(cfg, out=out, report=True)  # the report too (run.report), under the lock


def read(run: str, unit: str | None = None, columns: list[str] | None = None, maps: bool = False,
         endpoint: str | None = None, storage: Any = None):
    """A run's committed rows as pandas (see :func:`salmap.pipeline.read.read_frame`): every column
    but the map and the PNGs by default; ``maps=True`` adds ``saliency``, one float32
    ``[h, w]`` array per row."""
    return read_frame(run, unit=unit, columns=columns, maps=maps, endpoint=endpoint,
                      storage=storage)


class Explainer:
    """One model and one method with the pipeline's metrics, on in-memory images, without Ray.

    ``model``: an ``nn.Module`` (put in eval mode and moved to ``device``; ``input_size``,
    ``mean``, ``std`` describe its preprocessing, ImageNet's by default), or a model source
    as in a config (``torchvision:resnet50``, ``efficientnet_lite0``, ``package.module:fn``)
    with ``weights``. ``method``, ``params``: a registry name and its parameters;
    ``metrics``: as the config's ``metrics`` list; ``targets``: ``predicted``, ``label``,
    ``all_labels`` or ``topk:K``.
    """

    def __init__(self, model: Any, method: str, params: dict | None = None,
                 metrics: Sequence[Any] = (), targets: str = "predicted",
                 weights: str | None = "DEFAULT", input_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 target_layer: str | None = None, device: str | None = None,
                 precision: str = "fp32", name: str = "model", batch_size: int = 16) -> None:
        from salmap.workers import methods as method_registry
        from salmap.workers.metrics import METRICS, check_params

        from .config import ConfigError, metric_specs, parse_targets, split_metric_specs

        method_registry.check_params(method, dict(params or {}))
        self.mode, self.topk = parse_targets(targets)
        specs = metric_specs(SimpleNamespace(metrics=list(metrics)))
        unknown = [m for m in specs if m not in METRICS]
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        check_params(specs)
        self.model_metrics, self.post_metrics, self.curves = split_metric_specs(specs)
        self.method, self.params, self.name = method, dict(params or {}), name
        self.device, self.precision, self.batch_size = device, precision, int(batch_size)
        self.loaded = self._load(model, weights, input_size, mean, std, target_layer)
        self._actors: dict[tuple[str, int], Any] = {}

    # -- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _load(model: Any, weights: str | None, input_size: int | None, mean, std,
              target_layer: str | None):
        from salmap.workers.methods.layers import resolve_layer
        from salmap.workers.models import (
            IMAGENET_MEAN,
            IMAGENET_STD,
            LoadedModel,
            Preprocess,
            load_model,
        )

        if isinstance(model, str):
            loaded = load_model(model, weights, target_layer, input_size)
            if mean is not None or std is not None:
                p = loaded.preprocess
                loaded.preprocess = Preprocess(p.crop, p.resize, tuple(mean or p.mean),
                                               tuple(std or p.std))
            return loaded
        crop = int(input_size or 224)
        pre = Preprocess(crop=crop, resize=int(round(crop * 256 / 224)),
                         mean=tuple(mean or IMAGENET_MEAN), std=tuple(std or IMAGENET_STD))
        model.eval()
        layer, _ = resolve_layer(model, target_layer)
        return LoadedModel(model=model, preprocess=pre, target_layer=layer)

    def _actor(self, mode: str, crop: int):
        """The pipeline's model actor for this targets mode and input size (built once each)."""
        key = (mode, crop)
        if key not in self._actors:
            from salmap.workers.actor import ActorSpec
            from salmap.workers.actor import Explainer as ActorExplainer
            from salmap.workers.models import LoadedModel, Preprocess

            p = self.loaded.preprocess
            loaded = self.loaded if p.crop == crop else LoadedModel(
                self.loaded.model, Preprocess(crop, int(round(crop * p.resize / p.crop)), p.mean,
                                              p.std), self.loaded.target_layer)
            spec = ActorSpec(
                model={"name": self.name, "source": "in-memory", "weights": None,
                       "target_layer": self.loaded.target_layer, "input_size": crop},
                method=self.method, method_params=self.params, targets=mode, topk=self.topk,
                metrics=self.model_metrics, precision=self.precision, channels_last=False,
                device=self.device, map_dtype="float32")
            self._actors[key] = ActorExplainer(spec, loaded=loaded)
        return self._actors[key]

    # -- explaining ---------------------------------------------------------------------------
    def explain(self, images: Any, targets: Sequence[int] | None = None,
                labels: Sequence[int] | None = None,
                boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                ids: Sequence[str] | None = None):
        """Explain ``images``; a pandas DataFrame with one row per (image, target), the
        columns a run writes, and ``saliency`` as one float32 ``[h, w]`` array per row.

        ``images``: a float tensor ``[B, 3, S, S]`` already normalised for the model; a list
        of PIL images, ``uint8 [H, W, 3]`` arrays or image file paths (resized, cropped and
        normalised as a run does, maps and boxes mapped back to their pixels); or an iterable
        of batches (a ``DataLoader``) of tensors, ``(images, labels)`` or dicts with
        ``image``/``images`` and ``label``/``labels``. ``targets``: the class to explain per
        image (else the ``targets`` mode); ``labels``: true classes (for ``targets="label"``);
        ``boxes``: per image, ground-truth boxes ``[x0, y0, x1, y1]`` of its class in its own
        pixels (pointing game, box IoU).
        """
        import pandas as pd

        if _is_batch(images):
            return self._explain_batch(images, targets, labels, boxes, ids, offset=0)
        frames, offset = [], 0
        for batch in images:
            x, y = _split_batch(batch)
            n = len(x)
            frames.append(self._explain_batch(
                x, _part(targets, offset, n), _part(labels, offset, n) if labels is not None else y,
                _part(boxes, offset, n), _part(ids, offset, n), offset))
            offset += n
        if not frames:
            raise ValueError("no images to explain")
        return pd.concat(frames, ignore_index=True)

    def _explain_batch(self, images: Any, targets, labels, boxes, ids, offset: int):
        import pandas as pd

        rows = _rows(images, self.loaded.preprocess, offset)
        n = len(rows)
        for name, given in (("targets", targets), ("labels", labels), ("boxes", boxes), ("ids", ids)):
            if given is not None and len(given) != n:
                raise ValueError(f"{name}: got {len(given)} for {n} images")
        explicit = targets is not None
        for i, r in enumerate(rows):
            if ids is not None:
                r["sample_id"] = r["key"] = str(ids[i])
            label = _as_int(targets[i]) if explicit else (
                _as_int(labels[i]) if labels is not None else -1)
            r["label"] = label
            if boxes is not None and boxes[i]:
                cls = label if label >= 0 else -1
                r["boxes_json"] = json.dumps({"boxes": [list(map(float, b)) for b in boxes[i]],
                                              "labels": [cls] * len(boxes[i]) if cls >= 0 else []})
        crop = rows[0]["_crop"] if rows else self.loaded.preprocess.crop
        actor = self._actor("label" if explicit else self.mode, crop)
        frames = []
        for start in range(0, n, self.batch_size):
            part = rows[start:start + self.batch_size]
            out = actor(_columns(part))
            from .post import post_batch

            table = post_batch(out, self.post_metrics, self.curves, map_dtype="float32")
            df = table.drop_columns(["saliency"]).to_pandas()
            df["saliency"] = [None if np.isnan(m).all() else m for m in to_maps(table.column("saliency"))]
            frames.append(df)
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        order = {r["sample_id"]: i for i, r in enumerate(rows)}  # the input's order
        df = df.sort_values("sample_id", key=lambda s: s.map(order), kind="stable",
                            ignore_index=True)
        if explicit:  # the label column holds the true labels, not the classes asked for
            df["target_source"] = "given"
            truth = {r["sample_id"]: (_as_int(labels[i]) if labels is not None else None)
                     for i, r in enumerate(rows)}
            df["label"] = [truth.get(s) for s in df["sample_id"]]
        return df


# -- inputs -> the decode stage's rows ---------------------------------------------------------
def _is_batch(images: Any) -> bool:
    """A single batch (tensor, array, list of images) rather than an iterable of batches."""
    try:
        import torch

        if isinstance(images, torch.Tensor):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(images, np.ndarray):
        return True
    if isinstance(images, (list, tuple)):
        return not images or not _looks_like_batch(images[0])
    return False


def _looks_like_batch(item: Any) -> bool:
    import torch

    if isinstance(item, dict):
        return True
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return isinstance(item[0], (torch.Tensor, list, np.ndarray)) and not isinstance(item[1], str)
    return isinstance(item, torch.Tensor) and item.dim() == 4


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """(images, labels or None) of one DataLoader batch."""
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("images"))
        y = batch.get("label", batch.get("labels"))
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, y = batch
    else:
        x, y = batch, None
    if y is not None:
        y = [int(v) for v in (y.tolist() if hasattr(y, "tolist") else y)]
    return x, y


def _part(values: Sequence | None, start: int, n: int) -> list | None:
    return None if values is None else list(values[start:start + n])


def _as_int(v: Any) -> int:
    return int(v.item() if hasattr(v, "item") else v)


def _rows(images: Any, pre, offset: int) -> list[dict[str, Any]]:
    """The decode stage's rows for in-memory images (see :mod:`salmap.pipeline.decode`)."""
    import torch
    from PIL import Image

    from .decode import DecodeError, open_image, preprocess, to_rgb

    def base(i: int) -> dict[str, Any]:
        sid = str(offset + i)
        return {"sample_id": sid, "shard": "", "key": sid, "image_file": "", "label": -1,
                "label_error": "", "boxes_json": "", "boxes_error": "", "shard_samples": -1,
                "shard_error": "", "status": "ok", "error": ""}

    if isinstance(images, (list, tuple)) and images and all(
            isinstance(t, torch.Tensor) and t.dim() == 3 for t in images):
        images = torch.stack(list(images))
    if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.ndim == 4
                                            and images.dtype != np.uint8):
        x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else \
            np.asarray(images, np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise ValueError(f"a tensor of images must be [B, 3, S, S] (square, normalised for "
                             f"the model), got {tuple(x.shape)}")
        s = int(x.shape[2])
        geo = {"orig_height": s, "orig_width": s, "resized_h": s, "resized_w": s,
               "crop_top": 0, "crop_left": 0, "crop_h": s, "crop_w": s}
        return [{**base(i), **geo, "image": x[i], "_crop": s} for i in range(len(x))]
    rows = []
    for i, item in enumerate(images):
        r = {**base(i), "image": None, "orig_height": -1, "orig_width": -1, "resized_h": 0,
             "resized_w": 0, "crop_top": 0, "crop_left": 0, "crop_h": 0, "crop_w": 0,
             "_crop": pre.crop}
        try:
            if isinstance(item, (str, os.PathLike)):
                r["image_file"] = Path(item).name
                img = open_image(Path(item).read_bytes(), 89_478_485)
            elif isinstance(item, Image.Image):
                img = to_rgb(item)
            else:
                arr = np.asarray(item)
                if arr.dtype != np.uint8:
                    raise DecodeError(f"an image array must be uint8 [H, W, 3], got {arr.dtype}")
                img = to_rgb(Image.fromarray(arr))
            r["orig_width"], r["orig_height"] = img.size
            r["image"], geo = preprocess(img, pre.resize, pre.crop)
            r.update(geo)
        except (DecodeError, OSError, ValueError) as err:
            r["status"], r["error"] = "error", str(err)
        rows.append(r)
    return rows


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> the actor's input batch (numpy columns; failed images get a blank image)."""
    from salmap.workers.columns import numpy_column

    from .decode import DECODE_KINDS

    first = next((r["image"] for r in rows if r["image"] is not None), None)
    crop = rows[0]["_crop"]
    blank = np.zeros_like(first) if first is not None else np.zeros((crop, crop, 3), np.uint8)
    batch = {"image": np.stack([r["image"] if r["image"] is not None else blank for r in rows])}
    for col, kind in DECODE_KINDS.items():
        batch[col] = numpy_column(kind, [r.get(col) for r in rows])
    return batch

