"""DMBP, Disentangled Masked Backpropagation (Ruiz, Agudo & Moreno-Noguer, ICCV 2021,
arXiv 2101.06773): learn per-filter masks on the backward pass so that masked backpropagation
splits the target logit's gradient x input into a positive and a negative linear mapping.

RECONSTRUCTED in its loss. The paper body and the official code (gitlab adriaruizo/dmbp_iccv21)
could not be read; see specs/methods/dmbp.md. Do not compare its numbers with the paper's.

Faithful to what is known (abstract, Figure 2 caption, the official API as called by a third
party, the official visualisation):
  * one mask per filter (output channel), masking each filter's contribution in the BACKWARD
    pass; two mask sets (positive, negative) give two input-shaped mappings ``W+``, ``W-`` and
    attributions ``A+ = x * W+``, ``A- = x * W-``; with all-ones masks ``W = dS_t/dx``;
  * eval mode, pre-softmax target logit; display: :func:`display_map` (channel mean,
    99.99th-percentile clip, shift, common max).

Reconstructed (every choice is a constructor parameter):
  * masks on the output of every ``nn.Conv2d`` (incl. subclasses, e.g. EfficientNet-Lite's
    ``Conv2dStaticSamePadding``), none on the skip paths, the Linear head or activations; a
    conv module called several times in one forward uses its one mask for every call; BN
    after a conv is per-channel affine, so masking the conv masks the BN output too; the ReLU
    gates and max-pool switches stay those of the single forward pass (masks act only on the
    backward, so forward values never change); masks ``m = sigmoid(theta)`` from ``0.98``.
  * **the loss** ``objective="decompose"`` (the paper's structure: the OUTPUT decomposed into
    linear mappings). For a piecewise-linear net (ReLU, max-pool, eval BN, ReLU6) the logit
    is locally affine: ``f_t(x) = <W,x> + beta(x)``, ``W = dS_t/dx``, ``beta`` = biases, BN
    shifts and saturated ReLU6 units (0 for a ReLU net without biases, where ``F(x) = A x``
    exactly). With ``N = W - W+ - W-`` (the nuisance), exactly
    ``f_t(x) = <W+,x> + <W-,x> + <N,x> + beta``; ``beta`` is counted as its own term
    (``DMBPResult.bias_term``), attributed to no pixel. Per image, with ``S = sum|x*W|``::

        rw * (((<W+,x> + <W-,x> - <W,x>) / S)^2 + relu(-<W+,x>/S)^2 + relu(<W-,x>/S)^2)
          - ew * (<W+,x> - <W-,x>) / S
          + sw * (sum relu(-A+) + sum relu(A-)) / S  + nw * sum|x*N| / S
          + sparsity_weight * (mean(m+) + mean(m-))

    i.e. the two mappings reproduce the output's linear part (the nuisance carries no
    evidence), the positive one's output is >= 0 and the negative one's <= 0 (always
    feasible: one set all ones, the other all zeros), each carries as much evidence of its
    sign as the masks allow (bounded: masks are in [0, 1]), pixels of the wrong sign cost,
    few filters. Weights rw=100, ew=1, sw=2, nw=0, sparsity 0.05, chosen on the synthetic
    tuning split (seed 1; BENCHMARKS.md section 10.2). Assumed, no source: every term and
    weight. The earlier region fit of gradient x input ([R2] ``"fit"``, [R1]
    ``"completeness"``) is :class:`DMBPFit` (``dmbp_fit``), not in the registry.
  * the returned map: ``output="net"`` gives ``mean_c A+ + mean_c A-`` (signed), the official
    display ``P - Q`` before its clip / shift / scaling; ``"positive"`` / ``"negative"`` give
    ``mean_c A+`` / ``mean_c A-``. Raw values, ``[B,H,W]``; the pipeline normalises.

Batch independence: per-image masks and Adam moments, a loss summed over per-image terms, and
all per-image statistics (``P``, norms) computed per sample; a batch gives the maps its images
give alone.

Cost per image: 1 forward + ``steps`` x (2 masked backwards with ``create_graph`` + 1 double
backward to the masks) + 3 plain backwards. The forward graph is kept for all iterations (the
forward never depends on the masks); the double backward needs roughly 2-3x the memory of a
plain backward. Every conv runs through :class:`_LinearConv`, whose double backward computes
only what the masks need (autograd's computes an unused weight gradient, group by group).
Timings: BENCHMARKS.md (method quality).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backprop_rules import RuleTable, RuleTrace, apply_rules, conv_args, explicit_padding
from .base import FORWARD, Method, MethodError, check_inputs, model_guard, target_scores
from .features import ATTENTION, HARD, LAYER_NORM
from .mask_opt import MaskOptimizer, check_optimizer, logit, shared_noise
from .registry import register

OUTPUTS = ("net", "positive", "negative")
OBJECTIVES = ("decompose",)
#: the objectives of :class:`DMBPFit` (the earlier reconstructions; not the paper's structure)
FIT_OBJECTIVES = ("fit", "completeness")
PARAMETERISATIONS = ("sigmoid", "clamp")


class _Slot:
    """The mask currently applied to one layer's backward: ``[B, C]`` or None (identity)."""

    mask: Tensor | None = None


class _MaskGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by the slot's per-filter mask.

    The mask is read when the backward runs, so one forward graph serves any number of masked
    backward passes; under ``create_graph=True`` the product is recorded, which makes the
    mapping differentiable with respect to the mask.
    """

    @staticmethod
    def forward(ctx, x: Tensor, slot: _Slot) -> Tensor:  # noqa: D102
        ctx.slot = slot
        # a copy: an in-place op after the conv (VGG's ReLU(inplace=True)) may modify it
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        m = ctx.slot.mask
        if m is None:
            return grad, None
        return (grad * m[:, :, None, None]).to(grad.dtype), None


class _ConvInputGrad(torch.autograd.Function):
    """A conv's input gradient ``conv_transpose(g, W)``, differentiable in ``g`` only.

    Its backward is the conv itself. Autograd's own double backward of a conv
    (``_convolution_double_backward``) also computes a weight gradient nobody asked for, one
    group at a time: for the depthwise convs of MobileNet/EfficientNet that is a Python-level
    loop of C small convs per layer and per step (~5x slower DMBP on EfficientNet-Lite0).
    """

    @staticmethod
    def forward(ctx, g: Tensor, weight: Tensor, shape: torch.Size, conf: tuple) -> Tensor:  # noqa: D102
        ctx.conf = conf
        ctx.save_for_backward(weight)
        return torch.nn.grad.conv2d_input(shape, weight.to(g.dtype), g, *conf)

    @staticmethod
    def backward(ctx, gg: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        (weight,) = ctx.saved_tensors
        return F.conv2d(gg, weight.to(gg.dtype), None, *ctx.conf), None, None, None


class _LinearConv(torch.autograd.Function):
    """An ordinary conv whose input gradient is a :class:`_ConvInputGrad` (no weight grads)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conf: tuple) -> Tensor:  # noqa: D102
        ctx.conf, ctx.shape, ctx.dtype = conf, x.shape, x.dtype
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        (weight,) = ctx.saved_tensors
        return _ConvInputGrad.apply(g, weight, ctx.shape, ctx.conf).to(ctx.dtype), None, None, None


def _linear_conv(_trace: RuleTrace, _func, args: tuple, kwargs: dict) -> Tensor:
    x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
    x, padding = explicit_padding(x, w, padding, dilation)
    return _LinearConv.apply(x, w, b, (stride, padding, dilation, groups))


#: every conv call of the DMBP forward: plain forward, input-only (double) backward
LINEAR_CONVS = RuleTable(handlers={F.conv2d: _linear_conv}, refused=frozenset())


@contextlib.contextmanager
def masked_backward(layers: dict[str, nn.Module], batch: int) -> Iterator[dict[str, _Slot]]:
    """Route the outputs of ``layers`` through :class:`_MaskGrad` for forwards run inside.

    Yields one :class:`_Slot` per layer name; set ``slot.mask`` before each backward. The
    forward hooks are always removed on exit (the graph built inside keeps working). A layer
    whose output is not ``[batch, out_channels, h, w]`` raises :class:`MethodError` naming it.
    """
    slots = {name: _Slot() for name in layers}
    handles = []

    def make_hook(name: str, channels: int):
        def hook(_m: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
            if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[:2] != (batch, channels):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise MethodError(
                    f"dmbp: layer {name!r} gives output {shape}; per-filter masks need "
                    f"[{batch}, {channels}, h, w]"
                )
            return _MaskGrad.apply(out, slots[name])

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(make_hook(name, layer.out_channels)))
        yield slots
    finally:
        for h in handles:
            h.remove()


def display_map(pos: Tensor, neg: Tensor, percentile: float = 99.99) -> Tensor:
    """The official DMBP display ``P - Q`` in ``[-1, 1]`` from ``A+``, ``A-`` ``[B,3,H,W]``.

    ``P = mean_c A+``, ``Q = -mean_c A-``; each clipped at the ``percentile`` of its absolute
    values, shifted to minimum 0, both divided by their common maximum; per sample.
    """

    def prep(a: Tensor) -> Tensor:
        flat = a.flatten(1)
        k = max(1, min(flat.shape[1], round(percentile / 100.0 * flat.shape[1])))
        hi = flat.abs().kthvalue(k, dim=1).values[:, None]
        flat = torch.maximum(torch.minimum(flat, hi), -hi)
        return flat - flat.amin(dim=1, keepdim=True)

    p = prep(pos.float().mean(dim=1))
    q = prep(-neg.float().mean(dim=1))
    top = torch.maximum(p.amax(dim=1), q.amax(dim=1)).clamp_min(1e-12)[:, None]
    return ((p - q) / top).view(pos.shape[0], *pos.shape[2:])


@dataclass
class DMBPResult:
    """Everything DMBP computes for a batch (float32, detached; maps ``[B,3,H,W]``).

    For every image, exactly (by the definitions of the nuisance and the bias term)::

        target_score = sum(pos_attribution) + sum(neg_attribution)
                       + sum(nuisance_attribution) + bias_term
    """

    pos_attribution: Tensor
    neg_attribution: Tensor
    pos_mapping: Tensor
    neg_mapping: Tensor
    gradient_x_input: Tensor
    #: ``A - A+ - A-`` = ``x * (W - W+ - W-)``: what neither mapping keeps
    nuisance_attribution: Tensor
    #: final masks per layer name, ``[B, C]``
    pos_masks: dict[str, Tensor]
    neg_masks: dict[str, Tensor]
    #: per-step total loss (summed over the batch), for diagnostics
    losses: list[float]
    #: the target logit ``f_t(x)``, ``[B]``
    target_score: Tensor | None = None
    #: ``f_t(x) - <W, x>``: the part of the logit no linear mapping of ``x`` carries (biases,
    #: BatchNorm shifts, saturated ReLU6 units); 0 up to float error for a bias-free ReLU net
    bias_term: Tensor | None = None


@register("dmbp")
class DMBP(Method):
    """Disentangled masked backpropagation: the output decomposed into a positive, a negative
    and a nuisance linear mapping by per-filter masks on the backward pass (module docstring)."""

    #: objectives this class accepts (the default first)
    objectives: tuple[str, ...] = OBJECTIVES
    # 1 F + steps x (2 masked backwards with create_graph + 1 double backward ~ 2 B) + 3 B
    work_per_image = staticmethod(lambda p: FORWARD + (1 - FORWARD) * (4 * int(p["steps"]) + 3))
    no_rule = frozenset({HARD, LAYER_NORM, ATTENTION})
    no_rule_why = ("masks cover nn.Conv2d filters only (LayerNorm models mix channels in "
                   "nn.Linear layers, attention has no filters), and the backward pass is "
                   "differentiated twice, which PyTorch cannot do through hardswish")
    cost = (
        "1 forward + steps x (2 masked backwards with create_graph + 1 double backward) "
        "+ 3 backwards; steps=100"
    )
    defaults_source = (
        "per-filter masks on the backward pass, positive / negative / nuisance mappings that "
        "decompose the output: abstract + Figure 2 caption; display clip 99.99: official "
        "visualization_funcs.py. RECONSTRUCTED, no source: the loss terms and weights "
        "(reconstruction 100, evidence 1, sign 2, sparsity 0.05; chosen on the synthetic "
        "tuning split, seed 1, BENCHMARKS.md section 10), Adam lr=0.1, 100 steps (the "
        "third-party call uses 200), sigmoid masks from 0.98, every Conv2d"
    )

    def __init__(
        self,
        model: nn.Module,
        steps: int = 100,
        lr: float = 0.1,
        optimizer: str = "adam",
        objective: str | None = None,
        reconstruction_weight: float = 100.0,
        evidence_weight: float = 1.0,
        sign_weight: float | None = None,
        nuisance_weight: float = 0.0,
        sparsity_weight: float | None = None,
        fit_pool: int = 16,
        completeness_weight: float = 1.0,
        parameterisation: str = "sigmoid",
        mask_init: float = 0.98,
        init_noise: float = 0.0,
        masked_layers: Sequence[str] | None = None,
        output: str = "net",
        seed: int = 0,
    ) -> None:
        """
        Args:
            steps: optimisation iterations per image.
            lr, optimizer: ``"adam"`` (default) or ``"sgd"``; element-wise either way.
            objective: ``"decompose"`` (the only one of ``dmbp``; :class:`DMBPFit` has the
                earlier ``"fit"`` and ``"completeness"``).
            reconstruction_weight: weight of ``((<W+,x> + <W-,x> - <W,x>) / S)^2``: the two
                mappings must reproduce the output's linear part (the nuisance carries no
                evidence).
            evidence_weight: weight of ``-(<W+,x> - <W-,x>) / S``: the positive mapping's
                output as large, the negative one's as negative, as the masks allow.
            sign_weight: weight of ``(sum relu(-A+) + sum relu(A-)) / S`` (pixel signs);
                None = 2 for ``"decompose"``, 0 for ``"fit"``, 1 for ``"completeness"``.
            nuisance_weight: weight of ``sum |A - A+ - A-| / S`` (nuisance small in norm).
            sparsity_weight: weight of ``mean(m+) + mean(m-)``; None = 0.05 for
                ``"decompose"``, 0.1 for the others.
            fit_pool, completeness_weight: ``"fit"`` / ``"completeness"`` only.
            parameterisation: ``"sigmoid"`` (``m = sigmoid(theta)``) or ``"clamp"`` (masks
                optimised directly and clamped to [0, 1] after each step).
            mask_init: initial mask value (both sets).
            init_noise: subtract ``init_noise * U[0,1)`` from the initial masks; the noise is
                drawn from ``seed`` once per layer and shared by all images. 0 = deterministic
                all-``mask_init`` start, where ``seed`` has no effect.
            masked_layers: names of the ``nn.Conv2d`` modules to mask; None = every Conv2d.
            output: ``"net"`` | ``"positive"`` | ``"negative"`` (see the module docstring).
            seed: seed of ``init_noise``.
        """
        super().__init__(model)
        check_optimizer(optimizer, lr)
        if objective is None:
            objective = self.objectives[0]
        if steps < 0:
            raise MethodError(f"{self.name}: steps must be >= 0, got {steps}")
        if objective not in self.objectives:
            hint = (" (the region fit is the separate method DMBPFit, 'dmbp_fit')"
                    if objective in FIT_OBJECTIVES else "")
            raise MethodError(f"{self.name}: objective must be one of "
                              f"{', '.join(self.objectives)}, got {objective!r}{hint}")
        if objective == "completeness":
            warnings.warn(
                "dmbp_fit: objective='completeness' (the first reconstruction) is minimised by "
                "all-zero masks whenever the gradient x input sums to about 0; its maps are "
                "then leftover noise. Use dmbp (objective='decompose').", UserWarning,
                stacklevel=2)
        if int(fit_pool) < 1:
            raise MethodError(f"{self.name}: fit_pool must be >= 1, got {fit_pool}")
        if parameterisation not in PARAMETERISATIONS:
            raise MethodError(f"{self.name}: parameterisation must be one of {PARAMETERISATIONS}")
        if parameterisation == "sigmoid":
            logit(mask_init)  # validates 0 < mask_init < 1
        elif not 0.0 <= mask_init <= 1.0:
            raise MethodError(f"{self.name}: mask_init must be in [0, 1], got {mask_init}")
        if output not in OUTPUTS:
            raise MethodError(f"{self.name}: output must be one of {', '.join(OUTPUTS)}, got "
                              f"{output!r}")
        if init_noise < 0:
            raise MethodError(f"{self.name}: init_noise must be >= 0")
        if min(reconstruction_weight, evidence_weight, nuisance_weight) < 0:
            raise MethodError(f"{self.name}: loss weights must be >= 0")
        self.steps, self.lr, self.optimizer = int(steps), float(lr), optimizer
        self.objective, self.fit_pool = objective, int(fit_pool)
        if sparsity_weight is None:
            sparsity_weight = 0.05 if objective == "decompose" else 0.1
        self.sparsity_weight = float(sparsity_weight)
        self.completeness_weight = float(completeness_weight)
        if sign_weight is None:
            sign_weight = {"decompose": 2.0, "fit": 0.0, "completeness": 1.0}[objective]
        self.sign_weight = float(sign_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.evidence_weight, self.nuisance_weight = float(evidence_weight), float(nuisance_weight)
        self.parameterisation, self.mask_init = parameterisation, float(mask_init)
        self.init_noise, self.output, self.seed = float(init_noise), output, int(seed)
        self.layers = self._select_layers(masked_layers)

    def _select_layers(self, names: Sequence[str] | None) -> dict[str, nn.Conv2d]:
        modules = dict(self.model.named_modules())
        if names is None:
            layers = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
            if not layers:
                raise MethodError(
                    f"dmbp: {type(self.model).__name__} has no nn.Conv2d: nothing to mask"
                )
            return layers
        layers = {}
        for n in names:
            if n not in modules:
                raise MethodError(f"dmbp: masked layer {n!r} is not a module of the model")
            if not isinstance(modules[n], nn.Conv2d):
                raise MethodError(
                    f"dmbp: masked layer {n!r} is a {type(modules[n]).__name__}; per-filter "
                    "masks need an nn.Conv2d"
                )
            layers[n] = modules[n]
        if not layers:
            raise MethodError("dmbp: masked_layers is empty")
        return layers

    @property
    def mask_shapes(self) -> dict[str, int]:
        """Filters (output channels) per masked layer."""
        return {n: m.out_channels for n, m in self.layers.items()}

    # -- the masked mapping ---------------------------------------------------------------
    @contextlib.contextmanager
    def _session(
        self, images: Tensor, targets: Tensor
    ) -> Iterator[tuple[Tensor, Callable[..., Tensor], Tensor]]:
        """One forward of ``images``; yields ``(x, mapping, scores)``: ``mapping(masks,
        create)`` returns the masked input gradient ``W_m`` (float32, ``[b,3,H,W]``),
        ``scores`` are the target logits ``[b]`` (detached)."""
        x = images.detach().requires_grad_(True)
        with masked_backward(self.layers, x.shape[0]) as slots, \
                apply_rules(self.model, LINEAR_CONVS, self.name, x.shape[0]):
            scores = target_scores(self.forward(x), targets)
            score = scores.sum()

        def mapping(masks: dict[str, Tensor] | None, create_graph: bool = False) -> Tensor:
            for name, slot in slots.items():
                slot.mask = None if masks is None else masks[name]
            try:
                (w,) = torch.autograd.grad(
                    score, x, create_graph=create_graph, retain_graph=True
                )
            finally:
                for slot in slots.values():
                    slot.mask = None
            return w.float()

        yield x, mapping, scores.detach().float()

    def mappings(
        self, images: Tensor, targets: Tensor | list[int], mask_sets: Sequence[dict | None]
    ) -> list[Tensor]:
        """``W_m`` for each mask set (dict name -> ``[B, C]``, or None = all ones); for tests
        and diagnostics. Runs under the same model guard as a normal call."""
        images, targets = check_inputs(images, targets)
        with model_guard(self.model), torch.enable_grad():
            with self._session(images, targets) as (_x, mapping, _s):
                return [mapping(m).detach() for m in mask_sets]

    # -- optimisation ---------------------------------------------------------------------
    def _init_params(self, b: int, device: torch.device) -> list[Tensor]:
        """Per-image mask parameters, positive set then negative set, each ``[b, C]``."""
        params = []
        for k, c in enumerate(list(self.mask_shapes.values()) * 2):
            m0 = torch.full((c,), self.mask_init)
            if self.init_noise > 0:
                m0 = m0 - self.init_noise * shared_noise(self.seed, (c,), k)
            if self.parameterisation == "sigmoid":
                v = torch.logit(m0.clamp(1e-4, 1 - 1e-4))
            else:
                v = m0.clamp(0.0, 1.0)
            params.append(v.to(device).expand(b, c).clone().requires_grad_(True))
        return params

    def _masks(self, params: Sequence[Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        vals = [torch.sigmoid(p) if self.parameterisation == "sigmoid" else p for p in params]
        n = len(self.layers)
        names = list(self.layers)
        return dict(zip(names, vals[:n])), dict(zip(names, vals[n:]))

    def regions(self, a: Tensor) -> Tensor:
        """``P(a)``: the channel sum of ``[b,C,H,W]`` averaged over ``fit_pool`` px regions
        (edge regions over the pixels they have), ``[b, 1, h, w]``."""
        s = a.sum(1, keepdim=True)
        if self.fit_pool <= 1:
            return s
        return F.avg_pool2d(s, self.fit_pool, ceil_mode=True)

    def loss(
        self, a: Tensor, a_pos: Tensor, a_neg: Tensor, pos: dict[str, Tensor],
        neg: dict[str, Tensor],
    ) -> Tensor:
        """Per-image loss ``[b]`` (sum it for the batch); ``a`` is gradient x input, ``a_pos``
        / ``a_neg`` the attributions ``x * W+`` / ``x * W-`` of the current masks."""
        sparsity = torch.cat(list(pos.values()), 1).mean(1) + torch.cat(list(neg.values()), 1).mean(1)
        total = self.sparsity_weight * sparsity
        s = a.abs().flatten(1).sum(1).clamp_min(1e-30)
        if self.sign_weight:
            sign = (torch.relu(-a_pos).flatten(1).sum(1) + torch.relu(a_neg).flatten(1).sum(1)) / s
            total = total + self.sign_weight * sign
        if self.objective == "decompose":
            lin, out_pos, out_neg = (t.flatten(1).sum(1) for t in (a, a_pos, a_neg))
            # the two mappings reproduce the output's linear part, <W+,x> >= 0 >= <W-,x>
            # (always feasible: m- = 0 and m+ = 1 when <W,x> >= 0, the other way round if not)
            mismatch = ((out_pos + out_neg - lin) / s).square()
            signs = (torch.relu(-out_pos / s).square() + torch.relu(out_neg / s).square())
            total = total + self.reconstruction_weight * (mismatch + signs)
            total = total - self.evidence_weight * (out_pos - out_neg) / s
            if self.nuisance_weight:
                nuisance = (a - a_pos - a_neg).abs().flatten(1).sum(1) / s
                total = total + self.nuisance_weight * nuisance
            return total
        if self.objective == "completeness":
            split = a_pos.flatten(1).sum(1) + a_neg.flatten(1).sum(1)
            completeness = (split - a.flatten(1).sum(1)).square() / s.square()
            return total + self.completeness_weight * completeness
        p = self.regions(a)
        norm = p.square().flatten(1).sum(1).clamp_min(1e-30)
        fit = ((self.regions(a_pos) - p.clamp_min(0)).square().flatten(1).sum(1)
               + (self.regions(a_neg) - p.clamp_max(0)).square().flatten(1).sum(1)) / norm
        return total + fit

    def _explain_chunk(self, images: Tensor, targets: Tensor) -> DMBPResult:
        x_val = images.detach().float()
        with self._session(images, targets) as (_x, mapping, scores):
            a = x_val * mapping(None)
            params = self._init_params(images.shape[0], images.device)
            bounds = (0.0, 1.0) if self.parameterisation == "clamp" else None
            opt = MaskOptimizer(params, self.optimizer, self.lr, bounds=bounds)
            losses = []
            for _ in self.track(self.steps):
                pos, neg = self._masks(params)
                a_pos = x_val * mapping(pos, create_graph=True)
                a_neg = x_val * mapping(neg, create_graph=True)
                loss = self.loss(a, a_pos, a_neg, pos, neg).sum()
                grads = torch.autograd.grad(loss, params)
                opt.step(grads)
                losses.append(float(loss.detach()))
            with torch.no_grad():
                pos, neg = self._masks([p.detach() for p in params])
            w_pos, w_neg = mapping(pos), mapping(neg)
        a = a.detach()
        return DMBPResult(
            pos_attribution=x_val * w_pos, neg_attribution=x_val * w_neg,
            pos_mapping=w_pos, neg_mapping=w_neg, gradient_x_input=a,
            nuisance_attribution=a - x_val * (w_pos + w_neg),
            pos_masks=pos, neg_masks=neg, losses=losses,
            target_score=scores, bias_term=scores - a.flatten(1).sum(1),
        )

    def _explain(self, images: Tensor, targets: Tensor) -> DMBPResult:
        """Images are optimised ``inner_batch_size`` at a time (each chunk: one forward graph)."""
        parts = [self._explain_chunk(images[sl], targets[sl]) for sl in self.chunks(images.shape[0])]
        if len(parts) == 1:
            return parts[0]

        def cat(field: str) -> Tensor:
            return torch.cat([getattr(p, field) for p in parts])

        def cat_masks(field: str) -> dict[str, Tensor]:
            return {n: torch.cat([getattr(p, field)[n] for p in parts]) for n in self.layers}

        return DMBPResult(
            cat("pos_attribution"), cat("neg_attribution"), cat("pos_mapping"),
            cat("neg_mapping"), cat("gradient_x_input"), cat("nuisance_attribution"),
            cat_masks("pos_masks"),
            cat_masks("neg_masks"), [sum(v) for v in zip(*[p.losses for p in parts])],
            cat("target_score"), cat("bias_term"),
        )

    def explain(self, images: Tensor, targets: Tensor | list[int]) -> DMBPResult:
        """Full result (attributions, mappings, masks, loss curve, target logit and bias
        term) under the model guard."""
        images, targets = check_inputs(images, targets)
        with model_guard(self.model), torch.enable_grad():
            return self._explain(images, targets)

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        res = self._explain(images, targets)
        pos = res.pos_attribution.mean(dim=1)
        neg = res.neg_attribution.mean(dim=1)
        if self.output == "positive":
            return pos
        if self.output == "negative":
            return neg
        return pos + neg


class DMBPFit(DMBP):
    """The earlier DMBP reconstruction, kept under its own name: the positive / negative
    mappings fit the positive / negative REGIONS of gradient x input (``"fit"``, [R2]) or its
    total (``"completeness"``, [R1]). Not the paper's structure: it re-splits gradient x input
    instead of decomposing the output. Importable, not in the method registry."""

    name = "dmbp_fit"
    objectives = FIT_OBJECTIVES
    defaults_source = (
        "RECONSTRUCTED [R2], no source: region fit of the positive / negative evidence of "
        "gradient x input (fit_pool=16) + sparsity 0.1, Adam lr=0.1, 100 steps, sigmoid masks "
        "from 0.98, every Conv2d"
    )
