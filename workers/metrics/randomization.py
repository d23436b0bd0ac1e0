"""Model-parameter randomization sanity check (Adebayo et al. 2018), cascading top-down.

Protocol (:func:`cascading_randomization`; :func:`protocol` returns it as a dict to store):

* **Steps.** ``layers="blocks"`` (the ``salmap sanity`` default) walks the architecture's real
  blocks, output first (:func:`block_layers`): each MBConv block of an EfficientNet, each
  bottleneck / basic block of a ResNet, each encoder layer of a ViT, plus the layers around
  them (head, final norm, stem) and bare parameters such as a ViT's class token and position
  embedding. ``layers="modules"`` (Quantus MPRT) steps through every module that owns
  parameters; a list of names gives the steps explicitly.
* **Cascade.** Steps are re-initialised one at a time from the output toward the input on a
  deep copy of the model (the caller's model is never touched), keeping earlier ones
  randomised; after each step the method is rebuilt on the copy and re-run with the *same*
  targets (the classes the intact model predicts).
* **Re-initialisation.** Every module inside a step that owns parameters is reset with its
  ``reset_parameters`` (conv, linear, norms; BatchNorm's running statistics are reset too, as
  in Quantus); a module without ``reset_parameters``, or a bare parameter, gets
  N(0, std of its current values) draws (std 1 when they are constant). Step k is seeded
  from ``(seed, k)``, so steps get distinct random streams; the global RNG state is restored.
* **Comparison.** Every map (intact and randomised) is upsampled bilinearly
  (align_corners=False) to the model input's resolution before it is compared, as Adebayo
  et al. compare maps at the image's resolution (a 7x7 CAM compared at 7x7 gives other
  Spearman and SSIM values), by:

  - ``spearman``: Spearman rank correlation of |maps| (the paper's headline measure; Quantus
    MPRT's default, abs + normalise, which does not change ranks), ties averaged exactly like
    ``scipy.stats.spearmanr``; NaN for a constant map (counted in ``n_nan``, never dropped);
  - ``spearman_signed``: the same without abs;
  - ``ssim``: structural similarity (scikit-image, 7x7 window, data range 1) of
    |map| / max|map|.

A method passes when similarity falls as more layers are randomised (gradient-type methods);
a model-independent "explanation" stays at 1.

Cost: (number of steps + 2) explanations of the batch. Run it per (method, model) on a few
hundred images, not per dataset row; ``layers="blocks"`` gives 10-30 steps (EfficientNet-Lite0
21, ResNet-18 11, ResNet-50 19, ViT-B/16 17).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import upsample_maps


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


def _has_state(m: nn.Module) -> bool:
    """Something inside ``m`` owns parameters (or resettable state)."""
    return any(_owns_parameters(x) for x in m.modules())


def _composite(m: nn.Module) -> bool:
    """Has a child with parameters (a block or a wrapper), not just a leaf layer."""
    return any(_has_state(c) for c in m.children())


def module_layers(model: nn.Module) -> list[str]:
    """Every module that owns parameters (conv, linear, norm, ...), output first. A module that
    owns parameters *and* has parametrised children (a ViT encoder's position embedding, an
    attention's input projection) contributes its own parameters by name, so that a step
    never re-initialises the children too."""
    out: list[str] = []
    for name, m in model.named_modules():
        if not _owns_parameters(m):
            continue
        if name and not _composite(m):
            out.append(name)
        else:
            prefix = f"{name}." if name else ""
            out += [prefix + p for p, _ in m.named_parameters(recurse=False)]
    return out[::-1]


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_layers(model: nn.Module) -> list[str]:
    """The architecture's blocks, output first.

    A block is a parametrised module whose class occurs more than once in the model and that
    is not a plain container (``nn.Sequential`` / ``ModuleList`` / ``ModuleDict`` themselves,
    not their subclasses): an MBConv block, a ResNet basic / bottleneck block, a transformer
    encoder layer, a conv-norm-activation stem. The walk starts at the model and descends into
    containers and into single-occurrence wrappers (a ViT's ``encoder``); it stops at blocks
    and at leaf layers (conv, linear, norm). Bare parameters of the modules it descends into
    (class token, position embedding) are steps of their own, placed on the input side of
    their module's children. Children are taken in definition order, reversed.
    """
    counts = Counter(type(m) for m in model.modules())

    def walk(prefix: str, m: nn.Module) -> list[str]:
        steps = [prefix + p for p, _ in m.named_parameters(recurse=False)]
        for name, child in m.named_children():
            if not _has_state(child):
                continue
            repeated = type(child) not in CONTAINERS and counts[type(child)] > 1
            if not _composite(child) or repeated:
                steps.append(prefix + name)
            else:
                steps += walk(f"{prefix}{name}.", child)
        return steps

    return walk("", model)[::-1]


def _resolve(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    """A step's target: a submodule, or a bare parameter (``encoder.pos_embedding``)."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        try:
            return model.get_parameter(name)
        except AttributeError:
            raise AttributeError(f"{err} (and {name!r} is no parameter either)") from None


def _draw_like(p: Tensor) -> None:
    """Replace ``p`` by N(0, std of its values) draws (std 1 when it is constant)."""
    std = float(p.std()) if p.numel() > 1 else 0.0
    p.normal_(0.0, std if std > 0 else 1.0)


def randomize_layer(layer: nn.Module | nn.Parameter, seed: int, index: int) -> None:
    """Re-initialise every parametrised module inside ``layer`` (or the bare parameter), from
    the random stream of (seed, index)."""
    params = [layer] if isinstance(layer, Tensor) else list(layer.parameters())
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) * 1_000_003 + int(index))
        with torch.no_grad():
            if isinstance(layer, Tensor):
                _draw_like(layer)
                return
            for m in layer.modules():
                if not _owns_parameters(m):
                    continue
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                else:
                    for p in m.parameters(recurse=False):
                        _draw_like(p)


def _maps(method: Callable, images: Tensor, targets: Tensor) -> np.ndarray:
    """The method's maps, upsampled to the input's resolution (bilinear, align_corners=False)."""
    out = method(images, targets).detach().float()
    if out.dim() != 3:
        raise ValueError(f"the method must return maps [B, h, w], got {tuple(out.shape)}")
    return upsample_maps(out, tuple(images.shape[-2:])).cpu().numpy()


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


def steps_for(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """The step names of ``layers`` (``"blocks"``, ``"modules"`` / None, or a list) on
    ``model``, output first; raise naming a step that is neither a module nor a parameter."""
    if layers is None or layers == "modules":
        names = module_layers(model)
    elif layers == "blocks":
        names = block_layers(model)
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'modules', 'blocks' or a list of names, got {layers!r}")
    else:
        names = list(layers)
    for name in names:
        _resolve(model, name)
    return names


def protocol(layers: Sequence[str] | str | None, seed: int, steps: Sequence[str],
             input_size: Sequence[int]) -> dict[str, Any]:
    """The protocol of one run as plain data, to store next to its numbers."""
    return {
        "test": "model-parameter randomization (Adebayo et al. 2018), cascading, output first",
        "granularity": layers if isinstance(layers, str) else "modules" if layers is None
        else "explicit",
        "steps": list(steps),
        "reinit": "reset_parameters (BatchNorm running statistics reset), else N(0, std); "
                  "step k seeded from (seed, k)",
        "seed": int(seed),
        "targets": "fixed: the classes given for the intact model",
        "compare_at": f"model input resolution {int(input_size[0])}x{int(input_size[1])} "
                      "(bilinear, align_corners=False)",
        "similarity": "spearman of |map| (ties averaged), spearman signed, "
                      "ssim of |map|/max|map| (7x7 window, data range 1)",
    }


def cascading_randomization(
    model: nn.Module,
    method_builder: Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]],
    images: Tensor,
    targets: Tensor,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
) -> list[dict[str, Any]]:
    """Cascading (top-down) model-parameter randomization (protocol in the module docstring).

    Args:
        model: the trained model (left untouched; a deep copy is randomised).
        method_builder: model -> ``method(images, targets) -> maps[B, h, w]``, e.g.
            ``lambda m: workers.methods.build("gradient", m)``; rebuilt after every step.
        images, targets: the batch and the fixed classes to explain (from the intact model).
        seed: seeds the re-initialisation of each step.
        layers: ``"blocks"`` (:func:`block_layers`), ``"modules"`` / None (every module that
            owns parameters, output first, like Quantus MPRT), or step names (modules or bare
            parameters) randomised in the given order (give them output first).

    Returns:
        One dict per step: ``"original"`` (intact model re-run: 1 for a deterministic
        method), then one per step: ``layer``, ``spearman`` (per sample) and
        ``spearman_mean``, ``spearman_signed(_mean)``, ``ssim(_mean)``, ``n_nan``; maps are
        compared at the input's resolution.
    """
    work = copy.deepcopy(model).eval()
    names = steps_for(work, layers)
    targets = torch.as_tensor(targets, device=images.device).long()
    ref = _maps(method_builder(work), images, targets)
    results = [_entry("original", ref, _maps(method_builder(work), images, targets))]
    for k, name in enumerate(names):
        randomize_layer(_resolve(work, name), seed, k)
        results.append(_entry(name, ref, _maps(method_builder(work), images, targets)))
    return results


def plot_randomization(results: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Similarity to the intact model's maps vs layers randomised (matplotlib Agg canvas, no pyplot state): means
    with the per-sample interquartile range of the Spearman correlation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(results))
    labels = [r["layer"] for r in results]
    fig = Figure(figsize=(max(6.0, 0.35 * len(results) + 2), 4))  # pragma: no mutate
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("spearman", "o-"), ("spearman_signed", "s--"), ("ssim", "^:")):
        values = np.array([r[key] for r in results], dtype=np.float64)
        ax.plot(x, [r[f"{key}_mean"] for r in results], style, label=key)
        if key == "spearman" and values.size:  # pragma: no mutate
            with np.errstate(all="ignore"):
                lo, hi = np.nanpercentile(values, [25, 75], axis=1)  # pragma: no mutate
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(0.0, color="grey", linewidth=0.5)  # pragma: no mutate
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)  # pragma: no mutate
    ax.set_ylabel("similarity to intact-model maps")
    ax.set_xlabel("randomised up to layer (cascading, output first)")
    ax.set_ylim(-1.05, 1.05)  # pragma: no mutate
    ax.set_title(title or "model-parameter randomization")  # pragma: no mutate
    ax.legend(fontsize=8)  # pragma: no mutate
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # pragma: no mutate
