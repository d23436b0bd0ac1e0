"""The four skimage photos the method scripts run on, preprocessed for EfficientNet-Lite0."""

from __future__ import annotations

import torch


def photos(lite) -> torch.Tensor:
    """chelsea, coffee, astronaut, rocket: resized (shorter side to ``resize``), centre-cropped
    and normalised with ``lite.preprocess``; [4, 3, crop, crop]."""
    import numpy as np
    import skimage.data as data
    from PIL import Image

    p = lite.preprocess
    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        s = p.resize / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
        w, h = img.size
        left, top = (w - p.crop) // 2, (h - p.crop) // 2
        img = img.crop((left, top, left + p.crop, top + p.crop))
        t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        out.append((t - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1))
    return torch.stack(out)
