"""Dataset summaries (bootstrap intervals, class-mean pointing accuracy, Win %) and the
metric registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from salmap.workers.metrics import (
    METRICS,
    MetricError,
    check_params,
    compute_model_metrics,
    protocol,
    resolve_params,
)
from salmap.workers.metrics.summary import pointing_accuracy_per_class, summarize, win_percent


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


# -- bootstrap, pointing and Win % details ---------------------------------------------------
def reference_interval(v: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap written plainly: n_boot resamples of size n, one draw."""
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    lo, hi = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.parametrize("n", [7, 5000])  # 5000 values: the resamples are drawn in chunks
def test_summarize_is_the_95_percent_percentile_bootstrap_with_seed_0(n):
    v = np.random.default_rng(1).exponential(size=n)
    out = summarize(list(v))  # the defaults: 1000 resamples, seed 0
    lo, hi = reference_interval(v)
    assert out["ci_low"] == pytest.approx(lo, rel=1e-12) and out["ci_high"] == pytest.approx(hi, rel=1e-12)
    assert out["mean"] == pytest.approx(float(v.mean())) and out["n"] == n


def test_summarize_with_one_or_no_resample():
    one = summarize([1.0, 2.0, 4.0], n_boot=1)
    lo, hi = reference_interval(np.array([1.0, 2.0, 4.0]), n_boot=1)
    assert one["ci_low"] == one["ci_high"] == pytest.approx(lo) == pytest.approx(hi)
    none = summarize([1.0, 2.0, 4.0], n_boot=0)
    assert np.isnan(none["ci_low"]) and np.isnan(none["ci_high"])
    assert none["mean"] == pytest.approx(7 / 3)


def test_pointing_accuracy_takes_float_hits_and_averages_rates_over_classes():
    # float hits as Parquet gives them back; class a: 1 of 2, class b: 2 of 2 -> (50 + 100) / 2
    hits = [1.0, 0.0, float("nan"), 1.0, 1.0]
    assert pointing_accuracy_per_class(hits, ["a", "a", "a", "b", "b"]) == pytest.approx(75.0)


def test_win_percent_on_one_image_and_on_no_method():
    one = win_percent({"a": [1.0], "b": [2.0]})
    assert one["pairwise"]["a"]["b"] == 100.0 and one["pairwise"]["b"]["a"] == 0.0
    assert one["best"] == {"a": 100.0, "b": 0.0, "tie": 0.0} and one["n"] == 1
    assert win_percent({}) == {"pairwise": {}, "ties": {}, "best": {}, "n": 0}


# -- the registry --------------------------------------------------------------------------
def test_default_parameters_are_the_published_protocols():
    """Each default, with where it comes from (shared/specs/metrics)."""
    d = {name: spec.defaults for name, spec in METRICS.items()}
    assert d["road"]["road_percentiles"] == (10, 20, 30, 40, 50, 60, 70, 80, 90)  # ROADCombined
    assert d["road"]["road_seed"] == 0 and d["road"]["tie_seed"] == 0
    assert d["deletion_auc"]["tie_seed"] == 0 and d["deletion_auc"]["score"] == "softmax"
    assert d["road"]["score"] == "softmax" and d["average_drop"]["score"] == "softmax"
    assert d["average_drop"]["mult_normalize"] == "minmax"  # pytorch-grad-cam scale_cam_image
    assert d["pointing_game"]["pointing_tolerance"] == 15.0  # TorchRay
    assert d["gini"]["gini_eps"] == 1e-7  # Quantus Sparseness
    for name in ("pseudo_box", "pseudo_mask", "box_iou"):
        assert d[name]["largest_component"] is True and d[name]["pseudo_threshold"] == 0.2


def test_specs_are_immutable_and_listed_by_kind():
    import dataclasses

    from salmap.workers.metrics.registry import names

    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["gini"].kind = "model"  # type: ignore[misc]
    assert names("model") == ["deletion_auc", "insertion_auc", "region_deletion_auc",
                              "region_insertion_auc", "average_drop",
                              "confidence_increase", "road"]
    assert set(names("post")) == set(METRICS) - set(names("model"))
    assert names() == list(METRICS)


def test_unknown_names_get_one_suggestion_and_own_params_are_checked():
    with pytest.raises(MetricError) as info:
        resolve_params("delition_auc", {})
    assert "(did you mean 'deletion_auc'?)" in str(info.value)
    assert str(info.value).count("did you mean") == 1
    with pytest.raises(MetricError, match="metric 'gini'.*'gini_epsilon'"):
        check_params({"gini": {"gini_epsilon": 1.0}})
    check_params({"gini": None, "road": {"road_seed": 3}})  # nothing to complain about


# -- the engine ----------------------------------------------------------------------------
def counting(model):
    sizes: list[int] = []

    def forward(x):
        sizes.append(int(x.shape[0]))
        return model(x)

    return forward, sizes


def test_engine_defaults_imagenet_normalisation_and_64_images_per_forward(tiny_model):
    torch.manual_seed(0)
    x, maps, t = torch.randn(3, 3, 8, 8), torch.rand(3, 4, 4), torch.tensor([0, 1, 2])
    forward, sizes = counting(tiny_model)
    names = ["average_drop", "deletion_auc"]
    params = {"steps": 28, "deletion_substrate": "blur"}
    default = compute_model_metrics(names, forward, x, maps, t, params)
    assert max(sizes) == 64 and sizes.count(64) == sum(sizes) // 64
    explicit = compute_model_metrics(names, tiny_model, x, maps, t, params,
                                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for key in ("average_drop", "confidence_masked", "deletion_auc"):
        torch.testing.assert_close(default[key], explicit[key])
    # each channel's statistics matter: moving any one changes the pixel-space product
    for k in range(3):
        mean = [0.485, 0.456, 0.406]
        mean[k] += 1.0
        other = compute_model_metrics(["average_drop"], tiny_model, x, maps, t, params, mean=mean)
        assert not torch.allclose(other["confidence_masked"], default["confidence_masked"])
        std = [0.229, 0.224, 0.225]
        std[k] += 1.0
        other = compute_model_metrics(["average_drop"], tiny_model, x, maps, t, params, std=std)
        assert not torch.allclose(other["confidence_masked"], default["confidence_masked"])


def test_engine_checks_shapes_upsamples_to_float32_and_keeps_notes_once(tiny_model):
    from salmap.workers.metrics.engine import upsample_maps

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    for maps in (torch.rand(2, 8), torch.rand(3, 8, 8), torch.rand(1, 2, 8, 8)):
        with pytest.raises(MetricError, match="expected images"):
            compute_model_metrics(["average_drop"], tiny_model, x, maps, t)
    same = upsample_maps(torch.rand(2, 8, 8, dtype=torch.float64), (8, 8))
    assert same.dtype == torch.float32
    # a constant map: average drop and confidence increase both remark on it, once
    maps = torch.stack([torch.ones(4, 4), torch.rand(4, 4)])
    out = compute_model_metrics(["average_drop", "confidence_increase"], tiny_model, x, maps, t)
    assert out["_notes"][0].startswith("average_drop: constant map") and ";" not in out["_notes"][0]
    assert out["_notes"][1] == ""


def test_confidence_increase_reaches_the_summary_the_manifest_and_the_report(tmp_path):
    """The metric is summarised, printed and reported; average_drop's ingredients are not."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq
    from salmap.pipeline.execute import part_name
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.report import render_report
    from salmap.pipeline.storage import Store
    from salmap.pipeline.summary import print_summaries, unit_summary
    from test_export import DATA, UNIT, _rows, _table

    rows = _rows("shard-000000", 4, lambda k: [1], 8, np.random.default_rng(0))
    for i, r in enumerate(rows):
        r.update(confidence_increase=100.0 * (i % 2), average_drop=10.0 * i,
                 confidence_clean=0.5, confidence_masked=0.25)
    store = Store.open(str(tmp_path / "run"))
    key = f"{DATA}/w00000/{part_name(UNIT, [(r['sample_id'], 1) for r in rows])}"
    sink = pa.BufferOutputStream()
    pq.write_table(_table(rows), sink)
    store.write_bytes(key, sink.getvalue().to_pybytes())
    Ledger(store).commit(UNIT, {"unit": UNIT, "wave": "w00000", "files": [key], "rows": 4,
                                "errors": 0, "samples": 4, "shards": ["shard-000000"],
                                "shard_identity": {}, "per_shard": {}})
    summary = unit_summary(store, [key])
    assert summary["metrics"]["confidence_increase"]["mean"] == pytest.approx(50.0)
    assert "confidence_clean" not in summary["metrics"]
    assert "confidence_masked" not in summary["metrics"]
    said: list[str] = []
    print_summaries({UNIT: {"summary": summary}}, out=said.append)
    header = next(s for s in said if s.startswith("unit"))
    assert header.split()[2:] == ["average_drop", "confidence_increase"]
    store.write_json("manifest.json", {"run_id": "t", "units": {UNIT: {
        "model": "m", "method": "gradcam", "summary": summary}}})
    html = render_report(store.uri)
    table = html[html.index("<table id=summary-table>"):]
    table = table[:table.index("</table>")]
    assert "confidence_<wbr>increase" in table and "confidence_<wbr>clean" not in table
    assert not re.search(r"Not computed in this run:[^<]*confidence_increase", html)
