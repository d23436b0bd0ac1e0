"""RectGrad (Kim et al. 2019): gradient thresholded per layer by activation x gradient.

Cost per image: 1 forward + 1 modified backward (+ one per-sample k-th value per activation call).
Defaults and their sources: q=98 per sample and layer, strict >, padding trick on padded (SAME) convs, times input (1202kbs/Rectified-Gradient methods.py RectifiedGradient); signed channel sum (utils.preprocess).
"""

from __future__ import annotations

from torch import Tensor, nn

from .backprop_rules import (
    ModifiedBackprop,
    RectifiedClamp,
    RuleTable,
    activation_handlers,
    check_reduction,
    padding_trick_handlers,
)
from .errors import MethodError
from .registry import register

PADDING_TRICK_SCOPES = ("padded", "all", "none")


@register("rectgrad")
class RectGrad(ModifiedBackprop):
    """Rectified gradient times the input, ``A = g_x * x`` (1202kbs/Rectified-Gradient).

    * Activation rule at every ReLU/ReLU6 call (module or functional): with ``a`` the
      activation output and ``g`` the gradient arriving there, pass ``g`` only where
      ``a * g > tau`` (strict). ``tau`` is the ``q``-th percentile (default 98, 'nearest'
      rank via ``torch.kthvalue``) of ``a * g`` over all units of that call, per sample;
      or the constant ``tau`` when given (the reference's ``RectifiedGradientConst``;
      ``tau=0`` is Guided Backprop). The ordinary derivative is not applied (reference), so
      saturated ReLU6 units let the gradient through; ``and_relu_mask=True`` multiplies it
      in (changes results only for ``tau < 0`` or saturated ReLU6 units).
    * ReLU6 nets (MobileNetV2, EfficientNet-Lite): the reference has ReLU only; here a ReLU6
      call is scored like a ReLU (``a * g`` with ``a`` the clamped output, the same per-sample
      percentile), so a unit saturated at 6 counts with ``a = 6`` and passes its gradient
      when that score is in the top ``100 - q`` %. On EfficientNet-Lite0 photos saturated
      units occur and some pass (tests/test_methods_backprop.py); Guided Backprop, which
      keeps the ReLU6 derivative, passes none of them.
    * Padding trick: the gradient arriving at a conv output has its one-pixel border ring
      zeroed before the conv backward. ``padding_trick="padded"`` (default; convs that pad
      their input, PyTorch's counterpart of TF ``SAME``, including EfficientNet's
      ``Conv2dStaticSamePadding``), ``"all"`` (every conv, 1x1 included, as TF-slim where
      all convs are ``SAME``) or ``"none"``. Note: maps of 2x2 px or smaller are then
      zeroed entirely (small inputs give all-zero maps, as in the reference).
    * Everything else (max-pool, BN, adds, linear): ordinary gradients. Smooth activations
      raise ``MethodError``.
    * Map: ``reduction="sum"`` (default, signed channel sum: the reference ``preprocess``),
      ``"positive_sum"`` (the reference's quantitative use) or ``"max_abs"``. ``x`` is the
      normalised model input, so the map is 0 where ``x = 0`` (the mean colour).
      Returns ``[B,H,W]``; no percentile clipping (display only).
    """

    # the k-th value per activation call adds about a fifth of a backward (measured order)
    work_per_image = staticmethod(lambda p: 1.2)
    cost = "1 forward + 1 modified backward (+1 per-sample k-th value per activation call)"
    defaults_source = (
        "1202kbs/Rectified-Gradient deepexplain/tensorflow/methods.py RectifiedGradient: "
        "percentile=98 per sample and layer, strict >, padding trick on SAME convs, x input; "
        "signed channel sum (utils.preprocess)"
    )
    times_input = True

    def __init__(
        self,
        model: nn.Module,
        q: float = 98.0,
        tau: float | None = None,
        padding_trick: str = "padded",
        and_relu_mask: bool = False,
        reduction: str = "sum",
    ) -> None:
        super().__init__(model)
        if not 0.0 <= float(q) <= 100.0:
            raise MethodError(f"{self.name}: q must be a percentile in [0, 100], got {q}")
        if padding_trick not in PADDING_TRICK_SCOPES:
            raise MethodError(
                f"{self.name}: padding_trick must be one of {', '.join(PADDING_TRICK_SCOPES)}, "
                f"got {padding_trick!r}"
            )
        self.q = float(q)
        self.tau = None if tau is None else float(tau)
        self.padding_trick = padding_trick
        self.and_relu_mask = bool(and_relu_mask)
        self.reduction = check_reduction(self.name, reduction)

    def _rule(self, x: Tensor, upper: float | None) -> Tensor:
        return RectifiedClamp.apply(x, upper, self.q, self.tau, self.and_relu_mask)

    def rules(self) -> RuleTable:
        """The rectified rule on every activation, plus the padding trick's conv rule where asked."""
        handlers = activation_handlers(self._rule, per_sample=self.tau is None)
        if self.padding_trick != "none":
            handlers.update(padding_trick_handlers(self.padding_trick))
        return RuleTable(handlers=handlers)
