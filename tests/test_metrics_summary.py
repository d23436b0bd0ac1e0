"""Dataset summaries (bootstrap intervals, class-mean pointing accuracy, Win %) and the
metric registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.metrics import (
    METRICS,
    MetricError,
    check_params,
    compute_model_metrics,
    protocol,
    resolve_params,
)
from workers.metrics.summary import pointing_accuracy_per_class, summarize, win_percent


def test_summarize_interval_and_counts():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 1.0, size=400)
    s = summarize(np.concatenate([v, [np.nan, np.inf]]), n_boot=2000, seed=1)
    assert s["n"] == 400 and s["n_nan"] == 2
    assert s["mean"] == pytest.approx(v.mean())
    assert s["ci_low"] < s["mean"] < s["ci_high"]
    half = (s["ci_high"] - s["ci_low"]) / 2
    assert half == pytest.approx(1.96 * v.std() / np.sqrt(400), rel=0.15)
    assert summarize(v, seed=3) == summarize(v, seed=3)
    c = summarize(np.full(10, 0.25))
    assert c["ci_low"] == c["mean"] == c["ci_high"] == 0.25
    e = summarize([None, None])
    assert e["n"] == 0 and e["n_nan"] == 2 and np.isnan(e["mean"])
    assert summarize([True, False, None, True])["mean"] == pytest.approx(2 / 3)


def test_pointing_accuracy_is_a_mean_over_classes():
    hits = [True] + [False] * 9 + [None, None]
    classes = ["cat"] + ["dog"] * 9 + ["cat", "bird"]
    assert pointing_accuracy_per_class(hits, classes) == pytest.approx(50.0)
    assert np.mean([h for h in hits if h is not None]) == pytest.approx(0.1)  # not this
    assert np.isnan(pointing_accuracy_per_class([None], [1]))


def test_win_percent_pairwise_and_best():
    drops = {"a": [10, 20, 30, 5, np.nan], "b": [12, 20, 10, 6, 1], "c": [11, 25, 40, 5, 2]}
    w = win_percent(drops)
    assert w["pairwise"]["a"]["b"] == pytest.approx(50.0)  # rows 0, 3 of 4 finite
    assert w["pairwise"]["b"]["a"] == pytest.approx(25.0)
    for x in drops:
        for y in drops:
            if x != y:
                total = w["pairwise"][x][y] + w["pairwise"][y][x] + w["ties"][x][y]
                assert total == pytest.approx(100.0)
    assert w["n"] == 4
    assert w["best"] == pytest.approx({"a": 25.0, "b": 25.0, "c": 0.0, "tie": 50.0})
    with pytest.raises(ValueError, match="lengths"):
        win_percent({"a": [1, 2], "b": [1]})


def test_registry_entries_are_complete():
    for name, spec in METRICS.items():
        assert spec.name == name and spec.kind in ("model", "post") and spec.columns and spec.doc
    for name in ("deletion_auc", "insertion_auc", "average_drop", "confidence_increase", "road"):
        assert METRICS[name].kind == "model"


def test_params_resolution():
    p = resolve_params("deletion_auc", {"steps": 10, "pseudo_threshold": 0.3,
                                        "deletion_auc": {"tie_seed": 4}})
    assert p["steps"] == 10 and p["tie_seed"] == 4 and "pseudo_threshold" not in p
    assert p["deletion_substrate"] == "zero"
    assert resolve_params("insertion_auc", {})["insertion_substrate"] == "blur"
    with pytest.raises(MetricError, match="did you mean 'steps'"):
        resolve_params("deletion_auc", {"stepz": 3})
    with pytest.raises(MetricError, match="unknown metric"):
        check_params({"delete_auc": {}})
    check_params({"road": {"road_percentiles": [20, 80]}, "gini": None})


def test_protocol_records_the_resolved_defaults():
    rec = protocol(["deletion_auc", "insertion_auc", "average_drop"], {"steps": 14})
    assert rec["deletion_auc"]["deletion_substrate"] == "zero"
    assert rec["insertion_auc"]["insertion_substrate"] == "blur"
    assert rec["insertion_auc"]["blur_kernel"] == 11 and rec["insertion_auc"]["blur_sigma"] == 5.0
    assert rec["deletion_auc"]["steps"] == 14 and rec["deletion_auc"]["score"] == "softmax"
    assert rec["average_drop"]["mult_space"] == "pixel"


def test_model_metrics_fill_exactly_the_registered_columns(tiny_model):
    names = [n for n, s in METRICS.items() if s.kind == "model"]
    out = compute_model_metrics(names, tiny_model, torch.randn(2, 3, 8, 8), torch.rand(2, 2, 2),
                                torch.tensor([0, 1]), {"steps": 2, "curves": True,
                                                       "road_percentiles": [50]})
    expected = {c for n in names for c in METRICS[n].columns}
    assert set(out) == expected | {"_notes"}  # the columns, and one remark per sample
    assert out["_notes"] == ["", ""]
    for key, value in out.items():
        assert len(value) == 2, key
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float32 and value.device.type == "cpu"
    no_curves = compute_model_metrics(["deletion_auc"], tiny_model, torch.randn(1, 3, 8, 8),
                                      torch.rand(1, 2, 2), torch.tensor([0]), {"steps": 2})
    assert set(no_curves) == {"deletion_auc", "_notes"}
