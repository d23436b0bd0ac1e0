"""The two reconstructed seed methods on the pretrained EfficientNet-Lite0 and real photos:
their maps must explain the model, not merely have the right shape.

Photos: chelsea, coffee and rocket (the demo's photos the model recognises), each explained
for its demo label (pipeline/demo_data.py). Deletion AUC is salmap's own metric
(workers.metrics, RISE protocol) at its defaults except for 14 curve points instead of 28:
the same curves sampled half as often, for the maps and the random baseline alike (the mean
AUCs here move by a few thousandths, the ratio and the gap below by about 0.02). The
random-ranking baseline is the same metric on uniform random maps, averaged over seeds. A
random pixel order is a strong baseline on this model: scattered grey pixels destroy its
evidence fast, so a coarse, blob-like map scores worse than random (Grad-CAM does) and
passing needs pixel-level evidence.

To stay fast the methods run with fewer steps than their defaults (stated per test);
bench/method_quality.py runs the true defaults on all demo photos (BENCHMARKS.md, README).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from salmap.workers.methods import build
from salmap.workers.methods.dmbp import DMBPFit
from salmap.workers.metrics import compute_model_metrics

PHOTOS = {"chelsea": 285, "coffee": 967, "rocket": 657}  # photo_batch rows 0, 1, 3
# 14 points per curve (defaults: 28), for the method's map and the random baseline alike
CURVE = {"steps": 14, "region_steps": 14}
# images per forward in the metrics: with one torch thread a small batch stays in the CPU
# cache, so the same forwards run several times faster than in chunks of 64 (the default);
# the numbers do not depend on it
MAX_BATCH = 4


@pytest.fixture(scope="module")
def scene(lite0, photo_batch):
    """(model, images, labels, deletion(maps) -> per-photo AUC, mean random deletion AUC)."""
    model = lite0.model
    x = photo_batch[[0, 1, 3]]
    labels = torch.tensor(list(PHOTOS.values()))
    p = lite0.preprocess

    def deletion(maps: torch.Tensor) -> torch.Tensor:
        def forward(batch: torch.Tensor) -> torch.Tensor:
            return model(batch).float()

        with torch.inference_mode():
            out = compute_model_metrics(["deletion_auc"], forward, x, maps, labels, CURVE,
                                        mean=p.mean, std=p.std, max_batch=MAX_BATCH)
        return out["deletion_auc"]

    h, w = x.shape[-2:]
    # one torch thread, as in the tests (conftest's autouse fixture is function-scoped, so it
    # is not in force yet while this module-scoped fixture is set up)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        random = torch.stack([
            deletion(torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)))
            for seed in range(2)
        ]).mean(0)
    finally:
        torch.set_num_threads(threads)
    return model, x, labels, deletion, float(random.mean())


def test_dmbp_maps_follow_the_evidence_and_beat_random_deletion(scene):
    """DMBP at 30 steps (default 100; the fit is partial but the properties hold already):
    the positive and the negative attribution each keep at least 30 % of the L1 mass of
    gradient x input (the [R1] loss had collapsed to 0.3 % at this step count and to 0.02 %
    at 200), the regions of A+ are more positive than those of A-, the map
    correlates with gradient x input (the model's first-order evidence; [R1]: 0.08), and its
    mean deletion AUC is at most 0.75x the random ranking's (measured: about 0.55x)."""
    model, x, labels, deletion, random = scene
    res = DMBPFit(model, steps=30).explain(x, labels)  # the region fit (dmbp_fit)
    a = res.gradient_x_input
    mass = a.abs().flatten(1).sum(1)
    for part in (res.pos_attribution, res.neg_attribution):
        assert (part.abs().flatten(1).sum(1) > 0.3 * mass).all()

    def positive_share(t: torch.Tensor) -> torch.Tensor:
        r = F.avg_pool2d(t.sum(1, keepdim=True), 16)
        return r.clamp(min=0).flatten(1).sum(1) / r.abs().flatten(1).sum(1)

    # separation under way (at 100 steps the shares reach 0.99 and 0.01; BENCHMARKS.md)
    gap = positive_share(res.pos_attribution) - positive_share(res.neg_attribution)
    assert (gap > 0).all() and gap.mean() > 0.2
    net = (res.pos_attribution + res.neg_attribution).mean(1)
    for m, g in zip(net, a.mean(1), strict=True):
        assert torch.corrcoef(torch.stack([m.flatten(), g.flatten()]))[0, 1] > 0.5
    assert float(deletion(net).mean()) <= 0.75 * random


def test_hdm_maps_beat_a_random_patch_order_on_region_deletion_and_insertion(scene, lite0):
    """HDM with 10 steps per phase and one stage (defaults: 30 steps, 2 stages), judged at the
    granularity of its map (issue 22: pixel-level deletion against a per-pixel random order
    rewards high-frequency maps and is not the yardstick): 16-px patches on the blurred image,
    against a random patch order. Its insertion-minus-deletion gap must exceed the random
    order's by 0.1 (measured: 0.17 against -0.03; Grad-CAM 0.11, gradient x input 0.03)."""
    model, x, labels, _, _ = scene
    p = lite0.preprocess
    names = ["region_deletion_auc", "region_insertion_auc"]

    def region(maps: torch.Tensor) -> dict[str, float]:
        with torch.inference_mode():
            out = compute_model_metrics(names, lambda b: model(b).float(), x, maps, labels, CURVE,
                                        mean=p.mean, std=p.std, max_batch=MAX_BATCH)
        return {k: float(out[k].mean()) for k in names}

    h, w = x.shape[-2:]
    rnd = [region(torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)))
           for seed in range(2)]
    random_gap = sum(r["region_insertion_auc"] - r["region_deletion_auc"] for r in rnd) / 2
    got = region(build("hdm", model, steps=10, stages=1)(x, labels))
    assert got["region_insertion_auc"] - got["region_deletion_auc"] > random_gap + 0.1, got
