"""The embedded demo dataset: real photos bundled in scikit-image, written as WebDataset shards.

Labels are ImageNet class indices; boxes (original pixels) were drawn by hand for the photos
that show an ImageNet object, so the pointing game and box IoU have something to score.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np
from PIL import Image

# name: (how to get the array, ImageNet class, boxes [x0, y0, x1, y1] with their classes)
PHOTOS: dict[str, tuple[str, int, list[tuple[list[float], int]]]] = {
    "chelsea": ("chelsea", 285, [([20, 0, 420, 300], 285)]),  # Egyptian cat
    "coffee": ("coffee", 967, [([60, 10, 500, 390], 967)]),  # espresso
    "astronaut": ("astronaut", 834, [([20, 0, 400, 512], 834), ([395, 0, 470, 290], 812)]),  # suit, shuttle
    "rocket": ("rocket", 657, [([295, 125, 345, 425], 657)]),  # missile
    "motorcycle": ("stereo_motorcycle", 670, [([120, 75, 690, 460], 670)]),  # motor scooter
    "clock": ("clock", 409, []),  # analog clock (grayscale photo)
    "camera": ("camera", 759, []),  # reflex camera (grayscale photo)
    "horse": ("horse", 339, []),  # sorrel (a binary silhouette: an odd image on purpose)
}

DEMO_URI = "demo://photos"


def _photo(loader: str) -> np.ndarray:
    import skimage.data as data

    arr = getattr(data, loader)()
    if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
        arr = arr[0]
    if arr.dtype == bool:
        arr = np.where(arr, 0, 255).astype(np.uint8)
    return arr


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_demo_shards(folder: str, per_shard: int = 4, names: list[str] | None = None) -> list[str]:
    """Write the demo photos as ``demo-000000.tar, ...`` plus ``shards.json``; return the paths."""
    os.makedirs(folder, exist_ok=True)
    items = [(k, v) for k, v in PHOTOS.items() if names is None or k in names]
    paths, counts = [], {}
    for s in range(0, len(items), per_shard):
        path = os.path.join(folder, f"demo-{s // per_shard:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            for name, (loader, label, boxes) in items[s:s + per_shard]:
                buf = io.BytesIO()
                Image.fromarray(_photo(loader)).save(buf, format="JPEG", quality=92)
                _add(tar, f"{name}.jpg", buf.getvalue())
                _add(tar, f"{name}.cls", str(label).encode())
                if boxes:
                    ann = {"boxes": [b for b, _ in boxes], "labels": [c for _, c in boxes]}
                    _add(tar, f"{name}.json", json.dumps(ann).encode())
        os.replace(tmp, path)
        paths.append(path)
        counts[os.path.basename(path)[:-4]] = len(items[s:s + per_shard])
    with open(os.path.join(folder, "shards.json"), "w") as f:
        json.dump({"samples": counts, "created": time.time()}, f)
    return paths


def demo_folder() -> str:
    """Where the demo's shards are made: ``$SALMAP_DEMO_DATA`` or ``runs/demo-data``."""
    return os.environ.get("SALMAP_DEMO_DATA", os.path.join("runs", "demo-data"))


def ensure_demo_shards() -> list[str]:
    """Build the demo shards on first use; return their paths."""
    folder = demo_folder()
    index = os.path.join(folder, "shards.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(json.load(f)["samples"])
        paths = [os.path.join(folder, f"{n}.tar") for n in names]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return write_demo_shards(folder)
