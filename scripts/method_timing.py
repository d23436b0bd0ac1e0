"""Print each method's time per image: pretrained EfficientNet-Lite0, 224 px, batch of 4 real
photos, default parameters, CPU, one torch thread (the machine's 2 cores are shared).

    .venv/bin/python scripts/method_timing.py

Exact where cheap; extrapolated (and labelled so) for the costly ones: DMBP and HDM are timed
at two step counts and the per-step time is scaled to the default steps; Score-CAM is timed on
one image with the first 128 of the 1280 head channels and scaled to all channels (its cost is
one masked forward per channel and image).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lite0_photos import photos  # noqa: E402
from salmap.workers.methods import build, names  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    torch.set_num_threads(1)
    from salmap.workers.models import load_model

    lite = load_model("efficientnet_lite0")
    model = lite.model
    x = photos(lite)
    with torch.no_grad():
        t = model(x).argmax(1)
    b = x.shape[0]
    print(f"load average {os.getloadavg()[0]:.1f}; torch threads 1; batch {b} at 224 px")
    only = sys.argv[1:] or names()
    for name in only:
        m = build(name, model)
        if name == "dmbp":
            t2 = timed(lambda: build("dmbp", model, steps=2)(x, t))
            t4 = timed(lambda: build("dmbp", model, steps=6)(x, t))
            step = (t4 - t2) / 4
            total = t2 + (m.steps - 2) * step
            print(f"{name:22s} {total / b:9.2f} s/image  EXTRAPOLATED: {step / b:.3f} s/image per "
                  f"step (timed at 2 and 6 steps) x {m.steps} steps")
        elif name == "hdm":
            t1 = timed(lambda: build("hdm", model, steps=1, stages=1)(x, t))
            t2 = timed(lambda: build("hdm", model, steps=2, stages=1)(x, t))
            step = t2 - t1
            total = m.stages * (t1 + (m.steps - 1) * step)
            print(f"{name:22s} {total / b:9.2f} s/image  EXTRAPOLATED: {step / b:.3f} s/image per "
                  f"step of both phases (timed at 1 and 2 steps, 1 stage) x {m.steps} steps x "
                  f"{m.stages} stages")
        elif name == "scorecam":
            with torch.no_grad():
                _, acts = m.layer_forward(x[:1], cut_graph=False)
            k = acts.shape[1]
            part = timed(lambda m=m, a=acts: m.score_weights(x[:1], t[:1], a[:, :128].float()))
            print(f"{name:22s} {part * k / 128:9.2f} s/image  EXTRAPOLATED: 128 of {k} channels "
                  f"on 1 image timed ({part:.2f} s), x {k / 128:.0f}")
        else:
            m(x[:1], t[:1])  # warm-up
            sec = timed(lambda m=m: m(x, t), repeat=2)
            print(f"{name:22s} {sec / b:9.3f} s/image")


if __name__ == "__main__":
    main()
