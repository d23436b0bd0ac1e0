"""TSGB (Cheng et al., IEEE TIP 2022): target-selective gradient backprop.

Relevance-style backward rules (``R = g * activation``) on every conv, every BatchNorm,
``nn.AvgPool2d`` and the last linear layer; everything else keeps its ordinary gradient.
Follows the reference code 123fxdx/CNNvisualizationTSGB (``explainer/RGBP_cbp/
functionsGBP.py``: ``WoneConv2dG``, ``LRPBNG``, ``CLinearG``, ``AVGPoolG``).

Cost per image: 1 forward + 1 modified backward (each conv backward recomputes its forward and runs two all-ones convs).
Defaults and their sources: gamma=1.0 and epsilon=1e-10 (123fxdx/CNNvisualizationTSGB functionsGBP.py CLinearG/WoneConv2dG); grouped_rule='group' (the reference's commented-out full rule; 'slim' = its shipped code); signed RGB sum of gradient x input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backprop_rules import (
    SMOOTH_NONLINEARITIES,
    ModifiedBackprop,
    RuleTable,
    RuleTrace,
    check_reduction,
    conv_args,
    explicit_padding,
)
from .base import FORWARD
from .errors import MethodError
from .features import CONV_HEAD, RELU_NETS_ONLY
from .registry import register

GROUPED_RULES = ("group", "slim")

#: ops TSGB has no relevance rule for (besides smooth activations): refused, naming the layer
TSGB_REFUSED = SMOOTH_NONLINEARITIES | frozenset(
    {
        F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm,
        F.conv1d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
        F.scaled_dot_product_attention, F.multi_head_attention_forward,
    }
)


def stabilize(a: Tensor, eps: float) -> Tensor:
    """``a + eps * sign(a)`` with ``sign(0) = 1``: a denominator that never crosses zero."""
    return a + torch.where(a >= 0, eps, -eps)


class TSGBConv(torch.autograd.Function):
    """TSGB-Conv: relevance of each output position spread over its receptive field by |a|.

    ``r(p) = sum_k g_k(p) z_k(p)`` (z recomputed, bias included), ``m(p)`` = receptive-field
    sum of ``|a|`` (all-ones conv), ``g_in,c(q) = sign(a_c(q)) * sum_{p: q in RF(p)} r(p) /
    (m(p) + eps)``. The conv weights never enter the backward. ``rule_groups`` = the conv's
    groups (relevance stays inside each group) or 1 (the reference "slim" code: sums over
    all channels, ignoring groups). Identical for ``groups == 1``.
    """

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
        dilation: tuple, groups: int, rule_groups: int, eps: float,
    ) -> Tensor:
        ctx.conf = (stride, padding, dilation, groups, rule_groups, eps)
        ctx.save_for_backward(a, weight, bias)
        return F.conv2d(a, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups, rg, eps = ctx.conf
        af, g = a.float(), g.float()
        z = F.conv2d(af, weight.float(), None if bias is None else bias.float(),
                     stride, padding, dilation, groups)
        b, c_in, h, w = af.shape
        r = (g * z).unflatten(1, (rg, -1)).sum(2)
        mass = af.abs().unflatten(1, (rg, -1)).sum(2)
        ones = torch.ones((rg, 1, *weight.shape[-2:]), dtype=af.dtype, device=af.device)
        m = F.conv2d(mass, ones, None, stride, padding, dilation, rg)
        v = torch.nn.grad.conv2d_input(mass.shape, ones, r / (m + eps), stride, padding,
                                       dilation, rg)
        g_in = (v.unsqueeze(2) * af.sign().unflatten(1, (rg, -1))).reshape(b, c_in, h, w)
        return g_in.to(a.dtype), None, None, None, None, None, None, None, None


class TSGBBatchNorm(torch.autograd.Function):
    """BN made relevance-transparent: ``g_in = g * BN(a) / a`` (``R_in = R_out``)."""

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
        bias: Tensor | None, bn_eps: float, eps: float,
    ) -> Tensor:
        out = F.batch_norm(a, mean, var, weight, bias, False, 0.0, bn_eps)
        ctx.save_for_backward(out / stabilize(a, eps))  # a fresh tensor: in-place edits safe
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (ratio,) = ctx.saved_tensors
        return g * ratio, None, None, None, None, None, None


class TSGBLinear(torch.autograd.Function):
    """TSGB-FC: ``g_h = sum_k g_k (W+_k + gamma * beta_k * W-_k)``, ``beta_k = P_k / |N_k|``.

    ``P_k = h . W+_k``, ``N_k = h . W-_k`` per sample (``h >= 0``), so with a one-hot seed
    the relevance ``h . g_h`` entering the network is ``(1 - gamma) P_t`` (0 for gamma 1).
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, gamma: float, eps: float
    ) -> Tensor:
        ctx.conf = (gamma, eps)
        ctx.save_for_backward(h, weight)
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        gamma, eps = ctx.conf
        hf, wf, g = h.float(), weight.float(), g.float()
        w_pos, w_neg = wf.clamp(min=0), wf.clamp(max=0)
        beta = (hf @ w_pos.T) / ((hf @ w_neg.T).abs() + eps)
        g_h = g @ w_pos + (gamma * g * beta) @ w_neg
        return g_h.to(h.dtype), None, None, None, None


class TSGBAvgPool(torch.autograd.Function):
    """``nn.AvgPool2d``: each window's relevance spread uniformly, ``g_in = pool'(g*out) / a``."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, pool_args: tuple, eps: float) -> Tensor:
        ctx.conf = (pool_args, eps)
        ctx.save_for_backward(a)
        return F.avg_pool2d(a, *pool_args)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (a,) = ctx.saved_tensors
        pool_args, eps = ctx.conf
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            out = F.avg_pool2d(leaf, *pool_args)
            (spread,) = torch.autograd.grad(out, leaf, g * out.detach())
        return spread / stabilize(a, eps), None, None


def _bn_args(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
             weight: Tensor | None, bias: Tensor | None, training: bool,
             momentum: float | None, eps: float) -> tuple:
    # no defaults: F.batch_norm hands every argument to a __torch_function__ handler
    return input, running_mean, running_var, weight, bias, training, eps


def _linear_args(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple:
    return input, weight, bias


def _avg_pool_args(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                   ceil_mode: bool = False, count_include_pad: bool = True,
                   divisor_override: int | None = None) -> tuple:
    return input, (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (registration order): the TSGB-FC layer."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise MethodError(
            f"tsgb: TSGB-FC needs an nn.Linear classifier, {type(model).__name__} has none"
        )
    return found[-1]


class _TSGBPass:
    """The rule table of one TSGB forward pass, with its per-call state (linear-call order)."""

    def __init__(self, method: TSGB) -> None:
        self.method = method
        self.fc_name, self.fc = last_linear(method.model)
        self.linear_calls: list[bool] = []  # True where the call was the TSGB-FC layer

    def table(self) -> RuleTable:
        handlers: dict[Callable, Callable] = {
            F.conv2d: self.conv,
            F.batch_norm: self.batch_norm,
            F.linear: self.linear,
            F.avg_pool2d: self.avg_pool,
        }
        return RuleTable(
            handlers=handlers, refused=TSGB_REFUSED, finish=self.finish,
            supported="Conv2d, BatchNorm2d, AvgPool2d, the last Linear; ReLU/ReLU6, max and "
            "global pools, adds keep plain gradients",
        )

    def conv(self, trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
        x, padding = explicit_padding(x, w, padding, dilation)
        rule_groups = groups if self.method.grouped_rule == "group" else 1
        trace.touch(func)
        return TSGBConv.apply(x, w, b, stride, padding, dilation, groups, rule_groups,
                              self.method.epsilon)

    def batch_norm(self, trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, mean, var, weight, bias, training, bn_eps = _bn_args(*args, **kwargs)
        if training or mean is None or var is None:
            raise trace.error("BatchNorm without running statistics (train mode) has no TSGB rule")
        trace.touch(func)
        return TSGBBatchNorm.apply(x, mean, var, weight, bias, bn_eps, self.method.epsilon)

    def linear(self, trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        h, weight, bias = _linear_args(*args, **kwargs)
        is_fc = weight is self.fc.weight
        self.linear_calls.append(is_fc)
        if not is_fc:
            return func(*args, **kwargs)  # other linear layers: ordinary gradient (reference)
        if h.dim() != 2:
            raise trace.error(f"TSGB-FC needs a [B, D] input, got shape {tuple(h.shape)}")
        if bool((h < 0).any()):
            raise trace.error("TSGB-FC needs non-negative inputs (post-ReLU features)")
        trace.touch(func)
        return TSGBLinear.apply(h, weight, bias, self.method.gamma, self.method.epsilon)

    def avg_pool(self, trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, pool_args = _avg_pool_args(*args, **kwargs)
        trace.touch(func)
        return TSGBAvgPool.apply(x, pool_args, self.method.epsilon)

    def finish(self, _trace: RuleTrace) -> None:
        if self.linear_calls.count(True) != 1 or not self.linear_calls[-1]:
            raise MethodError(
                f"tsgb: TSGB-FC goes on the classifier {self.fc_name!r}, which must be called "
                f"once and be the last linear layer of the forward pass (linear calls, True for "
                f"{self.fc_name!r}: {self.linear_calls})"
            )


@register("tsgb")
class TSGB(ModifiedBackprop):
    """TSGB map ``M = sum_c x_c * g_x,c``: relevance-style gradient times input.

    Rules (reference code; see the module docstring):

    * TSGB-Conv on every conv call (ResNet downsample 1x1s and the stem included;
      ``Conv2dStaticSamePadding``'s zero padding is part of the receptive field);
      ``grouped_rule="group"`` (default) keeps relevance inside each group of grouped and
      depthwise convs, ``"slim"`` is the reference's shipped code (ignores groups).
    * BatchNorm relevance-transparent (``R_in = R_out``, not folded; folding BN into the
      conv gives the same map up to ``epsilon``).
    * TSGB-FC on the model's last ``nn.Linear`` only (``gamma`` multiplies ``beta``;
      ``gamma=1`` makes the map sum to 0 on nets whose only linear layer is the last one);
      other linear layers (VGG fc6/fc7) keep ordinary gradients, as in the reference.
    * ``nn.AvgPool2d``/``F.avg_pool2d``: window relevance spread uniformly. ReLU, ReLU6,
      max-pool, adaptive/global average pool, residual adds, dropout: ordinary gradients
      (relevance-conserving for ReLU, max-pool, GAP and adds). Smooth activations, other
      norms and other convs raise.

    ReLU6 networks (MobileNetV2, EfficientNet-Lite, salmap's demo model). The reference code
    has ReLU only; salmap gives ReLU6 its ordinary gradient, which is 0 above 6, and keeps the
    BN rule as written. Two places then drop relevance, so the map is no longer zero-sum:

    * a ReLU6 unit saturated at 6 passes no gradient: its relevance ``6 * g`` is lost;
    * a BN unit whose input is exactly 0 (a depthwise window of all-zero ReLU6 outputs,
      common in these nets) cannot pass on the relevance its shift creates, ``g * BN(0)``
      (the rule divides by the input).

    ``sum M = (1 - gamma) P_t - (both losses)``, exactly; tests/test_methods_tsgb.py checks it
    on a toy ReLU6 net and on the pretrained EfficientNet-Lite0, where the losses are a large
    share of the map's mass (per-photo balance ``|sum M| / sum |M|``: bench/method_quality.py,
    figures in BENCHMARKS.md). Nets with ReLU and dense convs stay zero-sum.
    * ``epsilon`` (1e-10) stabilises the conv, BN, avg-pool and ``|N_k|`` denominators
      (``a + eps * sign(a)``, ``sign(0) = 1``).

    Map: ``reduction="sum"`` (default, signed sum over RGB as the reference), or
    ``"positive_sum"`` / ``"max_abs"``; raw and signed (the reference display clips
    negatives and max-normalises). Returns ``[B,H,W]`` at the input resolution.
    """

    # each conv backward recomputes its forward and runs two all-ones convs: ~2 backwards
    work_per_image = staticmethod(lambda p: FORWARD + 2 * (1 - FORWARD))
    no_rule = RELU_NETS_ONLY | {CONV_HEAD}
    no_rule_why = ("rules for ReLU convolutional networks only, and the relevance is passed "
                   "to the input through an nn.Linear classifier")
    cost = (
        "1 forward + 1 modified backward (each conv backward recomputes its forward and runs "
        "two single-channel-per-group all-ones convs)"
    )
    defaults_source = (
        "123fxdx/CNNvisualizationTSGB functionsGBP.py: gamma=1.0 (CLinearG), epsilon=1e-10; "
        "grouped rule 'group' (commented-out full version; 'slim' = shipped code); signed "
        "RGB sum of gradient x input"
    )
    times_input = True

    def __init__(
        self,
        model: nn.Module,
        gamma: float = 1.0,
        epsilon: float = 1e-10,
        grouped_rule: str = "group",
        reduction: str = "sum",
    ) -> None:
        super().__init__(model)
        if grouped_rule not in GROUPED_RULES:
            raise MethodError(
                f"tsgb: grouped_rule must be one of {', '.join(GROUPED_RULES)}, got {grouped_rule!r}"
            )
        if not epsilon > 0:
            raise MethodError(f"tsgb: epsilon must be > 0, got {epsilon}")
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.grouped_rule = grouped_rule
        self.reduction = check_reduction(self.name, reduction)

    def rules(self) -> RuleTable:
        """The TSGB rules of one forward pass."""
        return _TSGBPass(self).table()
