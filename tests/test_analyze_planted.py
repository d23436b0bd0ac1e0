"""Proof on a planted shortcut, on the project's ground-truth data (``salmap.workers.synthetic``,
its spurious-cue variant): a corner mark that gives away the class in half the images, a
small CNN trained on them, its Grad-CAM maps written as a run; ``salmap analyze`` must put
each class's marked images in one cluster of their own (purity and recall >= 0.9) and flag
it as a fixed region at its class's corner; no other cluster is flagged as a fixed region,
and nothing at all is flagged when the same model explains images without the mark. (A model
trained this briefly has not fully learned the shapes: some of its unmarked maps may sit off
the object and be flagged ``outside_box``, which is what they are.) The same holds at full
size (10,000 maps of the benchmark's harder data: BENCHMARKS.md, section 13). The report's
scatter points link to their samples in the (paged) gallery."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import torch
from salmap.pipeline.analyze import Thresholds, analyze_run, load_analysis
from salmap.pipeline.cli import main

from bench.planted_shortcut import UNIT, make_images, planted_run

# small enough for a test: bigger objects on a calmer background than the defaults and a
# narrower CNN (8 channels, batches of 32), so the model also learns the shapes in a few
# seconds (unmarked accuracy about 0.9: its maps follow the objects, as at full size; the
# benchmark uses the defaults)
DATASET = {"texture": 0.1, "min_radius": 7.0, "max_radius": 10.0}
N_TRAIN, N_TEST, EPOCHS, WIDTH, BATCH = 600, 160, 8, 8, 32
N_CONTROL = 400  # maps only: enough for clusters of min_images (20) and more to be judged
CORNERS = {0: (0.0, 0.0), 1: (1.0, 0.0)}  # class 0: top left, class 1: top right (x, y)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread: the small CNN's ops are tiny, and on a shared 2-core machine two
    OpenMP threads made training 10x slower (72 s against 7 s, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    run, cue, facts, model = planted_run(str(root / "cue"), N_TRAIN, N_TEST, 0.5, epochs=EPOCHS,
                                         with_images=True, dataset=DATASET, width=WIDTH,
                                         batch=BATCH)
    return run, cue, facts, model, root


def _fixed(flags) -> bool:
    return "fixed_region" in list(flags)


def at_corner(f, target: int) -> bool:
    """The cluster's fixed region lies at the corner of ``target``'s mark."""
    cx, cy = CORNERS[target]
    return abs(f.region_x - cx) < 0.25 and abs(f.region_y - cy) < 0.25


def cue_clusters(rows, cue: np.ndarray, clusters) -> dict[int, tuple[float, float, object]]:
    """Per class: (purity, recall, cluster row) of its one cluster flagged ``fixed_region`` at
    its mark's corner (the test checks that no other cluster is flagged a fixed region)."""
    r = rows.to_pandas()
    r["cue"] = cue[r.sample_id.str.split("/").str[1].astype(int).values]
    flagged = clusters.to_pandas()
    flagged = flagged[flagged.flagged & flagged["flags"].map(_fixed)]
    flagged = flagged[[at_corner(f, int(f.target)) for _, f in flagged.iterrows()]]
    assert sorted(flagged.target) == [0, 1], flagged[["target", "cluster", "size", "evidence"]]
    out = {}
    for _, f in flagged.iterrows():
        cls = r[r.target == f.target]
        members = cls[cls.cluster == f.cluster]
        out[int(f.target)] = (float(members.cue.mean()),
                              float(members.cue.sum() / max(cls.cue.sum(), 1)), f)
    return out


def test_the_cue_clusters_are_isolated_and_flagged(planted, capsys):
    run, cue, facts, _, _ = planted
    assert facts["marked"] >= 60 and facts["acc_marked"] >= 0.9  # the model uses the mark
    assert facts["acc_unmarked"] >= 0.75  # and has learned the shapes
    assert main(["analyze", run]) == 0
    out = capsys.readouterr().out
    assert "FLAGGED cnn__gradcam class_1 (target 1)" in out and "fixed_region" in out
    manifest, rows, clusters = load_analysis(run)
    found = cue_clusters(rows[UNIT], cue, clusters[UNIT])
    for target, (purity, recall, f) in found.items():
        assert purity >= 0.9 and recall >= 0.9, (target, purity, recall)
        assert "fixed_region" in set(f["flags"]) and "hot spots at the same place" in f.evidence
        cx, cy = CORNERS[target]  # the class's corner
        assert abs(f.region_x - cx) < 0.25 and abs(f.region_y - cy) < 0.25, f
    listed = manifest["units"][UNIT]["flagged"]
    assert {(f["target"], f["cluster"]) for f in listed if _fixed(f["flags"])} == {
        (t, int(f.cluster)) for t, (_, _, f) in found.items()}  # no other fixed region
    with open(f"{run}/manifest.json") as fh:  # the run's manifest names them too
        assert len(json.load(fh)["analysis"]["flagged"]) == len(listed)
    # the report: flagged clusters listed first, their cards first in their class, one point
    # per row, exemplar maps
    html = Path(run, "report", "index.html").read_text()
    section = html[html.index("<section id=analysis>"):]
    section = section[:section.index("</section>")]
    f1 = found[1][2]
    anchor = f"cluster-cnn--gradcam-1-{f1.cluster}"
    assert f"Flagged clusters ({len(listed)})" in section and f"href='#{anchor}'" in section
    class1 = section[section.index("<h4>class 1 "):]
    assert class1.index(f"id='{anchor}'") < class1.index("class='card'")
    assert section.count("<circle") == N_TEST and section.count("alt='map of synthetic/") >= 8


def _ids(path: Path) -> set[str]:
    return set(re.findall(r"""\bid=['"]?([^'" >]+)""", path.read_text()))


def test_scatter_points_link_to_their_samples(planted):
    """Every point of the scatter plots links to its own sample's gallery row, on the index or
    on another gallery page; the element exists in the written report (and, where Chromium
    is installed, a browser following the link finds it)."""
    run, _, _, _, _ = planted
    if not Path(run, "analysis").is_dir():
        assert main(["analyze", run]) == 0
    report = Path(run, "report")
    html = (report / "index.html").read_text()
    section = html[html.index("<section id=analysis>"):]
    section = section[:section.index("</section>")]
    points = re.findall(r"<a href='([^']*)'><circle [^>]*><title>(synthetic/\d+) · ", section)
    assert len(points) == N_TEST
    ids = {p.name: _ids(p) for p in report.glob("*.html")}
    assert len(ids) > 2  # 160 samples: the index shows the ends, gallery pages hold the rest
    elsewhere = 0
    for href, sid in points:
        page, _, anchor = href.partition("#")
        assert anchor.startswith("sample-") and sid.replace("/", "-") in anchor, (href, sid)
        assert anchor in ids[page or "index.html"], (href, sid)
        elsewhere += bool(page)
        row = re.search(rf"<tr id='{anchor}'>.*?</tr>", (report / (page or "index.html")).read_text())
        assert row and f"<span class=sid>{sid}</span>" in row.group(0)  # its own sample's row
    assert elsewhere >= N_TEST // 2
    from test_report import _browser, _chromium

    if _chromium() is None:
        return
    href = next(h for h, _ in points if h.startswith("gallery-"))
    page, _, anchor = href.partition("#")
    dom = _browser(["--dump-dom", f"{(report / page).as_uri()}?check=1#{anchor}"],
                   report.parent / "chromium-profile")
    found = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    assert json.loads(unescape(found.group(1)))["hash_target"] == "tr"


def test_without_the_mark_nothing_is_flagged(planted):
    """The same model and pipeline on images without the mark: no cluster flagged at all
    (the maps follow the objects, wherever they lie), among clusters large enough to be
    judged."""
    _, _, _, model, root = planted
    run, cue, facts, _ = planted_run(str(root / "clean"), 0, N_CONTROL, 0.5,
                                     test_cue_share=0.0, model=model, dataset=DATASET)
    assert facts["marked"] == 0 and not cue.any()
    res = analyze_run(run)
    assert res.flagged() == [], res.flagged()
    sizes = res.clusters[UNIT].column("size").to_pylist()
    judged = [n for n in sizes if n >= Thresholds().min_images]
    assert len(judged) >= 4 and sum(judged) >= N_CONTROL // 2, sizes


def test_cue_mask_matches_the_images():
    from salmap.workers.synthetic import cue_masks

    x, y, cue, boxes = make_images(40, 0.5, seed=3)
    where = cue_masks(torch.from_numpy(y), x.shape[-1], 3).numpy()
    assert cue.any() and (~cue).any()
    for i in range(40):
        mark = x[i][:, where[i]]
        assert (mark == 1.0).all() == bool(cue[i]), i
        x0, y0, x1, y1 = boxes[i]
        assert 0 <= x0 < x1 <= x.shape[-1] and 0 <= y0 < y1 <= x.shape[-1]
