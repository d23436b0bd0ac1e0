"""Cost per image of a label map with and without the dense-CRF refinement (pseudo_labels.crf).

A real photo (scikit-image's astronaut) resized to each size, k smooth class-score maps (a
Grad-CAM-like blob per class), the label map by thresholds alone and refined by the CRF with
either unary. CPU time of this process (the CRF is single-threaded) and wall time per image,
median of ``--repeat`` runs. Needs ``pip install 'salmap[crf]'``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
from PIL import Image


def scene(w: int, h: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    import skimage.data as data

    img = np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR))
    yy, xx = np.mgrid[0:h, 0:w]
    scores = []
    for j in range(k):
        cx, cy = w * (0.3 + 0.4 * j / max(k - 1, 1)), h * (0.4 + 0.2 * j / max(k - 1, 1))
        scores.append(np.exp(-(((xx - cx) / (0.25 * w)) ** 2 + ((yy - cy) / (0.3 * h)) ** 2)))
    return img, np.stack(scores).astype(np.float32)


def timed(fn, repeat: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    from salmap.workers.metrics.crf import crf_label_map
    from salmap.workers.metrics.label_maps import label_map

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="500x375,1024x768,2048x1536")
    p.add_argument("--classes", default="1,3")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print("| image | classes | thresholds only (CPU s) | CRF, unary labels (CPU s) | "
          "CRF, unary scores (CPU s) | CRF per megapixel (CPU s) | CRF wall s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for k in (int(v) for v in args.classes.split(",")):
            img, scores = scene(w, h, k)
            classes = list(range(k))
            plain, _ = timed(partial(label_map, scores, classes, 0.3, 0.05), args.repeat)
            crf_l, wall = timed(partial(crf_label_map, img, scores, classes, 0.3, 0.05),
                                args.repeat)
            crf_s, _ = timed(partial(crf_label_map, img, scores, classes, 0.3, 0.05,
                                     unary="scores"), args.repeat)
            print(f"| {w}x{h} | {k} | {plain:.3f} | {crf_l:.2f} | {crf_s:.2f} | "
                  f"{crf_l / (w * h / 1e6):.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
