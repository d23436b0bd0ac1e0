"""Proof on a planted shortcut: a corner mark that predicts class 1 in half its images, a
small CNN trained on it, its Grad-CAM maps written as a run; ``salmap analyze`` must put the
marked images in one cluster of their own (purity and recall >= 0.9) and flag it, and flag
nothing when the same model explains images without the mark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from salmap.pipeline.analyze import analyze_run
from salmap.pipeline.cli import main

from bench.planted_shortcut import UNIT, make_images, planted_run


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("planted")
    run, cue, facts, model = planted_run(str(root / "cue"), 600, 160, 0.5, epochs=2,
                                         with_images=True)
    return run, cue, facts, model, root


def _purity_recall(rows, cue: np.ndarray, clusters) -> tuple[float, float, dict]:
    r = rows.to_pandas()
    r["cue"] = cue[r.sample_id.str.split("/").str[1].astype(int).values]
    flagged = clusters.to_pandas()
    flagged = flagged[flagged.flagged]
    assert len(flagged) == 1, flagged[["target", "cluster", "size", "evidence"]]
    f = flagged.iloc[0]
    members = r[(r.target == f.target) & (r.cluster == f.cluster)]
    return float(members.cue.mean()), float(members.cue.sum() / r.cue.sum()), f


def test_the_cue_cluster_is_isolated_and_flagged(planted, capsys):
    run, cue, facts, _, _ = planted
    assert facts["marked"] >= 30 and facts["acc_marked"] >= 0.9  # the model uses the mark
    assert main(["analyze", run]) == 0
    out = capsys.readouterr().out
    assert "FLAGGED cnn__gradcam class_1 (target 1)" in out and "fixed_region" in out
    from salmap.pipeline.analyze import load_analysis

    manifest, rows, clusters = load_analysis(run)
    purity, recall, f = _purity_recall(rows[UNIT], cue, clusters[UNIT])
    assert purity >= 0.9 and recall >= 0.9, (purity, recall)
    assert f.target == 1 and {"outside_box", "fixed_region"} <= set(f["flags"])
    assert f.region_x < 0.25 and f.region_y < 0.25  # the top-left corner
    assert manifest["units"][UNIT]["flagged"][0]["cluster"] == f.cluster
    import json

    with open(f"{run}/manifest.json") as fh:  # the run's manifest names it too
        assert json.load(fh)["analysis"]["flagged"][0]["flags"] == list(f["flags"])
    # the report: the flagged cluster listed first, its card first in its class, one point per
    # row linking to its cluster's card, exemplar maps
    with open(f"{run}/report/index.html") as fh:
        html = fh.read()
    section = html[html.index("<section id=analysis>"):]
    section = section[:section.index("</section>")]
    anchor = f"cluster-cnn--gradcam-1-{f.cluster}"
    assert "Flagged clusters (1)" in section and f"href='#{anchor}'" in section
    class1 = section[section.index("<h4>class 1 "):]
    assert class1.index(f"id='{anchor}'") < class1.index("class='card'")
    assert section.count("<circle") == 160 and section.count("alt='map of synthetic/") >= 8


def test_without_the_mark_nothing_is_flagged(planted):
    """The same model and pipeline on images without the mark: no cluster flagged."""
    _, _, _, model, root = planted
    run, cue, facts, _ = planted_run(str(root / "clean"), 0, 160, 0.5, test_cue_share=0.0,
                                     model=model)
    assert facts["marked"] == 0 and not cue.any()
    res = analyze_run(run)
    assert res.flagged() == [] and res.clusters[UNIT].num_rows >= 2


def test_cue_mask_matches_the_images():
    x, y, cue, _ = make_images(40, 0.5, seed=3)
    assert (x[cue, :, 1:4, 1:4] == 3.0).all() and not cue[y == 0].any()
    assert not (x[~cue, :, 1:4, 1:4] == 3.0).all(axis=(1, 2, 3)).any()
