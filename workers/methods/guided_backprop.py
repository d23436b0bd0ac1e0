"""Guided Backpropagation (Springenberg et al. 2015): gradient through "guided" ReLUs.

Cost per image: 1 forward + 1 modified backward to the input.
Defaults and their sources: no hyperparameters (Springenberg et al. 2015 ReLU rule, jacobgil GuidedBackpropReLUasModule); reduction max_c|.|.
"""

from __future__ import annotations

from torch import nn

from .backprop_rules import (
    GuidedClamp,
    ModifiedBackprop,
    RuleTable,
    activation_handlers,
    check_reduction,
)
from .registry import register


@register("guided_backprop")
class GuidedBackprop(ModifiedBackprop):
    """Input gradient where every ReLU-type activation passes ``g * 1[z > 0] * 1[g > 0]``.

    * Rule on every ``nn.ReLU``/``nn.ReLU6`` module call and every functional ``relu``/
      ``relu6``/``hardtanh(0, u)`` call, re-used modules included. ReLU6: the ordinary
      derivative is kept, so units saturated above 6 pass nothing (``1[0 < z < 6]``).
      Max-pool, BN, residual adds, linear layers: ordinary gradients. Smooth activations
      (SiLU, GELU, sigmoid, ...) have no guided rule here and raise ``MethodError``.
    * Map: ``reduction="max_abs"`` (default, ``max_c |g_c|``, as jacobgil's and most
      displays), or ``"sum"`` / ``"positive_sum"`` over the colour channels of ``g``.
      ``attribute_channels`` returns the raw ``[B,3,H,W]`` gradient. Returns ``[B,H,W]``.
    """

    cost = "1 forward + 1 modified backward to the input"
    defaults_source = (
        "Springenberg et al. 2015 ReLU rule; no hyperparameters; reduction max_c|.| "
        "(jacobgil pytorch-grad-cam guided_backprop display, Simonyan et al. 2014)"
    )

    def __init__(self, model: nn.Module, reduction: str = "max_abs") -> None:
        super().__init__(model)
        self.reduction = check_reduction(self.name, reduction)

    def rules(self) -> RuleTable:
        """The guided ReLU rule on every activation."""
        return RuleTable(handlers=activation_handlers(GuidedClamp.apply))
