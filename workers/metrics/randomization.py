"""Model-parameter randomization sanity check (Adebayo et al. 2018), cascading top-down.

Layers are re-initialised one at a time from the output toward the input, on a deep copy
of the model (the caller's model is never touched), keeping earlier ones randomised; after
each step the method is rebuilt on the copy and re-run with the *same* targets (the classes
of the original model). Each step is compared with the maps of the intact model by:

* ``spearman``: Spearman rank correlation of |maps| (the paper's headline measure; Quantus
  MPRT's default, abs + normalise, which does not change ranks), ties averaged exactly like
  ``scipy.stats.spearmanr``; NaN for a constant map (counted in ``n_nan``, never dropped);
* ``spearman_signed``: the same without abs;
* ``ssim``: structural similarity (scikit-image) of |map| / max|map| (data range 1).

A method passes when similarity falls as more layers are randomised (gradient-type methods);
a model-independent "explanation" stays at 1. Re-initialisation uses each module's
``reset_parameters`` (conv, linear and BatchNorm, whose running statistics are reset too,
as in Quantus); a module that has parameters but no ``reset_parameters`` gets
N(0, std of its weights) draws. Layer k is seeded from ``(seed, k)`` so layers get distinct
random streams; the global RNG state is restored afterwards.

Cost: (number of layers + 2) explanations of the batch. Run it per (method, model) on a few
hundred images, not per dataset row; ``layers="blocks"`` gives about 10-20 steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def average_ranks(x: Tensor) -> Tensor:
    """Ranks (1..n) along the last axis of ``[R, n]`` with ties given their mean rank."""
    values, order = torch.sort(x, dim=-1, stable=True)
    r, n = values.shape
    new_run = torch.ones_like(values, dtype=torch.bool)
    new_run[:, 1:] = values[:, 1:] != values[:, :-1]
    run = new_run.long().cumsum(-1) - 1
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(r, n)
    sums = torch.zeros(r, n, dtype=torch.float64, device=x.device).scatter_add_(1, run, pos)
    count = torch.zeros(r, n, dtype=torch.float64, device=x.device).scatter_add_(
        1, run, torch.ones_like(pos))
    mean_rank = (sums / count.clamp_min(1)).gather(1, run)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray | float:
    """Spearman correlation with average ranks for ties (as ``scipy.stats.spearmanr``).

    1-D inputs give a float; ``[B, ...]`` inputs give one value per sample (the trailing
    axes flattened). NaN when a row is constant or contains NaN.
    """
    ta = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).double()
    tb = torch.as_tensor(np.asarray(b) if not isinstance(b, Tensor) else b).double().to(ta.device)
    if ta.shape != tb.shape:
        raise ValueError(f"shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    single = ta.dim() == 1
    ta, tb = ta.reshape(1 if single else ta.shape[0], -1), tb.reshape(1 if single else tb.shape[0], -1)
    has_nan = torch.isnan(ta).any(1) | torch.isnan(tb).any(1)
    ra = average_ranks(ta.nan_to_num(0.0))
    rb = average_ranks(tb.nan_to_num(0.0))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(1) / denom
    rho = torch.where((denom > 0) & ~has_nan, rho.clamp(-1, 1), torch.full_like(rho, float("nan")))
    out = rho.cpu().numpy()
    return float(out[0]) if single else out


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of |a| / max|a| and |b| / max|b| (2-D maps); NaN if a map is smaller than 3 px."""
    from skimage.metrics import structural_similarity

    def norm(m: np.ndarray) -> np.ndarray:
        m = np.abs(np.nan_to_num(m.astype(np.float64)))
        top = m.max()
        return m / top if top > 0 else m

    win = min(7, *a.shape)
    win -= 1 - win % 2
    if win < 3:
        return float("nan")
    return float(structural_similarity(norm(a), norm(b), data_range=1.0, win_size=win))


def _owns_parameters(m: nn.Module) -> bool:
    """Owns parameters, or state that ``reset_parameters`` resets (BatchNorm without affine)."""
    if any(True for _ in m.parameters(recurse=False)):
        return True
    return hasattr(m, "reset_parameters") and any(True for _ in m.buffers(recurse=False))


def module_layers(model: nn.Module) -> list[str]:
    """Every module that owns parameters (conv, linear, norm, ...), output first."""
    return [name for name, m in model.named_modules() if name and _owns_parameters(m)][::-1]


def block_layers(model: nn.Module) -> list[str]:
    """Coarser steps, output first: the model's children, with sequential containers
    (ResNet ``layerN``, VGG/MobileNet ``features``) split into their children; entries
    without parameters are left out."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            out += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            out.append(name)
    return [n for n in out if any(True for _ in model.get_submodule(n).parameters())][::-1]


def randomize_layer(layer: nn.Module, seed: int, index: int) -> None:
    """Re-initialise every parametrised module inside ``layer`` (seeded by (seed, index))."""
    devices = sorted({p.device.index or 0 for p in layer.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) * 1_000_003 + int(index))
        with torch.no_grad():
            for m in layer.modules():
                if not _owns_parameters(m):
                    continue
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                else:
                    for p in m.parameters(recurse=False):
                        std = float(p.std()) if p.numel() > 1 else 1.0
                        p.normal_(0.0, std if std > 0 else 1.0)


def _maps(method: Callable, images: Tensor, targets: Tensor) -> np.ndarray:
    out = method(images, targets)
    return out.detach().float().cpu().numpy()


def _entry(name: str, ref: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    b = ref.shape[0]
    rho = spearman(np.abs(ref).reshape(b, -1), np.abs(maps).reshape(b, -1))
    signed = spearman(ref.reshape(b, -1), maps.reshape(b, -1))
    sims = np.array([ssim(ref[i], maps[i]) for i in range(b)])

    def mean(v: np.ndarray) -> float:
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return {
        "layer": name,
        "spearman": rho.tolist(), "spearman_mean": mean(rho),
        "spearman_signed": signed.tolist(), "spearman_signed_mean": mean(signed),
        "ssim": sims.tolist(), "ssim_mean": mean(sims),
        "n_nan": int(np.isnan(rho).sum()),
    }


def cascading_randomization(
    model: nn.Module,
    method_builder: Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]],
    images: Tensor,
    targets: Tensor,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
) -> list[dict[str, Any]]:
    """Cascading (top-down) model-parameter randomization.

    Args:
        model: the trained model (left untouched; a deep copy is randomised).
        method_builder: model -> ``method(images, targets) -> maps[B, h, w]``, e.g.
            ``lambda m: workers.methods.build("gradient", m)``; rebuilt after every step.
        images, targets: the batch and the fixed classes to explain (from the intact model).
        seed: seeds the re-initialisation of each layer.
        layers: module names randomised in the given order (give them output first), or
            ``"modules"`` / None (every module that owns parameters, output first, like
            Quantus MPRT), or ``"blocks"`` (:func:`block_layers`).

    Returns:
        One dict per step: ``"original"`` (intact model re-run: 1 for a deterministic
        method), then one per layer: ``layer``, ``spearman`` (per sample) and
        ``spearman_mean``, ``spearman_signed(_mean)``, ``ssim(_mean)``, ``n_nan``.
    """
    work = copy.deepcopy(model).eval()
    if layers is None or layers == "modules":
        names = module_layers(work)
    elif layers == "blocks":
        names = block_layers(work)
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'modules', 'blocks' or a list of names, got {layers!r}")
    else:
        names = list(layers)
    for name in names:
        work.get_submodule(name)  # fail early, naming the layer
    targets = torch.as_tensor(targets, device=images.device).long()
    ref = _maps(method_builder(work), images, targets)
    results = [_entry("original", ref, _maps(method_builder(work), images, targets))]
    for k, name in enumerate(names):
        randomize_layer(work.get_submodule(name), seed, k)
        results.append(_entry(name, ref, _maps(method_builder(work), images, targets)))
    return results


def plot_randomization(results: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Similarity to the intact model's maps vs layers randomised (matplotlib Agg canvas, no pyplot state): means
    with the per-sample interquartile range of the Spearman correlation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(results))
    labels = [r["layer"] for r in results]
    fig = Figure(figsize=(max(6.0, 0.35 * len(results) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("spearman", "o-"), ("spearman_signed", "s--"), ("ssim", "^:")):
        values = np.array([r[key] for r in results], dtype=np.float64)
        ax.plot(x, [r[f"{key}_mean"] for r in results], style, label=key)
        if key == "spearman" and values.size:
            with np.errstate(all="ignore"):
                lo, hi = np.nanpercentile(values, [25, 75], axis=1)
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("similarity to intact-model maps")
    ax.set_xlabel("randomised up to layer (cascading, output first)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title or "model-parameter randomization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
