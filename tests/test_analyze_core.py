"""The numeric core of ``salmap analyze`` and its streamed driver on small written runs."""

from __future__ import annotations

import numpy as np
from salmap.pipeline.analyze import class_groups
from salmap.pipeline.analyze.classes import Params, analyze_classes
from salmap.pipeline.analyze.core import (
    assign,
    box_mask,
    cluster_maps,
    downsample,
    features,
    focus_area,
    knn_affinity,
    normalise,
    sample_hash,
    spectrum,
)
from salmap.pipeline.analyze.flags import Thresholds, flag, hot_spots, region_stats


def blobs(n: int, centres: list[tuple[int, int]], side: int = 16, seed: int = 0,
          jitter: float = 0.7):
    """Maps with one Gaussian blob each, at one of ``centres`` (jittered: ``jitter`` pixels
    standard deviation)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    maps, which = [], []
    for i in range(n):
        k = i % len(centres)
        cy, cx = np.asarray(centres[k]) + rng.normal(0, jitter, 2)
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) + rng.random((side, side)) * 0.02)
        which.append(k)
    return np.asarray(maps, dtype=np.float32), np.asarray(which)


def test_downsample_area_mean_and_normalise_to_distribution():
    m = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    d = downsample(m, 4)
    assert d.shape == (1, 4, 4) and d[0, 0, 0] == np.mean([0, 1, 8, 9])
    neg = -np.ones((1, 8, 8), np.float32)
    neg[0, 0, 0] = np.nan
    u = normalise(downsample(neg, 4))  # no positive relevance: uniform
    assert np.allclose(u, 1 / 16)
    assert downsample(np.ones((2, 3, 3), np.float32), 6).shape == (2, 6, 6)  # grows too
    assert np.allclose(normalise(d).sum(axis=(1, 2)), 1)


def test_eigengap_finds_well_separated_groups_and_kmeans_recovers_them():
    maps, which = blobs(90, [(3, 3), (12, 12), (3, 12)])
    dist = normalise(maps)
    spec = spectrum(knn_affinity(features(dist)), 8)
    assert spec.clusters == 3
    res = cluster_maps(dist)
    # each found cluster is exactly one planted group
    pairs = {(int(a), int(b)) for a, b in zip(res.labels, which)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    assert res.xy.shape == (90, 2) and np.abs(res.xy).max() <= 1 + 1e-9
    # one strategy only: one cluster
    one, _ = blobs(40, [(8, 8)])
    assert cluster_maps(normalise(one)).labels.max() == 0


def test_assign_puts_new_maps_in_their_groups_cluster():
    maps, which = blobs(60, [(3, 3), (12, 12)])
    dist = normalise(maps)
    res = cluster_maps(dist)
    new, new_which = blobs(20, [(3, 3), (12, 12)], seed=5)
    lab, xy = assign(normalise(new), res.centroids, features(dist), res.xy)
    ref = {int(w): int(lab_) for lab_, w in zip(res.labels, which)}
    assert [ref[int(w)] for w in new_which] == lab.tolist()
    assert xy.shape == (20, 2)


def test_sample_hash_is_stable_and_box_mask_maps_original_pixels_to_cells():
    assert sample_hash("a/b") == sample_hash("a/b") != sample_hash("a/c")
    import hashlib

    assert sample_hash("shard/k1") == int(hashlib.blake2b(b"shard/k1", digest_size=8).hexdigest(), 16)
    m = box_mask({"x0": 50, "y0": 0, "x1": 100, "y1": 50}, {"x0": 0, "y0": 0, "x1": 100, "y1": 100}, 4)
    assert m.tolist() == [[False, False, True, True], [False, False, True, True],
                          [False] * 4, [False] * 4]
    assert box_mask(None, {"x0": 0, "y0": 0, "x1": 1, "y1": 1}) is None


def test_flags_need_evidence_and_name_it():
    side = 16
    corner, _ = blobs(30, [(1, 1)], side, jitter=0.05)  # a mark: fixed to the image
    moving, _ = blobs(30, [(1, 1)], side)  # objects near the corner: they move a cell or so
    centre, _ = blobs(30, [(8, 8)], side, jitter=0.05)
    t = Thresholds()
    nan = float("nan")
    for maps, box, ref, want in (
            (corner, 0.05, nan, {"outside_box", "fixed_region"}),  # absolute lines: no ref
            (corner, nan, nan, {"fixed_region"}),  # no boxes: region only
            (corner, 0.8, nan, set()),  # the object sits in the corner: fine
            (corner, 0.05, 0.4, {"outside_box", "fixed_region"}),  # 0.05 < 35% of 0.4
            (corner, 0.2, 0.4, {"fixed_region"}),  # off the object (< 70% of 0.4), not far
            (corner, 0.3, 0.4, set()),  # as much in the box as the class's best: on it
            (moving, 0.2, 0.4, set()),  # hot spots move with the objects: not fixed
            (centre, 0.8, nan, set()), (centre, nan, nan, set())):
        d = normalise(maps)
        stats = region_stats(d.mean(axis=0), d)
        flags, evidence = flag(len(d), box, float(focus_area(d).mean()), stats, t, ref)
        assert set(flags) == want, (box, ref, flags, evidence)
        assert bool(evidence) == bool(flags)
    d = normalise(corner[:3])
    flags, evidence = flag(3, 0.0, 0.01, region_stats(d.mean(0), d), t)
    assert flags == [] and "min_images" in evidence
    # a map's hot spot: its peak; a uniform map's is the centre (not the first cell)
    hx, hy = hot_spots(normalise(np.stack([corner[0], np.ones((side, side), np.float32)])))
    assert abs(hx[0] - 1.5 / side) < 0.5 / side and abs(hy[0] - 1.5 / side) < 0.5 / side
    assert np.allclose([hx[1], hy[1]], 0.5)
    # a diffuse map outside the box is not "sitting" anywhere
    flat = normalise(np.ones((20, side, side), np.float32))
    assert flag(20, 0.05, float(focus_area(flat).mean()), region_stats(flat.mean(0), flat), t)[0] == []


def test_class_groups_bound_buffered_maps():
    groups = class_groups({0: 100_000, 1: 30, 2: 30_000, 3: 10}, cap=2000, budget=5000)
    assert sorted(c for g in groups for c in g) == [0, 1, 2, 3]
    assert all(sum(min({0: 100_000, 1: 30, 2: 30_000, 3: 10}[c], 4000) for c in g) <= 5000
               for g in groups)


def test_streamed_driver_caps_a_class_and_assigns_the_rest(tmp_path):
    """Above the cap a class is embedded on its hash sample; every row still gets a cluster
    (the nearest centroid), and the result is the same whatever the batch order."""
    import pyarrow.dataset as pads

    from bench.planted_shortcut import write_run

    maps, which = blobs(120, [(2, 2), (12, 12)], side=16)
    targets = np.zeros(120, dtype=np.int64)
    targets[100:] = 1
    run = write_run(str(tmp_path / "r"), maps, targets, targets, per_file=50)
    from salmap.pipeline.read import read_run

    ds = read_run(run)
    rows, clusters = analyze_classes(ds, None, Params(side=16, cap=40), "cnn__gradcam")
    r = rows.to_pandas().sort_values("sample_id")
    assert len(r) == 120 and r.embedded.sum() == 40 + 20
    c0 = r[r.target == 0]
    truth = which[:100]
    ids = c0.sample_id.str.split("/").str[1].astype(int).values
    # the two groups of class 0, embedded or assigned, are two clusters
    assert len({(a, b) for a, b in zip(c0.cluster, truth[ids])}) == 2
    assert clusters.num_rows >= 3 and set(clusters.column("size").to_pylist()) >= {50}
    # the same rows in one file
    run2 = write_run(str(tmp_path / "r2"), maps, targets, targets, per_file=120)
    rows2, _ = analyze_classes(pads.dataset(read_run(run2).files, format="parquet"), None,
                               Params(side=16, cap=40), "cnn__gradcam")
    r2 = rows2.to_pandas()
    # other files, other batches: the embedded sample is chosen by the ids' hash alone
    assert set(r2[r2.embedded].sample_id) == set(r[r.embedded].sample_id)


def test_cli_names_a_missing_run_and_keeps_other_units(tmp_path, capsys):
    from salmap.pipeline.analyze import load_analysis
    from salmap.pipeline.cli import main

    from bench.planted_shortcut import write_run

    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    maps, _ = blobs(12, [(2, 2)], side=8)
    run = write_run(str(tmp_path / "r"), maps, np.zeros(12, int), np.zeros(12, int))
    assert main(["analyze", run, "--unit", "nope", "--no-report"]) == 2
    assert main(["analyze", run, "--unit", "gradcam", "--no-report", "--side", "8"]) == 0
    out = capsys.readouterr().out
    assert "cnn__gradcam: 12 rows, 1 classes, 1 clusters (in-process" in out
    manifest, rows, clusters = load_analysis(run)
    assert rows["cnn__gradcam"].num_rows == 12 and manifest["params"]["side"] == 8
    assert len(clusters["cnn__gradcam"].column("mean_map")[0]) == 64
