"""Decode JPEGs, resize and crop on the actor's device (``resources.decode_device``).

``torchvision.io.decode_jpeg`` runs on nvJPEG with ``device="cuda"`` and on libjpeg-turbo on
a CPU (the fallback, and what the tests run). The geometry is the CPU path's
(:func:`salmap.pipeline.decode.crop_geometry`): resize the original to ``resized_h x resized_w``
(bilinear, antialiased when shrinking), crop ``crop_h x crop_w`` at ``(crop_top,
crop_left)``. The CPU path resamples the crop window straight from the original with Pillow,
so the pixels differ by rounding (a few grey levels), the geometry not at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def decode_to_input(blob: bytes, geo: dict[str, int], device: torch.device) -> torch.Tensor:
    """One JPEG -> ``uint8 [3, crop_h, crop_w]`` on ``device``. Raises on corrupt data."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    img = decode_jpeg(data, mode=ImageReadMode.RGB,
                      device=device if device.type == "cuda" else "cpu").to(device)
    h, w = int(geo["resized_h"]), int(geo["resized_w"])
    shrink = h < img.shape[1] or w < img.shape[2]
    x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                      antialias=shrink)[0]
    top, left = int(geo["crop_top"]), int(geo["crop_left"])
    x = x[:, top:top + int(geo["crop_h"]), left:left + int(geo["crop_w"])]
    return x.round_().clamp_(0, 255).to(torch.uint8)


GEO = ("resized_h", "resized_w", "crop_top", "crop_left", "crop_h", "crop_w")


def decode_rows(batch: dict[str, np.ndarray], device: torch.device
                ) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """The rows whose ``jpeg`` is set: decoded inputs by row, and the reason for each row the
    device could not decode."""
    images: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    if "jpeg" not in batch:
        return images, errors
    for i, blob in enumerate(batch["jpeg"]):
        if not len(blob) or batch["status"][i] != "ok":
            continue
        try:
            images[i] = decode_to_input(bytes(blob), {k: int(batch[k][i]) for k in GEO}, device)
        except Exception as err:  # noqa: BLE001 - one bad image never fails the batch
            errors[i] = f"image data is truncated or corrupt ({type(err).__name__}: {err}); " \
                        "re-export the file"
    return images, errors
