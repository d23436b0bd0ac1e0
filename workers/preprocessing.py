"""A model's preprocessing (crop, resize, mean, std) without building the model.

The driver needs the geometry to plan the decode stage; building a ViT-H or downloading its
weights on the driver just to read four numbers would be waste. Must agree with
:func:`salmap.workers.models.load_model` (tested).
"""

from __future__ import annotations

from .models import LITE_MEAN, LITE_STD, ModelError, Preprocess


def preprocess_of(source: str, weights: str | None = None, input_size: int | None = None,
                  mean=None, std=None) -> Preprocess:
    """The :class:`Preprocess` that :func:`~salmap.workers.models.load_model` would return."""
    pre = Preprocess()
    if source.startswith("torchvision:") and weights not in (None, "none", "None", ""):
        import torchvision.models as tvm

        arch = source.split(":", 1)[1]
        try:
            enum = tvm.get_model_weights(arch)
            w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        except (KeyError, ValueError) as err:
            raise ModelError(f"unknown weights {weights!r} for {arch}") from err
        tf = w.transforms()  # reads the enum's metadata; downloads nothing
        pre = Preprocess(crop=int(tf.crop_size[0]), resize=int(tf.resize_size[0]),
                         mean=tuple(tf.mean), std=tuple(tf.std))
    elif source in ("efficientnet_lite0", "efficientnet-lite0"):
        pre = Preprocess(crop=224, resize=256, mean=LITE_MEAN, std=LITE_STD)
    if input_size:
        pre = Preprocess(crop=int(input_size),
                         resize=int(round(input_size * pre.resize / pre.crop)),
                         mean=pre.mean, std=pre.std)
    if mean is not None or std is not None:
        pre = Preprocess(crop=pre.crop, resize=pre.resize, mean=tuple(mean or pre.mean),
                         std=tuple(std or pre.std))
    return pre
