"""Shared machinery of the CAM family: capture the target layer, backpropagate to it, combine.

The CAM methods differ only in how they weigh the target layer's channels, so each of them
subclasses :class:`CAMMethod` and implements :meth:`CAMMethod.weights`. Maps come back at the
target layer's native resolution ``[B, u, v]`` (a transformer's patch grid: 14x14 for ViT-B/16
at 224 px), raw (no upsampling, no min-max scaling): the pipeline upsamples and scales them
afterwards. Token and channels-last outputs become ``[B, K, u, v]`` grids by
:mod:`salmap.workers.methods.reshape`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FORWARD, Method, target_scores
from .errors import MethodError
from .layers import capture_output, resolve_layer
from .reshape import channels_last_default, check_reshape, to_grid


class CAMMethod(Method):
    """A map ``ReLU(sum_k w_k * A_k)`` from the target layer's activations ``A[B,K,u,v]``.

    ``w`` is ``[B, K]`` (one weight per channel) or ``[B, K, u, v]`` (one per position).
    Gradients flow only from the target logit down to the target layer (the capture cuts the
    graph there), so the input never requires grad and nothing below the layer is touched.
    ``reshape`` (``None``/"auto", "nchw", "nhwc", "tokens"): the target layer's output layout,
    see :mod:`salmap.workers.methods.reshape`.
    """

    uses_target_layer = True
    # a forward and a backward that stops at the target layer (~ a forward)
    work_per_image = staticmethod(lambda p: FORWARD)

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None,
                 reshape: str | None = None) -> None:
        super().__init__(model)
        self.target_layer_name, self.target_layer = resolve_layer(model, target_layer)
        self.reshape = check_reshape(reshape)
        self._prefer_nhwc = channels_last_default(model)
        self._calls_per_forward: int | None = None  # the target layer's calls per forward

    # -- what each method supplies ------------------------------------------------------
    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Channel weights ``[B,K]`` or element-wise weights ``[B,K,u,v]`` (float32)."""
        raise NotImplementedError

    # -- shared steps -------------------------------------------------------------------
    def attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        """The map ``ReLU(sum_k w_k A_k)`` at the target layer's resolution."""
        acts, grads = self.activations_and_gradients(images, targets)
        return combine(self.weights(acts, grads), acts)

    def layer_forward(self, x: Tensor, *, cut_graph: bool) -> tuple[Tensor, Tensor]:
        """Forward ``x``; return ``(logits, the target layer's last output as [B,K,u,v])``."""
        logits, act = self._forward_capture(x, cut_graph=cut_graph)
        return logits, self.grid(act, x)

    def grid(self, out: Tensor, x: Tensor) -> Tensor:
        """The target layer's output (or the gradient there) for input ``x`` as ``[B,K,u,v]``."""
        return to_grid(out, self.reshape, batch=x.shape[0], size=tuple(x.shape[-2:]),
                       prefer_nhwc=self._prefer_nhwc,
                       where=f"{self.name}: target layer {self.target_layer_name!r}")

    def _forward_capture(self, x: Tensor, *, cut_graph: bool) -> tuple[Tensor, Tensor]:
        """Forward ``x``; return ``(logits, the target layer's last output as it is)``.

        The rest of the network runs on a copy of the captured output, so an in-place
        operation right after the layer (``ReLU(inplace=True)`` after a conv, ``+=``) cannot
        alter the captured activation or break the cut graph. Raises :class:`MethodError`
        naming the layer when it is never called or does not output a tensor.
        """

        def shield(_m: nn.Module, _i: tuple, out: Tensor) -> Tensor | None:
            return out.clone() if isinstance(out, Tensor) else None

        def run(cut_call: int | None):
            with capture_output(self.target_layer, cut_graph=cut_graph, cut_call=cut_call) as cap:
                # registered after the capture's hook, so it copies the captured tensor
                handle = self.target_layer.register_forward_hook(shield)
                try:
                    logits = self.forward(x)
                finally:
                    handle.remove()
            return logits, cap

        # a re-used layer is cut at its last call only: count its calls once, on one sample
        # without a graph (a fraction of one forward, paid on the first batch only)
        if cut_graph and self._calls_per_forward is None:
            with torch.no_grad(), capture_output(self.target_layer) as probe:
                self.forward(x[:1])
            self._calls_per_forward = probe.calls
        logits, cap = run(self._calls_per_forward if cut_graph else None)
        if cut_graph and cap.calls != self._calls_per_forward:  # the count depends on the input
            logits, cap = run(None)
            self._calls_per_forward = cap.calls
        act = cap.activation
        if act is None:
            raise MethodError(
                f"{self.name}: target layer {self.target_layer_name!r} was not called in the "
                "forward pass"
            )
        return logits, act

    def activations_and_gradients(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``A`` and ``dS_t/dA`` at the target layer, both float32 ``[B,K,u,v]``, detached.

        The backward is seeded with the sum of each sample's own target logit, so the
        samples of a batch stay independent (eval mode). The gradient is taken at the layer's
        own output and laid out on the grid the same way as the activation.
        """
        images = images.detach()
        logits, act = self._forward_capture(images, cut_graph=True)
        grid = self.grid(act, images)  # validates the layout before the backward
        score = target_scores(logits, targets).sum()
        if not score.requires_grad:
            raise MethodError(
                f"{self.name}: the logits do not depend on target layer {self.target_layer_name!r}"
            )
        (grad,) = torch.autograd.grad(score, act, allow_unused=True)
        if grad is None:
            raise MethodError(
                f"{self.name}: the logits do not depend on the last call of target layer "
                f"{self.target_layer_name!r}"
            )
        return grid.detach().float(), self.grid(grad, images).detach().float()


def combine(weights: Tensor, acts: Tensor) -> Tensor:
    """``ReLU(sum_k w_k A_k)`` for channel weights ``[B,K]`` or element weights ``[B,K,u,v]``."""
    if weights.dim() == 2:
        weights = weights[:, :, None, None]
    return torch.relu((weights * acts).sum(dim=1))
