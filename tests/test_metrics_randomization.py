"""Tie-aware Spearman against scipy, and the cascading model-parameter randomization check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from workers.metrics.randomization import (
    block_layers,
    cascading_randomization,
    module_layers,
    plot_randomization,
    spearman,
)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(8, 300)).astype(float)
    a[a < 3] = 0  # about 50% exact zeros
    b = 0.5 * a + rng.integers(0, 4, size=(8, 300))
    b[:, ::3] = 0
    got = spearman(a, b)
    ref = [spearmanr(a[i], b[i]).statistic for i in range(8)]
    np.testing.assert_allclose(got, ref, atol=1e-10)
    x, y = rng.random(50), rng.random(50)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    got_t = spearman(torch.tensor(a.reshape(8, 20, 15)), torch.tensor(b.reshape(8, 20, 15)))
    np.testing.assert_allclose(got_t, ref, atol=1e-10)


def test_spearman_invariances_and_degenerate_rows():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 100))
    np.testing.assert_allclose(spearman(a, 3 * a + 1), 1.0)
    np.testing.assert_allclose(spearman(a, np.exp(a)), 1.0)
    np.testing.assert_allclose(spearman(a, -a), -1.0)
    const = np.stack([np.ones(100), a[1], a[2]])
    out = spearman(const, a)
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()
    with_nan = a.copy()
    with_nan[2, 5] = np.nan
    assert np.isnan(spearman(with_nan, a)[2])


def gradient_method(model):
    """|d logit_target / d input| summed over channels (a "should pass" control)."""

    def explain(x, t):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).gather(1, t.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(score, x)
        return g.abs().sum(1)

    return explain


def intensity_method(model):
    """Model-independent 'explanation' (a "should fail" control)."""
    return lambda x, t: x.abs().sum(1)


def test_cascading_randomization_changes_gradient_maps(tiny_model):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    res = cascading_randomization(tiny_model, gradient_method, x, t, seed=0)
    assert res[0]["layer"] == "original"
    np.testing.assert_allclose(res[0]["spearman"], 1.0)
    assert [r["layer"] for r in res[1:]] == module_layers(tiny_model)
    assert res[1]["layer"] == "fc"
    assert min(r["spearman_mean"] for r in res[1:]) < 0.5
    assert res[-1]["spearman_mean"] < res[0]["spearman_mean"] - 0.3
    assert res[-1]["ssim_mean"] < 0.9
    for k, v in tiny_model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_model_independent_explanation_stays_identical(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    res = cascading_randomization(tiny_model, intensity_method, x, torch.tensor([0, 1]),
                                  layers="blocks")
    for r in res:
        np.testing.assert_allclose(r["spearman"], 1.0)
        np.testing.assert_allclose(r["ssim"], 1.0)
        assert r["n_nan"] == 0


def test_cascading_bookkeeping_randomizes_exactly_the_top_k_layers(tiny_model):
    original = {n: [p.clone() for p in m.parameters(recurse=False)]
                for n, m in tiny_model.named_modules() if n}
    layers = ["fc", "layer4.0", "conv2", "bn1"]
    seen = []

    def recording_builder(model):
        changed = []
        for n, m in model.named_modules():
            if n in original and any(not torch.equal(p, q) for p, q in
                                     zip(m.parameters(recurse=False), original[n])):
                changed.append(n)
        seen.append(changed)
        return gradient_method(model)

    cascading_randomization(tiny_model, recording_builder, torch.randn(1, 3, 8, 8),
                            torch.tensor([0]), layers=layers)
    assert seen[0] == [] and seen[1] == []  # reference and "original" runs
    for k in range(1, len(layers) + 1):
        assert sorted(seen[k + 1]) == sorted(layers[:k])
    with pytest.raises(AttributeError, match="nope"):
        cascading_randomization(tiny_model, gradient_method, torch.randn(1, 3, 8, 8),
                                torch.tensor([0]), layers=["nope"])


def test_block_layers_of_resnet(resnet18):
    blocks = block_layers(resnet18)
    assert blocks[0] == "fc" and blocks[1] == "layer4.1" and blocks[-1] == "conv1"
    assert "relu" not in blocks and "avgpool" not in blocks


def test_plot_randomization_writes_png(tiny_model, tmp_path):
    res = cascading_randomization(tiny_model, gradient_method, torch.randn(2, 3, 8, 8),
                                  torch.tensor([0, 1]), layers="blocks")
    path = tmp_path / "mprt.png"
    plot_randomization(res, str(path), title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
