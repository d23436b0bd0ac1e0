"""Shared machinery of the modified-backpropagation methods (Guided Backprop, RectGrad, TSGB).

Each backward rule is a small ``torch.autograd.Function`` whose forward is the ordinary op.
Rules are attached by :func:`apply_rules`, a context manager that intercepts torch *functions*
(a ``TorchFunctionMode``) during the forward pass instead of swapping modules:

* functional calls (``F.relu``, ``torch.relu``, ``x.relu_()``) get the rule exactly like
  ``nn.ReLU`` modules, and a module called several times (ResNet's ``self.relu``,
  EfficientNet-Lite's ``_swish``) gets it on every call: the rules are stateless, any state
  (thresholds, saved activations) lives in the autograd graph of that one call;
* the model is never modified: no module is replaced, no attribute (``inplace``) is changed,
  and the only hooks (forward pre/post hooks that track which layer is running, for error
  messages and counts) are removed on exit, also on error;
* in-place calls keep their meaning: an in-place activation made by an ``nn.ReLU``/``ReLU6``
  module returns the rule's fresh output (the module returns it), a functional in-place call
  copies the rule's output back into its argument. Rules save only tensors they created, so
  ``out += identity`` on a tensor a rule produced is safe; any other in-place edit of a saved
  tensor makes autograd raise (loudly, never a silent wrong map);
* ops a method has no rule for (smooth activations, ...) raise :class:`MethodError` naming
  the layer. Activations computed without torch functions (a ``clamp`` used as a ReLU,
  TorchScript) cannot be seen; TorchScript models are refused.

The backward runs after the context has closed, so the rules' own backward code is never
intercepted.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import Method, check_inputs, model_guard, target_scores
from .errors import MethodError
from .features import RELU_NETS_ONLY

Handler = Callable[["RuleTrace", Callable, tuple, dict], Tensor]

# -- which torch functions are what -------------------------------------------------------


def _relu_args(input: Tensor, inplace: bool = False) -> tuple[Tensor, float, float | None, bool]:
    return input, 0.0, None, inplace


def _relu_inplace_args(input: Tensor) -> tuple[Tensor, float, float | None, bool]:
    return input, 0.0, None, True


def _relu6_args(input: Tensor, inplace: bool = False) -> tuple[Tensor, float, float | None, bool]:
    return input, 0.0, 6.0, inplace


def _hardtanh_args(
    input: Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> tuple[Tensor, float, float | None, bool]:
    return input, float(min_val), float(max_val), inplace


def _hardtanh_inplace_args(
    input: Tensor, min_val: float = -1.0, max_val: float = 1.0
) -> tuple[Tensor, float, float | None, bool]:
    return input, float(min_val), float(max_val), True


#: ReLU-type activations -> parser returning (input, lower, upper or None, inplace).
#: ``nn.ReLU`` calls ``F.relu``; ``nn.ReLU6`` calls ``F.hardtanh(x, 0, 6)``.
ACTIVATIONS: dict[Callable, Callable[..., tuple[Tensor, float, float | None, bool]]] = {
    F.relu: _relu_args,
    torch.relu: lambda input: _relu_args(input),
    Tensor.relu: lambda input: _relu_args(input),
    torch.relu_: _relu_inplace_args,
    Tensor.relu_: _relu_inplace_args,
    F.relu6: _relu6_args,
    F.hardtanh: _hardtanh_args,
    F.hardtanh_: _hardtanh_inplace_args,
}

#: nonlinearities none of the rules here is defined for (refused, never passed through)
SMOOTH_NONLINEARITIES: frozenset[Callable] = frozenset(
    {
        torch.sigmoid, Tensor.sigmoid, torch.sigmoid_, Tensor.sigmoid_, F.sigmoid,
        torch.tanh, Tensor.tanh, torch.tanh_, Tensor.tanh_, F.tanh,
        F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.elu_, F.selu, F.celu,
        F.leaky_relu, F.leaky_relu_, F.rrelu, F.prelu, F.softplus, F.softsign, F.logsigmoid,
        F.glu, F.tanhshrink, F.softshrink, F.hardshrink,
    }
)


#: modules whose own forward makes the call a rule handles (counted under the module's name)
LAYER_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.AvgPool2d)


def func_name(func: Callable) -> str:
    """A torch function's name for messages and counts."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


# -- the interception context --------------------------------------------------------------


@dataclass
class RuleTable:
    """What one method overrides during one forward pass."""

    handlers: dict[Callable, Handler]
    refused: frozenset[Callable] = SMOOTH_NONLINEARITIES
    #: what the rules cover, for the refusal message
    supported: str = "ReLU/ReLU6-type activations only"
    #: called with the trace after the forward pass (post-forward consistency checks)
    finish: Callable[[RuleTrace], None] | None = None


@dataclass
class RuleTrace:
    """Which layer is running now, and which layers the rules touched (for tests and errors)."""

    method: str
    batch: int
    stack: list[tuple[str, nn.Module]] = field(default_factory=list)
    touched: Counter = field(default_factory=Counter)

    @property
    def layer(self) -> str:
        """The name of the layer running now ('' outside any)."""
        return self.stack[-1][0] if self.stack else ""

    @property
    def module(self) -> nn.Module | None:
        """The module running now, or None."""
        return self.stack[-1][1] if self.stack else None

    def where(self) -> str:
        """Where the forward is now, for an error message."""
        if not self.stack:
            return "outside the model"
        name, module = self.stack[-1]
        return f"layer {name or '<model>'!r} ({type(module).__name__})"

    def key(self, func: Callable) -> str:
        """Count key: the module path, plus the function name for functional calls."""
        if isinstance(self.module, LAYER_TYPES):
            return self.layer
        return f"{self.layer or '<model>'}:{func_name(func)}"

    def touch(self, func: Callable) -> None:
        """Count one call a rule handled in the current layer."""
        self.touched[self.key(func)] += 1

    def error(self, what: str) -> MethodError:
        """A MethodError naming the method and where the forward was."""
        return MethodError(f"{self.method}: {what} in {self.where()}")


class _Interceptor(TorchFunctionMode):
    def __init__(self, table: RuleTable, trace: RuleTrace) -> None:
        super().__init__()
        self.table = table
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.table.handlers.get(func)
        if handler is not None:
            return handler(self.trace, func, args, kwargs)
        if func in self.table.refused:
            raise self.trace.error(
                f"no rule for {func_name(func)} (rules exist for {self.table.supported})"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def apply_rules(model: nn.Module, table: RuleTable, method: str, batch: int) -> Iterator[RuleTrace]:
    """Run the forward pass inside with ``table``'s rules; hooks are removed on exit, always."""
    if isinstance(model, torch.jit.ScriptModule):
        raise MethodError(f"{method}: TorchScript models run outside Python; rules cannot apply")
    trace = RuleTrace(method=method, batch=batch)
    handles = []

    def push(name: str) -> Callable:
        def pre(module: nn.Module, _args: tuple) -> None:
            trace.stack.append((name, module))

        return pre

    def pop(_module: nn.Module, _args: tuple, _out: Any) -> None:
        if trace.stack:
            trace.stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop, always_call=True))
        with _Interceptor(table, trace):
            yield trace
    finally:
        for h in handles:
            h.remove()
    if table.finish is not None:
        table.finish(trace)


# -- activation rules (Guided Backprop, RectGrad) -----------------------------------------


def clamp_activation(x: Tensor, upper: float | None) -> Tensor:
    """ReLU (``upper=None``) or ReLU6-type clamp to ``[0, upper]``."""
    return torch.relu(x) if upper is None else x.clamp(0.0, upper)


def active(out: Tensor, upper: float | None) -> Tensor:
    """Where the ordinary activation derivative is 1: ``0 < z`` (and ``z < upper``)."""
    mask = out > 0
    return mask if upper is None else mask & (out < upper)


class GuidedClamp(torch.autograd.Function):
    """Guided Backprop: ``g_in = g * 1[0 < z < upper] * 1[g > 0]`` (ReLU: no upper bound).

    For ReLU6 the ordinary derivative is 0 above 6, so saturated units pass nothing (the
    ReLU6 derivative gated by the sign of the gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None) -> Tensor:
        out = clamp_activation(x, upper)
        ctx.upper = upper
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        # = where(active(out, upper) & (g > 0), g, 0) in two fused passes instead of six
        # (bench/methods_vs_peers.py: the rule was ~25% of Guided Backprop's time on Lite0)
        (out,) = ctx.saved_tensors
        positive = g.clamp(min=0)
        if ctx.upper is None:
            return torch.ops.aten.threshold_backward(positive, out, 0), None
        return torch.ops.aten.hardtanh_backward(positive, out, 0.0, float(ctx.upper)), None


def percentile_threshold(scores: Tensor, q: float) -> Tensor:
    """Per-sample ``q``-th percentile of ``scores[B, n]`` ('nearest' rank), shape ``[B, 1]``.

    ``torch.kthvalue`` per row (not ``torch.quantile``: it refuses >16M elements and
    interpolates); rank ``round(q/100 * (n-1))`` as TF's ``percentile(..., 'nearest')``.
    """
    n = scores.shape[1]
    k = min(n, max(1, math.floor(q / 100.0 * (n - 1) + 0.5) + 1))
    return torch.kthvalue(scores, k, dim=1, keepdim=True).values


class RectifiedClamp(torch.autograd.Function):
    """RectGrad: pass ``g`` where ``s = z_out * g > tau``, ``tau`` = per-sample percentile.

    ``s`` is the activation output times the incoming gradient; ``tau`` is the ``q``-th
    percentile of ``s`` over all units of this activation call for each sample (or the
    constant ``tau`` when given). The ordinary derivative is not applied (reference code),
    unless ``relu_mask``: then also ``0 < z < upper`` (differs only when ``tau < 0``, or for
    saturated ReLU6 units, which the reference lets through).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, upper: float | None, q: float, tau: float | None, relu_mask: bool
    ) -> Tensor:
        out = clamp_activation(x, upper)
        ctx.conf = (upper, q, tau, relu_mask)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (out,) = ctx.saved_tensors
        upper, q, tau, relu_mask = ctx.conf
        scores = (out.float() * g.float()).flatten(1)
        thr = percentile_threshold(scores, q) if tau is None else tau
        keep = (scores > thr).view_as(g)
        if relu_mask:
            keep = keep & active(out, upper)
        return torch.where(keep, g, torch.zeros_like(g)), None, None, None, None


def activation_handlers(
    rule: Callable[[Tensor, float | None], Tensor], *, per_sample: bool = False
) -> dict[Callable, Handler]:
    """Route every ReLU/ReLU6 call through ``rule(x, upper)``, keeping in-place semantics.

    ``per_sample``: the rule computes per-sample statistics over dim 0, so refuse an
    activation whose leading dimension is not the batch.
    """

    def handle(trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, lower, upper, inplace = ACTIVATIONS[func](*args, **kwargs)
        if lower != 0.0:
            raise trace.error(f"hardtanh({lower}, {upper}) is not a ReLU-type activation")
        if per_sample and (x.dim() < 2 or x.shape[0] != trace.batch):
            raise trace.error(
                f"activation of shape {tuple(x.shape)} does not lead with the batch ({trace.batch}); "
                "per-sample thresholds cannot be computed"
            )
        trace.touch(func)
        out = rule(x, upper)
        if inplace and type(trace.module) not in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
            x.copy_(out)  # a functional in-place call: its caller may keep using ``x``
            return x
        return out

    return dict.fromkeys(ACTIVATIONS, handle)


# -- convolutions: parsing, padding, the RectGrad padding trick -----------------------------


def conv_args(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
    padding: Any = 0, dilation: Any = 1, groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None, tuple, Any, tuple, int]:
    """``F.conv2d``'s arguments, with ``stride``/``dilation`` as pairs."""
    return input, weight, bias, _pair(stride), padding, _pair(dilation), int(groups)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    return v if len(v) == 2 else (v[0], v[0])


def explicit_padding(
    x: Tensor, weight: Tensor, padding: Any, dilation: tuple[int, int]
) -> tuple[Tensor, tuple[int, int]]:
    """Turn ``padding='same'|'valid'`` into numbers (padding ``x`` itself when asymmetric)."""
    if not isinstance(padding, str):
        return x, _pair(padding)
    if padding == "valid":
        return x, (0, 0)
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:])]
    left = [t // 2 for t in totals]
    if all(t % 2 == 0 for t in totals):
        return x, (left[0], left[1])
    pad = (left[1], totals[1] - left[1], left[0], totals[0] - left[0])
    return F.pad(x, pad), (0, 0)


def conv_is_padded(module: nn.Module | None, call_padding: Any, weight: Tensor) -> bool:
    """Whether a conv pads its input (the PyTorch counterpart of a TF ``SAME`` conv).

    Judged from the ``nn.Conv2d`` module when the call comes from one (its ``padding``, a
    zero-padding child such as EfficientNet's ``Conv2dStaticSamePadding.static_padding``, or
    a ``...DynamicSamePadding`` class with a kernel > 1); for a functional call, from the
    padding argument.
    """
    if isinstance(module, nn.Conv2d):
        pad = module.padding
        if isinstance(pad, str):
            return pad == "same" and any(k > 1 for k in module.kernel_size)
        if any(p > 0 for p in pad):
            return True
        for child in module.children():
            if isinstance(child, nn.ConstantPad2d | nn.ZeroPad2d) and any(child.padding):
                return True
        return type(module).__name__.endswith("DynamicSamePadding") and any(
            k > 1 for k in module.kernel_size
        )
    if isinstance(call_padding, str):
        return call_padding == "same" and any(k > 1 for k in weight.shape[-2:])
    return any(p > 0 for p in _pair(call_padding))


def zero_border(g: Tensor) -> Tensor:
    """``g`` with its outermost one-pixel ring (all channels) set to 0."""
    g = g.clone()
    g[..., 0, :] = 0
    g[..., -1, :] = 0
    g[..., :, 0] = 0
    g[..., :, -1] = 0
    return g


class PaddingTrickConv(torch.autograd.Function):
    """Ordinary conv; backward zeroes the border ring of the output gradient first (RectGrad)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: Any,
        dilation: tuple, groups: int,
    ) -> Tensor:
        ctx.conf = (stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(
            x.shape, weight.to(g.dtype), zero_border(g), *ctx.conf
        )
        return gx.to(x.dtype), None, None, None, None, None, None


def padding_trick_handlers(scope: str) -> dict[Callable, Handler]:
    """The padding trick on every conv (``"all"``) or on padded convs only (``"padded"``)."""

    def handle(trace: RuleTrace, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
        if scope == "padded" and not conv_is_padded(trace.module, padding, w):
            return func(*args, **kwargs)
        x, padding = explicit_padding(x, w, padding, dilation)
        trace.touch(func)
        return PaddingTrickConv.apply(x, w, b, stride, padding, dilation, groups)

    return {F.conv2d: handle}


# -- channel reductions and the method base -------------------------------------------------

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": lambda a: a.sum(dim=1),
    "max_abs": lambda a: a.abs().amax(dim=1),
    "positive_sum": lambda a: a.clamp(min=0).sum(dim=1),
}


def check_reduction(method: str, reduction: str) -> str:
    """``reduction`` if it is a known channel reduction, else a MethodError naming the choices."""
    if reduction not in REDUCTIONS:
        raise MethodError(
            f"{method}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}"
        )
    return reduction


class ModifiedBackprop(Method):
    """One forward under :meth:`rules`, one backward of the target logits to the input.

    ``attribute_channels`` returns the unreduced ``[B,C,H,W]`` attribution (the input
    gradient under the rules, times the input when ``times_input``); calling the method
    reduces it over channels with ``reduction``: ``"sum"`` (signed), ``"max_abs"``
    (``max_c |.|``) or ``"positive_sum"`` (sum of the positive parts).
    After each call ``last_trace.touched`` counts the calls each rule handled, per layer.
    """

    # one modified backward costs about an ordinary one
    work_per_image = staticmethod(lambda p: 1.0)
    no_rule = RELU_NETS_ONLY
    no_rule_why = ("backward rules for ReLU convolutional networks only: none for GELU / "
                   "SiLU-type activations, hardswish, LayerNorm or attention")
    times_input: ClassVar[bool] = False
    reduction: str = "sum"
    last_trace: RuleTrace | None = None

    @abc.abstractmethod
    def rules(self) -> RuleTable:
        """A fresh rule table for one forward pass (per-call state lives in it)."""

    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map: the channel attribution reduced with ``reduction``."""
        return REDUCTIONS[self.reduction](self.channels(images, targets))

    def attribute_channels(self, images: Tensor, targets: Tensor | list[int]) -> Tensor:
        """The unreduced float32 attribution ``[B,C,H,W]``, with the guards of ``__call__``."""
        images, targets = check_inputs(images, targets)
        with model_guard(self.model), torch.enable_grad():
            return self.channels(images, targets).detach().float()

    def channels(self, images: Tensor, targets: Tensor) -> Tensor:
        """Input gradient of the target logits under the rules (times the input with
        ``times_input``), ``[B,C,H,W]``."""
        x = images.detach().requires_grad_(True)
        with apply_rules(self.model, self.rules(), self.name, x.shape[0]) as trace:
            logits = self.forward(x)
        self.last_trace = trace
        (grad,) = torch.autograd.grad(target_scores(logits, targets).sum(), x)
        grad = grad.float()
        return grad * images.detach().float() if self.times_input else grad

