"""HDM, Hierarchical Dynamic Masks (Peng, Yang, Liu & He, arXiv 2301.04970, 2023): optimise
masks on the input that keep the model's output while covering as little as possible, coarse
"benchmark" masks first, finer "auxiliary" masks guided by them, then again on the image with
the regions already found removed; the stage maps are fused.

PARTLY RECONSTRUCTED. Only the abstracts of HDM and its predecessor MDM could be read and no
code is public; see specs/methods/hdm.md.

Faithful to the abstracts [known]: model-agnostic (forward passes and gradients to the masks
only); a DM module optimises several small benchmark masks, which guide larger auxiliary masks;
the DM map stacks the masks of all scales; HDM chains DM modules, each on the image with the
previously found regions masked out, and fuses their maps.

From the same group's later HSPI method [family], plausible for HDM but not confirmed: masks
start at all ones; loss = L2 norm of (logits of the masked image - logits of the image)
(``consistency="logits"``, ``norm="l2"``) + ``area_weight`` * mean of the mask.

Reconstructed [R1], no source (all constructor parameters): benchmark sizes (4, 7, 14),
auxiliary sizes (28, 56, 112), ``area_weight=1``, Adam with ``lr=0.1`` for ``steps=300`` per
phase, clamping to [0, 1] after each step, masked-out pixels set to 0 in normalised space
(``fill="zero"``, the dataset mean colour), benchmark mask ``B`` = mean of the upsampled
benchmark masks, guidance by multiplication (``B * up(m_aux)``, B frozen), DM map = mean of all
effective masks min-max scaled per image, ``stages=3``, stage t>1 removes the top
``remove_fraction=0.2`` of ``max(S_1..S_{t-1})`` (only pixels with a value > 0), fusion
``sum_t w_t * S_t * (1 - R_{t-1})`` with ``w_t = 1``. The L2 norm is smoothed at 0
(``norm_eps``), see :func:`mask_opt.smooth_norm`.

Output: the fused map ``[B,H,W]`` at the input resolution, >= 0, un-normalised (at most
``sum w_t``); the pipeline's min-max scaling gives the spec's final normalisation. With the
default ``consistency="logits"`` the map does NOT depend on the target class (as in HSPI);
``consistency="target"`` uses ``|f_t(masked) - f_t(image)|`` for class-specific maps.

Cost per image: ``stages`` x (1 forward + ``steps`` x (len(benchmark_sizes) +
len(auxiliary_sizes)) x (1 forward + 1 backward to the masks)); 5,403 F+B with the defaults.
The masks of one phase are optimised together, ``inner_batch_size`` masked images at a time.
Measured: pretrained EfficientNet-Lite0, 224 px, batch 4, CPU, 1 torch thread
(scripts/method_timing.py): ~0.39 s per image and step of both phases (6 masked F+B), ~6 min
per image with the defaults (300 steps x 3 stages; extrapolated from runs of 1 and 2 steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodError, check_inputs, model_guard
from .mask_opt import MaskOptimizer, check_optimizer, shared_noise, smooth_norm

CONSISTENCIES = ("logits", "target")
NORMS = ("l2", "l2_squared")
GUIDANCES = ("multiply", "loss", "init")
FILLS = ("zero", "blur")


@dataclass
class HDMResult:
    """What HDM computes for a batch (float32, detached)."""

    #: fused map ``[B,H,W]`` (what the method returns)
    saliency: Tensor
    #: DM map of each stage, min-max scaled, ``[B,T,H,W]`` (zeros after a sample stopped)
    stage_maps: Tensor
    #: pixels removed before each stage (``R_{t-1}``; stage 1 removes none), ``[B,T,H,W]``
    removed: Tensor
    #: per stage: sample indices that ran it, their benchmark masks ``[n,1,s,s]`` and
    #: auxiliary masks ``[n,1,S,S]``
    masks: list[dict[str, object]] = field(default_factory=list)


def _up(m: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def _keep(m: Tensor, size: tuple[int, int]) -> Tensor:
    """``up(m)`` written as ``1 - up(1 - m)``: identical maths, but exactly 1 for m = 1."""
    return 1.0 - _up(1.0 - m, size)


def _minmax(s: Tensor) -> Tensor:
    """Per-sample min-max scaling of ``[b,H,W]`` to [0, 1] (a constant map becomes 0)."""
    flat = s.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(s)


def apply_keep(x: Tensor, fill: Tensor, keep: Tensor) -> Tensor:
    """``x * keep + fill * (1 - keep)`` for keep masks ``[b,H,W]``, exact where keep = 1."""
    return x - (1.0 - keep)[:, None] * (x - fill)


def top_fraction(s: Tensor, fraction: float) -> Tensor:
    """Boolean ``[b,H,W]``: each sample's top ``fraction`` of pixels of ``s`` with ``s > 0``."""
    flat = s.flatten(1)
    n = flat.shape[1]
    k = int(round(fraction * n))
    if k <= 0:
        return torch.zeros_like(s, dtype=torch.bool)
    theta = flat.kthvalue(n - min(k, n) + 1, dim=1, keepdim=True).values
    return ((flat >= theta) & (flat > 0)).view_as(s)


class HDM(Method):
    """Hierarchical dynamic masks (partly reconstructed; see the module docstring)."""

    name = "hdm"
    cost = (
        "stages x (1 forward + steps x (#benchmark + #auxiliary masks) x (1 forward + "
        "1 backward to the masks)); 3 x (1 + 300 x 6) = 5,403 F+B per image by default"
    )
    defaults_source = (
        "[family] HSPI (same group): all-ones init, L2 logit consistency + mean-mask loss. "
        "RECONSTRUCTED [R1], no source: sizes (4,7,14)/(28,56,112), area_weight=1, Adam lr=0.1, "
        "300 steps, zero fill, multiplicative guidance, 3 stages, top-20% removal, w_t=1"
    )

    def __init__(
        self,
        model: nn.Module,
        benchmark_sizes: Sequence[int] = (4, 7, 14),
        auxiliary_sizes: Sequence[int] = (28, 56, 112),
        steps: int = 300,
        lr: float = 0.1,
        optimizer: str = "adam",
        area_weight: float = 1.0,
        consistency: str = "logits",
        norm: str = "l2",
        norm_eps: float = 1e-3,
        guidance: str = "multiply",
        guidance_weight: float = 1.0,
        stages: int = 3,
        remove_fraction: float = 0.2,
        stage_weights: Sequence[float] | None = None,
        stop_fraction: float | None = None,
        fill: str = "zero",
        blur_sigma: float = 5.0,
        init_value: float = 1.0,
        init_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            benchmark_sizes, auxiliary_sizes: side lengths of the square masks of each phase
                ([R1]); auxiliary may be empty.
            steps, lr, optimizer: per phase; ``"adam"`` (default) or ``"sgd"``; masks are
                clamped to [0, 1] after each step.
            area_weight: lambda of the mean-mask term.
            consistency: ``"logits"`` (full logit vector, [family]) or ``"target"`` (only the
                target logit, class-specific).
            norm: ``"l2"`` (smoothed by ``norm_eps``) or ``"l2_squared"``.
            guidance: how the benchmark mask ``B`` guides the auxiliary masks: ``"multiply"``
                (effective mask ``B * up(m)``), ``"loss"`` (extra ``guidance_weight *
                mean((up(m) - B)^2)``), ``"init"`` (auxiliary masks start at ``B`` pooled).
            stages, remove_fraction, stage_weights: the hierarchy; ``stage_weights`` None = 1s.
            stop_fraction: stop a sample's hierarchy early when the softmax probability of its
                target on the image with the found regions removed drops below
                ``stop_fraction`` times that on the full image (None = always run ``stages``).
            fill: what masked-out pixels become: ``"zero"`` (dataset mean in normalised space)
                or ``"blur"`` (Gaussian blur of the image, ``blur_sigma`` pixels).
            init_value, init_noise, seed: masks start at ``init_value - init_noise * U[0,1)``;
                the noise is drawn from ``seed`` once per mask size and shared by all images
                (0 = the [family] all-ones start, where ``seed`` has no effect).
        """
        super().__init__(model)
        check_optimizer(optimizer, lr)
        sizes = [*benchmark_sizes, *auxiliary_sizes]
        if not benchmark_sizes or any(int(s) < 1 for s in sizes):
            raise MethodError("hdm: needs at least one benchmark size, and all sizes >= 1")
        for key, value, allowed in (("consistency", consistency, CONSISTENCIES),
                                    ("norm", norm, NORMS), ("guidance", guidance, GUIDANCES),
                                    ("fill", fill, FILLS)):
            if value not in allowed:
                raise MethodError(f"hdm: {key} must be one of {', '.join(allowed)}, got {value!r}")
        if steps < 0 or stages < 1:
            raise MethodError("hdm: steps must be >= 0 and stages >= 1")
        if not 0.0 <= remove_fraction <= 1.0:
            raise MethodError(f"hdm: remove_fraction must be in [0, 1], got {remove_fraction}")
        if stage_weights is not None and len(stage_weights) != stages:
            raise MethodError(f"hdm: stage_weights needs {stages} values, got {len(stage_weights)}")
        if not 0.0 <= init_value <= 1.0 or init_noise < 0:
            raise MethodError("hdm: init_value must be in [0, 1] and init_noise >= 0")
        self.benchmark_sizes = tuple(int(s) for s in benchmark_sizes)
        self.auxiliary_sizes = tuple(int(s) for s in auxiliary_sizes)
        self.steps, self.lr, self.optimizer = int(steps), float(lr), optimizer
        self.area_weight, self.consistency, self.norm = float(area_weight), consistency, norm
        self.norm_eps = float(norm_eps)
        self.guidance, self.guidance_weight = guidance, float(guidance_weight)
        self.stages, self.remove_fraction = int(stages), float(remove_fraction)
        self.stage_weights = [1.0] * self.stages if stage_weights is None else [
            float(w) for w in stage_weights]
        self.stop_fraction = None if stop_fraction is None else float(stop_fraction)
        self.fill, self.blur_sigma = fill, float(blur_sigma)
        self.init_value, self.init_noise, self.seed = float(init_value), float(init_noise), int(seed)

    # -- building blocks ------------------------------------------------------------------
    def fill_image(self, x: Tensor) -> Tensor:
        """What masked-out pixels are replaced with."""
        if self.fill == "zero":
            return torch.zeros_like(x)
        from torchvision.transforms.functional import gaussian_blur

        k = 2 * math.ceil(3 * self.blur_sigma) + 1
        k = min(k, 2 * (min(x.shape[-2:]) // 2) - 1)  # reflect padding needs pad < size
        return gaussian_blur(x, kernel_size=[max(k, 1)] * 2, sigma=[self.blur_sigma] * 2)

    def references(self, x: Tensor) -> Tensor:
        """Logits ``[b, K]`` of ``x`` (constants for the consistency term)."""
        parts = [self.forward(x[sl]).detach() for sl in self.chunks(x.shape[0])]
        out = torch.cat(parts)
        if out.dim() != 2:
            raise MethodError(f"hdm: the model returned shape {tuple(out.shape)}, expected [B, K]")
        return out

    def target_probability(self, x: Tensor, targets: Tensor) -> Tensor:
        """Softmax probability of each sample's target, ``[b]`` (for ``stop_fraction``)."""
        return torch.softmax(self.references(x), 1).gather(1, targets[:, None])[:, 0]

    def consistency_loss(self, logits: Tensor, ref: Tensor, targets: Tensor) -> Tensor:
        """Per-row consistency ``[n]`` between masked-image logits and reference logits."""
        d = logits - ref
        if self.consistency == "target":
            d = d.gather(1, targets.view(-1, 1))
        if self.norm == "l2_squared":
            return d.square().sum(-1)
        return smooth_norm(d, self.norm_eps)

    def init_masks(self, n: int, sizes: Sequence[int], offset: int, device) -> list[Tensor]:
        masks = []
        for i, s in enumerate(sizes):
            m0 = torch.full((1, 1, s, s), self.init_value)
            if self.init_noise > 0:
                m0 = m0 - self.init_noise * shared_noise(self.seed, (1, 1, s, s), offset + i)
            masks.append(m0.clamp(0, 1).to(device).expand(n, 1, s, s).clone().requires_grad_(True))
        return masks

    def benchmark_losses(self, x: Tensor, targets: Tensor, masks: Sequence[Tensor]) -> Tensor:
        """The benchmark-phase loss ``[b, J]`` of given masks ``[b,1,s,s]`` on images ``x``
        (no optimisation; for tests and diagnostics)."""
        images, targets = check_inputs(x, targets)
        with model_guard(self.model), torch.enable_grad():
            x = images.detach().float()
            fill, ref = self.fill_image(x), self.references(x)
            out = []
            for m in masks:
                keep = _keep(m, tuple(x.shape[-2:]))[:, 0]
                logits = self.forward(apply_keep(x, fill, keep))
                cons = self.consistency_loss(logits, ref, targets)
                out.append(cons + self.area_weight * m.flatten(1).mean(1))
            return torch.stack(out, 1).detach()

    def optimise_phase(
        self,
        xt: Tensor,
        fill: Tensor,
        ref: Tensor,
        targets: Tensor,
        params: list[Tensor],
        keep_fn: Callable[[list[Tensor]], Tensor],
        penalty_fn: Callable[[list[Tensor]], Tensor],
    ) -> None:
        """Optimise ``params`` in place: ``steps`` of Adam on the summed per-mask losses.

        ``keep_fn(params)`` gives the effective keep masks ``[b, K, H, W]``; each (image, mask)
        pair is one masked image, sent through the model ``inner_batch_size`` at a time.
        ``penalty_fn(params)`` is the summed mask terms (area, guidance).
        """
        b, n_masks = xt.shape[0], len(params)
        rows = torch.arange(b * n_masks, device=xt.device)
        img = rows // n_masks
        opt = MaskOptimizer(params, self.optimizer, self.lr, bounds=(0.0, 1.0))
        for _ in self.track(self.steps):
            keep = keep_fn(params).reshape(b * n_masks, *xt.shape[-2:])
            values = keep.detach()
            g_keep = torch.zeros_like(values)
            for sl in self.chunks(b * n_masks):
                leaf = values[sl].clone().requires_grad_(True)
                i = img[sl]
                masked = apply_keep(xt[i], fill[i], leaf)
                loss = self.consistency_loss(self.forward(masked), ref[i], targets[i]).sum()
                (g_keep[sl],) = torch.autograd.grad(loss, leaf)
            penalty = penalty_fn(params)
            grads = torch.autograd.grad(
                [keep, penalty], params, grad_outputs=[g_keep, torch.ones_like(penalty)],
                allow_unused=True,
            )
            opt.step([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])

    def dm(self, xt: Tensor, fill: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, object]]:
        """One DM module on ``xt``: its min-max scaled map ``[b,H,W]`` and the final masks."""
        size = tuple(xt.shape[-2:])
        ref = self.references(xt)
        lam = self.area_weight

        bench = self.init_masks(xt.shape[0], self.benchmark_sizes, 0, xt.device)
        with self.part(0.0, 0.5 if self.auxiliary_sizes else 1.0):  # progress: phase 1
            self.optimise_phase(
                xt, fill, ref, targets, bench,
                keep_fn=lambda ps: torch.cat([_keep(p, size) for p in ps], 1),
                penalty_fn=lambda ps: lam * sum(p.mean((1, 2, 3)).sum() for p in ps),
            )
        with torch.no_grad():
            bench_keep = torch.cat([_keep(p.detach(), size) for p in bench], 1)
        guide = bench_keep.mean(1, keepdim=True)  # B, [b,1,H,W]

        aux = self.init_masks(xt.shape[0], self.auxiliary_sizes, len(self.benchmark_sizes),
                              xt.device)
        if self.guidance == "init":
            with torch.no_grad():
                for p in aux:
                    p.copy_(F.adaptive_avg_pool2d(guide, p.shape[-2:]).clamp(0, 1))
        scale = guide if self.guidance == "multiply" else 1.0

        def aux_penalty(ps: list[Tensor]) -> Tensor:
            total = xt.new_zeros(())
            for p in ps:
                up = _up(p, size)
                total = total + lam * up.mean((1, 2, 3)).sum()
                if self.guidance == "loss":
                    total = total + self.guidance_weight * (up - guide).square().mean(
                        (1, 2, 3)).sum()
            return total

        if aux:
            with self.part(0.5, 1.0):  # progress: phase 2
                self.optimise_phase(
                    xt, fill, ref, targets, aux,
                    keep_fn=lambda ps: scale * torch.cat([_keep(p, size) for p in ps], 1),
                    penalty_fn=aux_penalty,
                )
        with torch.no_grad():
            keeps = [bench_keep]
            if aux:
                keeps.append(scale * torch.cat([_keep(p.detach(), size) for p in aux], 1))
            s = _minmax(torch.cat(keeps, 1).mean(1))
        masks = {"benchmark": [p.detach() for p in bench], "auxiliary": [p.detach() for p in aux]}
        return s, masks

    # -- the hierarchy --------------------------------------------------------------------
    def _explain(self, x: Tensor, targets: Tensor) -> HDMResult:
        """HDM on a batch; every masked forward goes through :meth:`optimise_phase` chunks."""
        x = x.detach().float()
        b, size = x.shape[0], x.shape[-2:]
        fill = self.fill_image(x)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        found = torch.zeros(b, *size, device=x.device)  # max(S_1..S_{t-1})
        stage_maps = torch.zeros(b, self.stages, *size, device=x.device)
        removed = torch.zeros(b, self.stages, *size, dtype=torch.bool, device=x.device)
        fused = torch.zeros(b, *size, device=x.device)
        if self.stop_fraction is not None:
            p_full = self.target_probability(x, targets)
        masks = []
        for t in self.track(self.stages):
            r = top_fraction(found, self.remove_fraction) if t else removed[:, 0]
            removed[:, t] = r
            xt = torch.where(r[:, None], fill, x)
            if t and self.stop_fraction is not None:
                active &= self.target_probability(xt, targets) >= self.stop_fraction * p_full
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                masks.append({
                    "samples": idx,
                    "benchmark": [x.new_zeros(0, 1, s, s) for s in self.benchmark_sizes],
                    "auxiliary": [x.new_zeros(0, 1, s, s) for s in self.auxiliary_sizes],
                })
                continue
            s, m = self.dm(xt[idx], fill[idx], targets[idx])
            masks.append({"samples": idx, **m})
            stage_maps[idx, t] = s
            fused[idx] += self.stage_weights[t] * s * (~r[idx]).float()
            found[idx] = torch.maximum(found[idx], s)
        return HDMResult(saliency=fused, stage_maps=stage_maps, removed=removed, masks=masks)

    def explain(self, images: Tensor, targets: Tensor | list[int]) -> HDMResult:
        """Full result (fused map, stage maps, removed regions, masks) under the model guard."""
        images, targets = check_inputs(images, targets)
        with model_guard(self.model), torch.enable_grad():
            return self._explain(images, targets)

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        return self._explain(images, targets).saliency
