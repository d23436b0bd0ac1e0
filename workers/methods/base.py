"""The contract every saliency method follows, and the guards that keep a model untouched."""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .compat import check_model
from .errors import MethodError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: one forward pass in the unit of :attr:`Method.work_per_image` (one forward + one backward;
#: a backward costs about two forwards)
FORWARD = 1.0 / 3.0


class Method(abc.ABC):
    """A saliency method bound to one model.

    Call it as ``method(images[B,3,H,W], targets[B]) -> maps[B,h,w]``: float32 raw values on
    the images' device, one map per sample for that sample's own target class. Subclasses
    implement :meth:`attribute`; the base class puts the model in eval mode with frozen
    parameters for the duration of the call and restores it afterwards, even on error.

    Common options every method accepts (set by :func:`salmap.workers.methods.build`):
    ``precision`` (fp32 | bf16 | fp16, autocast of the forward passes only) and
    ``inner_batch_size`` (the most images an iterative method puts through one forward).

    ``progress``, when set, is called with the fraction (0..1) of the current call done by
    the method's main loops (:meth:`track`, ``chunks(n, track=True)``); the model actor sets
    it to tell the driver how far a long batch is.
    """

    #: the registry name, set by ``@register(name)`` (:mod:`.registry`)
    name: ClassVar[str] = ""
    #: forward/backward passes per image, for the docs and the benchmarks
    cost: ClassVar[str] = ""
    #: expected work per image and target in forward+backward units (see :data:`FORWARD`),
    #: from the resolved parameters: what the driver shares devices by (:mod:`.cost`)
    work_per_image: ClassVar[Callable[[dict[str, Any]], float] | None] = None
    #: True for methods that read a target layer (CAM family)
    uses_target_layer: ClassVar[bool] = False
    #: where each default comes from, for the docs
    defaults_source: ClassVar[str] = ""
    #: model features (:mod:`.features`) the method has no rule for: it refuses models that
    #: have them (:mod:`.compat`); empty: it runs on every family
    no_rule: ClassVar[frozenset[str]] = frozenset()
    #: why it has no rule for them
    no_rule_why: ClassVar[str] = ""

    precision: str = "fp32"
    inner_batch_size: int = 64
    progress: Callable[[float], None] | None = None

    def __init__(self, model: nn.Module) -> None:
        check_model(self.name, model)  # a method without rules for this model fails here
        self.model = model

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The constructor's defaults (name -> value), read from its signature, so the docs
        and the cost estimate follow a changed default."""
        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty}

    def __call__(self, images: Tensor, targets: Tensor | list[int]) -> Tensor:
        images, targets = check_inputs(images, targets)
        self._spans: list[tuple[float, float]] = []
        with model_guard(self.model), torch.enable_grad():
            maps = self.attribute(images, targets)
        if maps.shape[0] != images.shape[0] or maps.dim() != 3:
            raise MethodError(
                f"{self.name}: produced maps of shape {tuple(maps.shape)}, expected [B, h, w]"
            )
        return maps.detach().float()

    @abc.abstractmethod
    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """Return maps[B,h,w] for ``images`` (already on device) and ``targets`` (int64)."""

    # -- helpers for subclasses ---------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Run the model on ``x`` under the configured autocast; logits come back float32."""
        dtype = PRECISIONS.get(self.precision)
        if dtype is None:
            return self.model(x).float()
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = self.model(x)
        return out.float()

    def chunks(self, n: int, track: bool = False) -> Iterator[slice]:
        """Slices of ``range(n)`` no longer than ``inner_batch_size``; ``track=True`` for the
        method's main loop: it then reports progress like :meth:`track`."""
        step = max(1, int(self.inner_batch_size))
        starts = range(0, n, step)
        for i in (self.track(len(starts)) if track else range(len(starts))):
            yield slice(starts[i], min(n, starts[i] + step))

    def _span(self) -> tuple[float, float]:
        spans = self.__dict__.setdefault("_spans", [])
        return spans[-1] if spans else (0.0, 1.0)

    def track(self, n: int) -> Iterator[int]:
        """``range(n)`` that reports the call's progress after each step; a tracked loop
        inside another one's step divides that step."""
        lo, hi = self._span()
        spans = self.__dict__.setdefault("_spans", [])
        for i in range(n):
            end = lo + (hi - lo) * (i + 1) / n
            spans.append((lo + (hi - lo) * i / n, end))
            try:
                yield i
            finally:
                spans.pop()
            if self.progress is not None:
                self.progress(end)

    @contextlib.contextmanager
    def part(self, start: float, stop: float) -> Iterator[None]:
        """Inside: the ``[start, stop)`` fraction of the current step, for sequential phases
        of one step that each have their own tracked loop."""
        lo, hi = self._span()
        spans = self.__dict__.setdefault("_spans", [])
        spans.append((lo + (hi - lo) * start, lo + (hi - lo) * stop))
        try:
            yield
        finally:
            spans.pop()


def check_inputs(images: Tensor, targets: Tensor | list[int]) -> tuple[Tensor, Tensor]:
    """Validate shapes; return targets as int64 on the images' device."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise MethodError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.shape[0] != images.shape[0]:
        raise MethodError(
            f"got {images.shape[0]} images but {targets.shape[0]} targets: one target per image"
        )
    return images, targets


def target_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """Each sample's logit for its own target class, shape [B]."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


@dataclass
class _ModelState:
    training: bool
    requires_grad: list[tuple[nn.Parameter, bool]]
    hooks: int


def _count_hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return n


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside; the exact previous state restored on exit."""
    state = _ModelState(
        training=model.training,
        requires_grad=[(p, p.requires_grad) for p in model.parameters()],
        hooks=_count_hooks(model),
    )
    model.eval()
    for p, _ in state.requires_grad:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in state.requires_grad:
            p.requires_grad_(flag)
        model.train(state.training)
    leftover = _count_hooks(model) - state.hooks
    if leftover:
        raise RuntimeError(f"internal error: {leftover} hook(s) left on the model after a method")


def describe(method: Method | type[Method]) -> dict[str, Any]:
    """Name, cost and defaults source, for docs and manifests."""
    return {
        "name": method.name,
        "cost": method.cost,
        "uses_target_layer": method.uses_target_layer,
        "defaults_source": method.defaults_source,
    }
