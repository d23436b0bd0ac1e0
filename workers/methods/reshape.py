"""A target layer's output as a feature grid ``[B, K, u, v]``, whatever its layout.

CAM methods weigh the channels of a spatial feature map. Convolutional layers give one
(``[B, K, u, v]``, "nchw"); transformers do not: a ViT block gives tokens ``[B, T, K]`` with a
class token (and possibly distillation or register tokens) before the ``u*v`` patch tokens
("tokens"), and Swin keeps its feature maps channels-last ``[B, u, v, K]`` ("nhwc").

``reshape`` (a model config key, and a CAM method parameter) names the layout:

* ``"nchw"``: the output is already ``[B, K, u, v]``;
* ``"nhwc"``: channels-last ``[B, u, v, K]``, permuted;
* ``"tokens"``: ``[B, T, K]`` (or sequence-first ``[T, B, K]``); the leading ``T - u*v``
  tokens are dropped (the fewest that leave a grid with the input's aspect ratio: 1 for
  ViT's class token, 197 -> 14x14 at 224 px) and the rest are laid out row by row;
* ``None`` / ``"auto"`` (default): 3-d outputs are tokens; 4-d ones are "nchw" or "nhwc",
  whichever puts a grid with the input's aspect ratio on the spatial axes (a square crop:
  the two equal axes), the architecture deciding a tie (Swin: "nhwc", else "nchw").

The conversions are views and a slice of the captured tensor, so the same function turns the
gradient at the layer into the gradient on the grid (the dropped tokens' gradients are
discarded, as pytorch-grad-cam's ``reshape_transform`` does).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .errors import MethodError

RESHAPES = ("auto", "nchw", "nhwc", "tokens")
#: most leading tokens dropped in "tokens" mode (class + distillation + register tokens)
MAX_PREFIX_TOKENS = 16


def check_reshape(reshape: str | None) -> str:
    """The canonical reshape name (``None`` -> ``"auto"``); a clear error for anything else."""
    value = "auto" if reshape in (None, "", "auto") else reshape
    if value not in RESHAPES:
        raise MethodError(
            f"reshape must be one of {', '.join(RESHAPES)} (or null), got {reshape!r}"
        )
    return value


def channels_last_default(model: nn.Module) -> bool:
    """Whether the architecture keeps its feature maps channels-last (Swin), for ties."""
    return type(model).__name__.startswith("SwinTransformer")


def _aspect_error(rows: int, cols: int, size: tuple[int, int]) -> float:
    """How far a ``rows x cols`` grid is from the input's aspect ratio (0: the same)."""
    if rows < 1 or cols < 1:
        return math.inf
    return abs(math.log(rows / cols) - math.log(size[0] / size[1]))


def spatial_layout(shape: tuple[int, ...], size: tuple[int, int], prefer_nhwc: bool) -> str:
    """"nchw" or "nhwc" for a 4-d output ``shape`` of an input of ``size`` (H, W)."""
    _, a, b, c = shape
    nchw, nhwc = _aspect_error(b, c, size), _aspect_error(a, b, size)
    if nchw == nhwc:
        return "nhwc" if prefer_nhwc else "nchw"
    return "nchw" if nchw < nhwc else "nhwc"


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """``(prefix, u, v)``: the fewest leading tokens to drop so that ``u*v`` tokens remain
    with ``u / v`` the input's aspect ratio (exact for square inputs, nearest otherwise)."""
    h, w = size
    for prefix in range(min(tokens, MAX_PREFIX_TOKENS + 1)):
        n = tokens - prefix
        v = max(1, round(math.sqrt(n * w / h)))
        u = n // v
        if u * v == n and u == round(v * h / w):
            return prefix, u, v
    raise MethodError(
        f"{tokens} tokens cannot be laid out as a grid with the input's {h}x{w} aspect ratio "
        f"after dropping at most {MAX_PREFIX_TOKENS} leading tokens"
    )


def to_grid(out: Tensor, reshape: str, *, batch: int, size: tuple[int, int],
            prefer_nhwc: bool = False, where: str = "target layer") -> Tensor:
    """``out`` (a layer's output, or the gradient there) as ``[B, K, u, v]``.

    ``batch`` and ``size`` (the input's H, W) disambiguate layouts; ``where`` names the layer
    in errors. The result is a view of ``out`` (a slice for tokens), never a copy.
    """
    shape = tuple(out.shape)
    mode = reshape
    if mode == "auto":
        if out.dim() == 3:
            mode = "tokens"
        elif out.dim() == 4:
            mode = spatial_layout(shape, size, prefer_nhwc)
    if mode in ("nchw", "nhwc"):
        if out.dim() != 4 or shape[0] != batch:
            hint = "; a [B, T, K] token output needs reshape: tokens" if out.dim() == 3 else ""
            raise MethodError(
                f"{where} outputs shape {shape}; reshape {mode!r} needs a [B, K, u, v] / "
                f"[B, u, v, K] feature map{hint}"
            )
        return out if mode == "nchw" else out.permute(0, 3, 1, 2)
    if mode == "tokens":
        if out.dim() == 3 and shape[0] != batch and shape[1] == batch:
            out = out.transpose(0, 1)  # sequence-first [T, B, K]
        if out.dim() != 3 or out.shape[0] != batch:
            raise MethodError(
                f"{where} outputs shape {shape}; reshape 'tokens' needs [B, T, K] tokens"
            )
        prefix, u, v = token_grid(out.shape[1], size)
        return out[:, prefix:].unflatten(1, (u, v)).permute(0, 3, 1, 2)
    raise MethodError(
        f"{where} outputs shape {shape}; CAM methods need a [B, K, u, v] feature map, "
        "[B, u, v, K] (reshape: nhwc) or [B, T, K] tokens (reshape: tokens)"
    )
