"""Region-level deletion / insertion (workers/metrics/region.py): a naive reference, exact
optimality on a linear model, invariance to detail inside a patch (which pixel deletion does
not have), random patch orders in between, batch independence, the grid, bad parameters."""

from __future__ import annotations

import pytest
import torch
from salmap.workers.metrics import MetricError, compute_model_metrics
from salmap.workers.metrics.faithfulness import auc, blur
from salmap.workers.metrics.region import region_grid, region_ranks
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
H = 24
NAMES = ["region_deletion_auc", "region_insertion_auc"]


class Linear(nn.Module):
    """logits = [w . x, 0] in float64, so p_0 = sigmoid(w . x)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() * self.w.double()).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1).float()


def setup(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, H, H, generator=g)
    w = 0.05 * torch.randn(1, 3, H, H, generator=g)
    return x, w, Linear(w)


def run(model, x, maps, **params):
    return compute_model_metrics(NAMES, model, x, maps, torch.zeros(x.shape[0], dtype=torch.long),
                                 {"score": "logit", **params}, MEAN, STD, max_batch=16)


def naive(model, x, maps, size, steps, kind):
    """The definition, one image and one point at a time."""
    out = []
    sub = blur(x)
    _, _, idx = region_grid(H, H, size)
    for i in range(x.shape[0]):
        means = torch.zeros(int(idx.max()) + 1).index_add_(0, idx, maps[i].flatten())
        means /= torch.bincount(idx).float()
        order = torch.argsort(means, descending=True, stable=True)
        curve = []
        for p in range(steps + 1):
            k = p * len(means) // steps
            changed = torch.isin(idx, order[:k]).view(1, 1, H, H)
            img = torch.where(changed, sub[i:i + 1], x[i:i + 1]) if kind == "deletion" else \
                torch.where(changed, x[i:i + 1], sub[i:i + 1])
            curve.append(float(model(img)[0, 0]))
        out.append(float(auc(torch.tensor(curve, dtype=torch.float64))))
    return out


@pytest.mark.parametrize("size", [4, 5, 8])
def test_matches_the_naive_definition(size):
    x, _, model = setup()
    maps = torch.rand(2, H, H, generator=torch.Generator().manual_seed(1))
    got = run(model, x, maps, region_size=size, region_steps=6)
    for kind in ("deletion", "insertion"):
        want = naive(model, x, maps, size, 6, kind)
        assert got[f"region_{kind}_auc"].tolist() == pytest.approx(want, abs=1e-5)


def test_patch_contributions_are_the_optimal_order_on_a_linear_model():
    """Deleting patch k changes the logit by c_k = sum w (x - blur x) over the patch: ordering
    by c_k gives the lowest deletion and highest insertion AUC of all orders tried."""
    x, w, model = setup(2)
    contrib = (w * (x - blur(x))).sum(1)  # per pixel; patch sums = c_k (equal patch sizes)
    best = run(model, x, contrib, region_size=6, region_steps=16)
    for seed in range(10):
        other = run(model, x, torch.rand(2, H, H, generator=torch.Generator().manual_seed(seed)),
                    region_size=6, region_steps=16)
        assert (best["region_deletion_auc"] <= other["region_deletion_auc"] + 1e-6).all()
        assert (best["region_insertion_auc"] >= other["region_insertion_auc"] - 1e-6).all()
    worst = run(model, x, -contrib, region_size=6, region_steps=16)
    assert (best["region_deletion_auc"] < worst["region_deletion_auc"]).all()


def test_detail_inside_a_patch_does_not_matter():
    """Zero-mean detail within each patch leaves the patch order, hence the AUCs, unchanged;
    the pixel-level deletion AUC changes."""
    x, _, model = setup(3)
    coarse = torch.rand(2, H // 6, H // 6, generator=torch.Generator().manual_seed(4))
    coarse = coarse.repeat_interleave(6, 1).repeat_interleave(6, 2)
    detail = 0.01 * torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(5))
    detail = (detail - detail.mean((1, 2), keepdim=True)).repeat(1, H // 6, H // 6)
    a = run(model, x, coarse, region_size=6, region_steps=8)
    b = run(model, x, coarse + detail, region_size=6, region_steps=8)
    for k in NAMES:
        torch.testing.assert_close(a[k], b[k])
    pa = compute_model_metrics(["deletion_auc"], model, x, coarse, torch.zeros(2, dtype=torch.long),
                               {"score": "logit"}, MEAN, STD)
    pb = compute_model_metrics(["deletion_auc"], model, x, coarse + detail,
                               torch.zeros(2, dtype=torch.long), {"score": "logit"}, MEAN, STD)
    assert not torch.allclose(pa["deletion_auc"], pb["deletion_auc"])


def test_batch_independent_and_curves():
    x, _, model = setup(6, b=3)
    maps = torch.rand(3, H, H, generator=torch.Generator().manual_seed(7))
    both = run(model, x, maps, curves=True)
    one = run(model, x[1:2], maps[1:2])
    for k in NAMES:
        assert both[k][1].item() == pytest.approx(one[k][0].item(), abs=1e-6)
    curve = both["region_deletion_curve"][0]
    assert len(curve) == 29 and curve[0] == pytest.approx(float(model(x[:1])[0, 0]), abs=1e-5)
    ins = both["region_insertion_curve"][0]
    assert ins[0] == pytest.approx(float(model(blur(x[:1]))[0, 0]), abs=1e-5)


def test_grid_and_ties():
    rows, cols, idx = region_grid(10, 7, 4)
    assert (rows, cols) == (3, 2) and idx.shape == (70,) and int(idx.max()) == 5
    ranks, pix = region_ranks(torch.zeros(2, 10, 7), 4, tie_seed=0)
    assert sorted(ranks[0].tolist()) == list(range(6)) and torch.equal(ranks[0], ranks[1])
    assert not torch.equal(ranks[0], region_ranks(torch.zeros(1, 10, 7), 4, tie_seed=1)[0][0])


def test_bad_parameters():
    x, _, model = setup()
    with pytest.raises(MetricError, match="region_size"):
        run(model, x, torch.rand(2, H, H), region_size=0)
    with pytest.raises(MetricError, match="region_steps"):
        run(model, x, torch.rand(2, H, H), region_steps=0)
