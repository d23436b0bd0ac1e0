"""The model actor: one model, one method, the model-side metrics. Usable without Ray.

Ray Data instantiates :class:`Explainer` once per actor (the model loads once) and calls it
on batches of decoded samples. Each call returns one row per (sample, target); a sample that
cannot be explained becomes an error row instead of failing the batch. Out-of-memory splits
the batch in half and retries, down to one sample; any other error fails the call's samples
once (error rows with the reason), without retries.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import methods as method_registry
from .columns import (
    ACTOR_OUTPUT,
    BY_NAME,
    CURVE_COLUMNS,
    MAP_DTYPES,
    MODEL_METRIC_COLUMNS,
    PASS_THROUGH,
    SHARD_END,
    numpy_column,
)
from .models import LoadedModel, load_model
from .progress import ProgressReporter
from .unit_id import format_unit_id

log = logging.getLogger(__name__)

# a decoded row with this status marks the end of a shard (see pipeline.shard_reader); the
# actor and the post stage pass it on untouched


def _text(batch: dict[str, np.ndarray], column: str, i: int) -> str:
    """A string column's value for sample i, or "" where the batch lacks the column."""
    return str(batch[column][i]) if column in batch else ""


def _annotation_note(batch: dict[str, np.ndarray], i: int, targets: str) -> str:
    """For an ok row: what was wrong with the sample's .cls or .json, which the row had to do
    without (boxes metrics are null when the .json was unreadable)."""
    boxes_error, label_error = _text(batch, "boxes_error", i), _text(batch, "label_error", i)
    notes = [f".json ignored: {boxes_error}"] if boxes_error else []
    if targets != "label" and label_error:
        notes.append(f".cls ignored: {label_error}")
    return "; ".join(notes)


@dataclass
class ActorSpec:
    """Everything an actor needs, as plain data (it is pickled to every actor)."""

    model: dict[str, Any]  # name, source, weights, target_layer, input_size, arch, reshape
    method: str
    method_params: dict[str, Any] = field(default_factory=dict)
    targets: str = "predicted"  # predicted | label | all_labels | topk
    topk: int = 1
    metrics: dict[str, dict] = field(default_factory=dict)  # model-side metric name -> params
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    device: str | None = None  # None: cuda when available, else cpu
    map_dtype: str = "float16"  # how maps are stored: float16 or float32 (workers.columns)


def _actor_id() -> str:
    """The Ray actor's id when running as one, else a random id (the class used directly)."""
    try:
        import ray

        if ray.is_initialized():
            actor = ray.get_runtime_context().get_actor_id()
            if actor:
                return str(actor)
    except Exception:  # noqa: BLE001 - accounting only
        pass
    import uuid

    return uuid.uuid4().hex


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA or host): the actor then halves the batch."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError) or "out of memory" in str(err).lower()
    )


class Explainer:
    """Callable class for ``map_batches``: decoded batch in, explained rows out."""

    def __init__(self, spec: ActorSpec, loaded: LoadedModel | None = None) -> None:
        """``loaded``: a model already built (the Python API's in-memory use); else the spec's."""
        self.started_ms = int(time.time() * 1000)  # the device is held from here on
        self.actor_id = _actor_id()
        self.spec = spec
        self.map_np = MAP_DTYPES[spec.map_dtype][1]
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        m = spec.model
        self.loaded: LoadedModel = loaded if loaded is not None else load_model(
            m["source"], m.get("weights"), m.get("target_layer"), m.get("input_size"), m.get("arch"),
            m.get("params"), m.get("mean"), m.get("std"), reshape=m.get("reshape"),
        )
        self.model = self.loaded.model.to(self.device)
        if spec.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = dict(spec.method_params)
        params.setdefault("precision", spec.precision)
        cls = method_registry.get_class(spec.method)
        if cls.uses_target_layer:
            params.setdefault("target_layer", self.loaded.target_layer)
            if self.loaded.reshape is not None:
                params.setdefault("reshape", self.loaded.reshape)
        self.method = method_registry.build(spec.method, self.model, **params)
        p = self.loaded.preprocess
        self.mean = torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1)
        self.forward_fn = self._make_forward()
        self.map_shape = self._probe_map_shape()
        # in-batch progress for the driver (pipeline.progress); a no-op without its counter
        self.progress = ProgressReporter.for_unit(format_unit_id(m["name"], spec.method))

    # -- setup -------------------------------------------------------------------------
    def _make_forward(self):
        """The no-grad forward of predictions and metrics (autocast to ``precision``; with
        ``compile``, ``torch.compile``d, falling back to eager for good if compiling fails:
        compilation is lazy, so a failure shows only at the first call)."""
        eager = self.model
        compiled = [torch.compile(eager)] if self.spec.compile else []
        dtype = method_registry.PRECISIONS.get(self.spec.precision)

        def run(model, x: Tensor) -> Tensor:
            if dtype is None:
                return model(x).float()
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return model(x).float()

        def forward(x: Tensor) -> Tensor:
            if compiled:
                try:
                    return run(compiled[0], x)
                except Exception as err:  # noqa: BLE001 - any compiler failure: eager from now on
                    if is_oom(err):
                        raise
                    log.warning("torch.compile failed (%s: %s); running eager",
                                type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                    compiled.clear()
            return run(eager, x)

        return forward

    def _probe_map_shape(self) -> tuple[int, int]:
        crop = self.loaded.preprocess.crop
        if not self.method.uses_target_layer:
            return (crop, crop)
        # the method's own view of its layer: a token or channels-last output laid on its grid
        x = torch.zeros(1, 3, crop, crop, device=self.device)
        with torch.no_grad():
            _, act = self.method.layer_forward(x, cut_graph=False)  # type: ignore[attr-defined]
        return tuple(act.shape[-2:])

    # -- per batch ---------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.time()
        n = len(batch["sample_id"])
        rows: list[dict[str, Any]] = []
        if "jpeg" in batch:  # resources.decode_device: the JPEGs are decoded here
            from .device_decode import decode_rows

            self.device_images, failed = decode_rows(batch, self.device)
            if failed:
                batch = {**batch, "status": batch["status"].copy(), "error": batch["error"].copy()}
                for i, reason in failed.items():
                    batch["status"][i], batch["error"][i] = "error", reason
        ok_idx = [i for i in range(n) if batch["status"][i] == "ok"]
        self.progress.begin_batch()
        for i in range(n):
            if batch["status"][i] == SHARD_END:
                rows.append(self._marker_row(batch, i))
            elif batch["status"][i] != "ok":
                rows.append(self._error_row(batch, i, str(batch["error"][i]), target=None))
        if ok_idx:
            rows.extend(self._explain_indices(batch, ok_idx))
        self.progress.end_batch(sum(1 for s in batch["status"] if s != SHARD_END))
        cols = self._to_columns(rows)
        end = time.time()
        m = len(rows)
        cols["actor_id"] = np.array([self.actor_id] * m, dtype=object)
        cols["actor_device"] = np.array([self.device.type] * m, dtype=object)
        cols["actor_start_ms"] = np.full(m, self.started_ms, dtype=np.int64)
        cols["batch_end_ms"] = np.full(m, int(end * 1000), dtype=np.int64)
        cols["batch_ms"] = np.full(m, int(round((end - t0) * 1000)), dtype=np.int64)
        return cols

    def _input(self, batch: dict[str, np.ndarray], idx: list[int]) -> Tensor:
        """The model input of samples ``idx``: the decode stage's crops, or where it left the
        JPEG to this actor (``jpeg`` column), the crops decoded on the device."""
        device_images = getattr(self, "device_images", None) if "jpeg" in batch else None
        if not device_images:
            return self._to_tensor(batch["image"][idx])
        x = torch.stack([device_images[i] if i in device_images else
                         torch.from_numpy(np.ascontiguousarray(batch["image"][i])).to(
                             self.device).permute(2, 0, 1) for i in idx]).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.spec.channels_last else x

    def _to_tensor(self, images: np.ndarray) -> Tensor:
        if images.dtype != np.uint8:  # already the model's input: float [B, 3, H, W], normalised
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            return x.contiguous(memory_format=torch.channels_last) if self.spec.channels_last else x
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        # in place on the one float copy: the same values as (x / 255 - mean) / std, half the CPU
        x = x.permute(0, 3, 1, 2).float()
        x.div_(255.0).sub_(self.mean).div_(self.std)
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _explain_indices(self, batch: dict[str, np.ndarray], idx: list[int]) -> list[dict]:
        """Explain samples ``idx``; out of memory splits them in half and retries (down to one
        sample). Any other error is taken as deterministic: every sample of the call gets an
        error row with the reason, once, instead of 2n-1 calls that fail the same way."""
        try:
            return self._explain(batch, idx)
        except Exception as err:  # noqa: BLE001
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not is_oom(err):
                what = "" if len(idx) == 1 else f" on a batch of {len(idx)} samples"
                message = " ".join(str(err).split())
                reason = f"{self.spec.method} failed{what}: {type(err).__name__}: {message}"
                return [self._error_row(batch, i, reason, target=None) for i in idx]
            if len(idx) == 1:
                reason = ("out of memory even for a single sample; lower resources.batch_size or "
                          "inner_batch_size, or use a bigger device")
                return [self._error_row(batch, idx[0], reason, target=None)]
            half = len(idx) // 2
            return self._explain_indices(batch, idx[:half]) + self._explain_indices(batch, idx[half:])

    def _targets_for(self, batch: dict[str, np.ndarray], i: int, logits: Tensor
                     ) -> tuple[list[int], str, str]:
        """(targets, target_source, error) for sample i."""
        mode = self.spec.targets
        if mode == "predicted":
            return [int(logits.argmax())], "predicted", ""
        if mode == "topk":
            k = min(self.spec.topk, logits.numel())
            return [int(t) for t in logits.topk(k).indices], "topk", ""
        if mode == "label":
            label = int(batch["label"][i])
            if label < 0:
                why = _text(batch, "label_error", i) or "it has no .cls"
                return [], "label", f"targets: label needs an integer .cls label; {why}"
            if label >= logits.numel():
                return [], "label", f"label {label} is out of range for a model with {logits.numel()} classes"
            return [label], "label", ""
        # all_labels
        raw = batch["boxes_json"][i]
        labels = sorted(set(json.loads(raw)["labels"])) if raw else []
        labels = [c for c in labels if 0 <= c < logits.numel()]
        if not labels:
            why = _text(batch, "boxes_error", i) or "this sample has none"
            return [], "all_labels", f"targets: all_labels needs a .json annotation with class labels; {why}"
        return labels, "all_labels", ""

    def _explain(self, batch: dict[str, np.ndarray], idx: list[int]) -> list[dict]:
        t0 = time.perf_counter()
        x = self._input(batch, idx)
        with torch.no_grad():
            logits = self.forward_fn(x)
        probs = logits.softmax(1)
        pred_prob, pred = probs.max(1)
        # expand to one row per (sample, target)
        expanded: list[tuple[int, int, str]] = []  # (position in idx, target, source)
        errors: list[dict] = []
        for pos, i in enumerate(idx):
            targets, source, err = self._targets_for(batch, i, logits[pos])
            if err:
                errors.append(self._error_row(batch, i, err, target=None, source=source))
            expanded.extend((pos, t, source) for t in targets)
        if not expanded:
            return errors
        pos_t = torch.tensor([e[0] for e in expanded], device=self.device)
        tgt_t = torch.tensor([e[1] for e in expanded], device=self.device)
        xx = x[pos_t]
        group = self.progress.group(len(idx), metrics=bool(self.spec.metrics))
        self.method.progress = group.method_progress
        maps = self.method(xx, tgt_t)
        group.method_done()
        metric_values = self._model_metrics(xx, maps, tgt_t, group.metric_progress)
        group.close()
        # stored dtype converted by torch for the whole batch: the same bits as numpy's astype,
        # which takes a slow scalar path (ms per 224 x 224 map with subnormal values)
        maps_cpu = maps.detach().to(torch.float16 if self.map_np == np.float16
                                    else torch.float32).cpu().numpy()
        if maps_cpu.shape[1:] != tuple(self.map_shape):
            raise RuntimeError(f"method returned maps of shape {maps_cpu.shape[1:]}, expected {self.map_shape}")
        lg = logits[pos_t].gather(1, tgt_t.view(-1, 1)).squeeze(1).cpu().numpy()
        tp = probs[pos_t].gather(1, tgt_t.view(-1, 1)).squeeze(1).cpu().numpy()
        pred_np, pred_prob_np = pred.cpu().numpy(), pred_prob.cpu().numpy()
        elapsed = (time.perf_counter() - t0) * 1000.0 / len(expanded)
        rows = []
        for r, (pos, t, source) in enumerate(expanded):
            i = idx[pos]
            row = {c: batch[c][i] for c in PASS_THROUGH}
            row.update(
                target=t, target_source=source, pred=int(pred_np[pos]),
                pred_prob=float(pred_prob_np[pos]), target_logit=float(lg[r]),
                target_prob=float(tp[r]), saliency=maps_cpu[r],
                status="ok", error="", elapsed_ms=elapsed,
            )
            for name in MODEL_METRIC_COLUMNS:
                row[name] = metric_values.get(name, [np.nan] * len(expanded))[r]
            for name in CURVE_COLUMNS:
                if name in metric_values:
                    row[name] = json.dumps([float(v) for v in metric_values[name][r]])
            notes = [n for n in (_annotation_note(batch, i, self.spec.targets),
                                 metric_values.get("_metric_error", ""),
                                 metric_values.get("_notes", [""] * len(expanded))[r]) if n]
            row["error"] = "; ".join(notes)
            rows.append(row)
        return errors + rows

    def _model_metrics(self, x: Tensor, maps: Tensor, targets: Tensor,
                       progress=None) -> dict[str, Any]:
        from .metrics import METRICS, compute_model_metrics

        names = [m for m in self.spec.metrics if m in METRICS and METRICS[m].kind == "model"]
        if not names:
            return {}
        from .metrics.registry import per_metric_params

        params = per_metric_params({n: self.spec.metrics.get(n) for n in names})
        try:
            values = compute_model_metrics(
                names, self.forward_fn, x, maps, targets, params,
                mean=tuple(self.loaded.preprocess.mean), std=tuple(self.loaded.preprocess.std),
                # a CPU runs small chunks faster (cache); a GPU wants large ones
                max_batch=8 if self.device.type == "cpu" else 64, progress=progress,
            )
        except Exception as err:  # noqa: BLE001
            if is_oom(err):
                raise
            return {"_metric_error": f"model metrics failed: {type(err).__name__}: {err}"}
        out: dict[str, Any] = {}
        for k, v in values.items():
            out[k] = v.detach().float().cpu().numpy().tolist() if isinstance(v, Tensor) else v
        return out

    def _error_row(self, batch: dict[str, np.ndarray], i: int, reason: str, target: int | None,
                   source: str | None = None) -> dict[str, Any]:
        row = {c: batch[c][i] for c in PASS_THROUGH}
        row.update(
            target=-1 if target is None else target, target_source=source or self.spec.targets,
            pred=-1, pred_prob=np.nan, target_logit=np.nan, target_prob=np.nan,
            saliency=np.zeros(self.map_shape, dtype=self.map_np), status="error", error=reason,
            elapsed_ms=0.0,
        )
        for name in MODEL_METRIC_COLUMNS:
            row[name] = np.nan
        return row

    def _marker_row(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        row = self._error_row(batch, i, str(batch["error"][i]), target=None)
        row["status"] = SHARD_END
        return row

    def _to_columns(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        h, w = self.map_shape
        cols: dict[str, np.ndarray] = {}
        for name in ACTOR_OUTPUT:
            if name == "saliency":
                continue
            kind = BY_NAME[name].kind
            cols[name] = numpy_column(kind, [r.get(name) for r in rows])
        cols["saliency"] = (np.stack([r["saliency"] for r in rows]) if rows
                            else np.zeros((0, h, w), self.map_np))
        cols["model"] = np.array([self.spec.model["name"]] * len(rows), dtype=object)
        cols["method"] = np.array([self.spec.method] * len(rows), dtype=object)
        return cols
