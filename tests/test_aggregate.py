"""Mergeable per-unit aggregates (pipeline.aggregate) and what the end of a run computes from
them (pipeline.summary, pipeline.rollup), checked against the exact computation on the rows."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from salmap.pipeline import aggregate as A
from salmap.pipeline.ledger import Ledger, commit_key
from salmap.pipeline.rollup import files_aggregate, ledger_aggregates, unit_aggregates
from salmap.pipeline.storage import Store
from salmap.pipeline.summary import (
    QUALITY_COLUMNS,
    label_quality,
    metric_summary,
    quality_totals,
    run_win_percent,
    summary_from_aggregate,
)
from salmap.workers.metrics.summary import pointing_accuracy_per_class, summarize, win_percent


def rows_table(n_samples: int, seed: int = 0, prefix: str = "s", drop_shift: float = 0.0
               ) -> pa.Table:
    """Rows of ``n_samples`` samples (one or two targets each, some error rows, some metric
    values missing) with every column the aggregate reads."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in (
        "sample_id", "shard", "key", "target", "status", "error", "deletion_auc", "average_drop",
        "pointing_hit", "gini", "target_prob", "saliency_min", "gt_box_count", "pseudo_box",
        "pseudo_box_match", "label_map_quality", "deletion_curve")}
    for k in range(n_samples):
        sid = f"{prefix}-{k:06d}"
        two = k % 3 == 0 and k % 11 != 5  # an error row: one per sample
        targets = [int(rng.integers(0, 5))] + ([int(rng.integers(5, 8))] if two else [])
        for t in targets:
            bad = k % 11 == 5
            cols["sample_id"].append(sid)
            cols["shard"].append(f"shard-{k // 50}")
            cols["key"].append(f"k{k}")
            cols["target"].append(None if bad else t)
            cols["status"].append("error" if bad else "ok")
            cols["error"].append(f"decode failed: sample {k}" if bad else
                                 ("warning: odd box" if k % 13 == 0 else ""))
            v = None if bad else rng.random(4)
            cols["deletion_auc"].append(None if bad or k % 17 == 0 else float(v[0]))
            # the same sample has nearby drops in every unit, so methods win and lose
            cols["average_drop"].append(None if bad else float(10 * ((k * 7919) % 97) / 97
                                                                + drop_shift * v[1]))
            cols["pointing_hit"].append(None if bad or k % 4 == 0 else bool(v[2] > 0.4))
            cols["gini"].append(None if bad else float(v[3]))
            cols["target_prob"].append(None if bad else 0.5)
            cols["saliency_min"].append(None if bad else float(-0.1 if k == 7 else 0.0))
            cols["gt_box_count"].append(None if bad or k % 5 == 0 else 1 + k % 2)
            made = not bad and k % 6 != 1
            cols["pseudo_box"].append({"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0} if made else None)
            cols["pseudo_box_match"].append(None if bad else bool(k % 3 == 0))
            cols["label_map_quality"].append(
                {"classes": [-1, t], "intersection": [10 + k % 4, k % 3], "union": [20, 5],
                 "valid_px": 40, "labelled_px": 30} if not bad and k % 9 == 2 else None)
            cols["deletion_curve"].append(None if bad else [float(x) for x in rng.random(5)])
    box = pa.struct([(c, pa.float32()) for c in ("x0", "y0", "x1", "y1")])
    lmq = pa.struct([("classes", pa.list_(pa.int32())), ("intersection", pa.list_(pa.int64())),
                     ("union", pa.list_(pa.int64())), ("valid_px", pa.int64()),
                     ("labelled_px", pa.int64())])
    types = {"target": pa.int32(), "pointing_hit": pa.bool_(), "gt_box_count": pa.int32(),
             "pseudo_box": box, "pseudo_box_match": pa.bool_(), "label_map_quality": lmq,
             "deletion_curve": pa.list_(pa.float32()), "deletion_auc": pa.float32()}
    return pa.table({c: pa.array(v, type=types.get(c)) for c, v in cols.items()})


def parts_of(table: pa.Table, cuts: list[int], keep: int = A.WAVE_SAMPLE) -> list[dict]:
    bounds = [0, *cuts, table.num_rows]
    return [A.of_table(table.slice(a, b - a), f"f{i}", keep)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def ok_values(table: pa.Table, name: str) -> np.ndarray:
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    v = np.asarray([np.nan if x is None else float(x) for x in table.column(name).to_pylist()])
    return v[ok]


def same_numbers(a, b) -> bool:
    """Equal structures, floats to 1e-9 relative."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_merging_is_associative_and_does_not_depend_on_how_rows_were_split():
    table = rows_table(120)
    a, b, c = parts_of(table, [70, 100])
    left = A.merge(A.merge(a, b), c)
    right = A.merge(a, A.merge(b, c))
    reordered = A.merge(c, A.merge(b, a))
    other_split = A.merge_all(parts_of(table, [13, 55, 90]))
    for x in (right, reordered, other_split):
        assert same_numbers({k: v for k, v in left.items() if k != "sample"},
                            {k: v for k, v in x.items() if k != "sample"})
        # the sample: the same rows (their file may differ with the split)
        assert [r[0:1] + r[2:] for r in left["sample"]["rows"]] == \
            [r[0:1] + r[2:] for r in x["sample"]["rows"]] or x is other_split
    whole = A.of_table(table, "f", A.UNIT_SAMPLE)
    assert [r[2:] for r in whole["sample"]["rows"]] == [r[2:] for r in other_split["sample"]["rows"]]
    assert left["rows"] == table.num_rows and left["complete"]


def test_summary_from_the_aggregate_is_the_exact_summary_on_small_data():
    table = rows_table(150)
    agg = A.merge_all(parts_of(table, [40, 41, 120]))
    s = summary_from_aggregate(agg)
    status = table.column("status").to_pylist()
    assert s["rows"] == table.num_rows and s["errors"] == sum(x != "ok" for x in status)
    for name in ("deletion_auc", "average_drop", "gini", "pointing_hit"):
        v = ok_values(table, name)
        exact = summarize(np.sort(v))  # the bootstrap on every ok value (order-free)
        got = s["metrics"][name]
        assert got["ci"] == "bootstrap" and got["n"] == exact["n"] and got["n_nan"] == exact["n_nan"]
        for k in ("mean", "ci_low", "ci_high"):
            assert got[k] == pytest.approx(exact[k], rel=1e-12), (name, k)
    ok = [x == "ok" for x in status]
    hits = [h for h, good in zip(table.column("pointing_hit").to_pylist(), ok) if good]
    classes = [t for t, good in zip(table.column("target").to_pylist(), ok) if good]
    assert s["pointing_accuracy_class_mean"] == pytest.approx(pointing_accuracy_per_class(hits, classes))
    exact_quality = quality_totals(label_quality(table.select(
        [c for c in QUALITY_COLUMNS if c in table.column_names])))
    assert exact_quality and exact_quality["boxes"] and exact_quality["masks"]
    assert same_numbers(s["label_quality"], exact_quality)


def test_a_large_unit_keeps_a_bounded_hash_selected_sample_and_an_exact_mean():
    table = rows_table(600)
    keep = 40
    agg = A.merge_all(parts_of(table, [100, 350, 500], keep=keep), keep=keep)
    ids = sorted({r[2 + agg["sample"]["cols"].index("sample_id")] for r in agg["sample"]["rows"]})
    every = sorted(set(table.column("sample_id").to_pylist()), key=lambda s: (A.sample_hash(s), s))
    assert not agg["complete"] and ids == sorted(every[:keep])  # the bottom-k of all samples
    v = ok_values(table, "gini")
    got = metric_summary(agg, "gini")
    boot = summarize(v)
    assert got["ci"] == "normal" and got["n"] == boot["n"]
    assert got["mean"] == pytest.approx(float(np.nanmean(v)), rel=1e-12)
    width = boot["ci_high"] - boot["ci_low"]
    assert abs(got["ci_low"] - boot["ci_low"]) < 0.15 * width
    assert abs(got["ci_high"] - boot["ci_high"]) < 0.15 * width
    lines: list[str] = []
    from salmap.pipeline.summary import print_summaries

    print_summaries({"m__a": {"summary": summary_from_aggregate(agg)}}, lines.append)
    assert any("*" in ln and "gini" not in ln for ln in lines[2:3])
    assert any(ln.startswith("* normal interval") for ln in lines)


def test_win_rate_is_exact_on_small_units_and_uses_the_shared_sample_on_large_ones():
    units = {"m__a": {"model": "m", "method": "a"}, "m__b": {"model": "m", "method": "b"}}
    ta, tb = rows_table(90, seed=1, drop_shift=3.0), rows_table(90, seed=2, drop_shift=3.0)
    aggs = {"m__a": A.merge_all(parts_of(ta, [30])), "m__b": A.merge_all(parts_of(tb, [60]))}
    got = run_win_percent(units, aggs)["m"]
    da = {(s, t): d for s, t, d in zip(*(ta.column(c).to_pylist() for c in ("sample_id", "target", "average_drop")))}
    db = {(s, t): d for s, t, d in zip(*(tb.column(c).to_pylist() for c in ("sample_id", "target", "average_drop")))}
    keys = sorted(set(da) & set(db), key=str)
    exact = win_percent({"a": [da[k] for k in keys], "b": [db[k] for k in keys]})
    assert got["exact"] and same_numbers({k: got[k] for k in exact}, exact)
    assert 0 < got["pairwise"]["a"]["b"] < 100
    small = {u: A.merge_all(parts_of(t, [30], keep=25), keep=25) for u, t in (("m__a", ta), ("m__b", tb))}
    sampled = run_win_percent(units, small)["m"]
    assert not sampled["exact"] and 0 < sampled["n"] < exact["n"]
    # the same 25 samples in both units: every pair whose targets match is compared
    ids = [{r[2] for r in small[u]["sample"]["rows"]} for u in small]
    assert ids[0] == ids[1] and len(ids[0]) == 25


def test_the_ledger_merges_record_aggregates_and_refolds_after_a_withdrawal(tmp_path):
    import pyarrow.parquet as pq

    store = Store.open(str(tmp_path / "run"))
    table = rows_table(80)
    ledger = Ledger(store)
    records = []
    for w, (a, b) in enumerate([(0, 40), (40, table.num_rows)]):
        key = f"data/m/a/w{w}/part-0.parquet"
        part = table.slice(a, b - a)
        store.write_bytes(key, b"")
        pq.write_table(part, store.path(key))
        rec = {"unit": "m__a", "wave": f"w{w}", "files": [key], "rows": part.num_rows,
               "errors": 0, "samples": 1, "shards": [f"s{w}"], "aggregate": A.of_table(part, key)}
        ledger.commit("m__a", rec)
        records.append(rec)
    exact = files_aggregate(store, [r["files"][0] for r in records])
    assert same_numbers(ledger_aggregates(store, ledger)["m__a"]["metrics"], exact["metrics"])
    assert same_numbers(unit_aggregates(store)["m__a"]["metrics"], exact["metrics"])
    # a record without an aggregate (an older run's): its files stand in for it
    old = dict(records[1])
    del old["aggregate"]
    store.write_json(commit_key("m__a", "w1"), old)
    assert same_numbers(unit_aggregates(store)["m__a"]["classes"], exact["classes"])
    ledger.uncommit("m__a", "w1", "data/m/a")
    assert not ledger.totals["m__a"].aggregated
    refolded = ledger_aggregates(store, ledger)["m__a"]
    assert refolded["rows"] == records[0]["rows"] == 40


def test_a_small_unit_whose_records_lost_rows_from_their_samples_is_aggregated_again(tmp_path):
    """Waves larger than a record's sample: the unit (small) is refolded from its rows, so its
    sample, interval and win rate are exact again; records read a chunk at a time."""
    import pyarrow.parquet as pq

    store = Store.open(str(tmp_path / "run"))
    table = rows_table(300)
    ledger = Ledger(store)
    files = []
    for w, (a, b) in enumerate([(0, 200), (200, table.num_rows)]):
        key = f"data/m/a/w{w}/part-0.parquet"
        part = table.slice(a, b - a)
        store.write_bytes(key, b"")
        pq.write_table(part, store.path(key))
        files.append(key)
        ledger.commit("m__a", {"unit": "m__a", "wave": f"w{w}", "files": [key],
                               "rows": part.num_rows, "errors": 0, "samples": 1,
                               "shards": [f"s{w}"], "aggregate": A.pack(A.of_table(part, key, 20))})
    assert not ledger.totals["m__a"].aggregate["complete"]
    for agg in (ledger_aggregates(store, ledger)["m__a"], unit_aggregates(store)["m__a"]):
        assert agg["complete"] and A.sample_samples(agg) == 300
        assert metric_summary(agg, "gini")["ci"] == "bootstrap"


def test_the_tracker_puts_its_files_aggregates_into_the_wave_record():
    from salmap.pipeline.plan import Wave
    from salmap.pipeline.tracker import WaveTracker

    table = rows_table(10)
    wave = Wave(["s.tar"])
    t = WaveTracker("m__a", "h", [wave])
    keys = [(s, "s", -1 if g is None else g, st) for s, g, st in
            zip(*(table.column(c).to_pylist() for c in ("sample_id", "target", "status")))]
    t.add_file("f0", keys[:7], A.of_table(table.slice(0, 7), "f0"))
    t.add_file("f1", keys[7:], A.of_table(table.slice(7), "f1"))
    t.add_marker("s", 10)
    (rec,) = t.ready()
    whole = A.of_table(table, "f")
    assert set(rec["aggregate"]) == {"v", "rows", "complete", "packed"}  # compact in the record
    got = A.unpack(rec["aggregate"])
    assert got["rows"] == table.num_rows and got["complete"]
    assert same_numbers(got["metrics"], whole["metrics"])
    t2 = WaveTracker("m__a", "h", [wave])
    t2.add_file("f0", keys)  # a file without an aggregate: the record carries none
    t2.add_marker("s", 10)
    assert "aggregate" not in t2.ready()[0]


def test_the_report_of_a_unit_larger_than_its_sample_says_what_is_sampled(tmp_path):
    """Counts and means over every row, the gallery over the sample, and the page says so."""
    from salmap.pipeline.report import render_pages
    from salmap.pipeline.rollup import committed_file_lists
    from test_export import UNIT, write_run

    run = write_run(str(tmp_path / "t"), waves=3, samples=8)
    store = Store.open(run)
    files = [f for _, rec in sorted(committed_file_lists(store)[UNIT].items()) for f in rec["files"]]
    full = files_aggregate(store, files)
    small = files_aggregate(store, files, keep=3)
    assert full["complete"] and not small["complete"] and full["rows"] == small["rows"]
    html = render_pages(run, aggregates={UNIT: small})["index.html"]
    assert f"{small['rows']} committed row(s)" in html
    assert "the samples with the smallest hash of their sample id" in html
    assert "3 of " in html  # how many samples the sample holds
    exact = render_pages(run, aggregates={UNIT: full})["index.html"]
    assert "smallest hash" not in exact and f"{full['rows']} committed row(s)" in exact


def test_read_batches_streams_the_committed_rows(tmp_path):
    from salmap.pipeline.read import read_batches, read_frame
    from test_export import write_run

    run = write_run(str(tmp_path / "t"))
    frames = list(read_batches(run, columns=["sample_id", "target"], batch_rows=5))
    whole = read_frame(run, columns=["sample_id", "target"])
    assert all(len(f) <= 5 for f in frames) and sum(len(f) for f in frames) == len(whole) == 18
    assert sorted(s for f in frames for s in f["sample_id"]) == sorted(whole["sample_id"])


def test_records_of_a_run_of_few_waves_carry_larger_samples():
    from salmap.pipeline.plan import Wave
    from salmap.pipeline.tracker import WaveTracker

    assert A.wave_sample_size(1, 8) == A.UNIT_SAMPLE  # one wave: the whole unit sample
    assert A.wave_sample_size(32, 8) == 2 * A.UNIT_SAMPLE // 4
    assert A.wave_sample_size(10_000, 8) == A.WAVE_SAMPLE  # many waves: the floor
    table = rows_table(300)
    keys = [(s, "s", -1 if g is None else g, st) for s, g, st in
            zip(*(table.column(c).to_pylist() for c in ("sample_id", "target", "status")))]
    for cap, complete in ((None, False), (A.wave_sample_size(1, 8), True)):
        t = WaveTracker("m__a", "h", [Wave(["s.tar"])], sample_cap=cap)
        for a in range(0, table.num_rows, 100):  # files of at most 100 rows, as post/write makes
            part = table.slice(a, 100)
            t.add_file(f"f{a}", keys[a:a + part.num_rows], A.of_table(part, f"f{a}"))
        t.add_marker("s", 300)
        got = A.unpack(t.ready()[0]["aggregate"])
        assert got["complete"] is complete
        assert A.sample_samples(got) == (300 if complete else A.WAVE_SAMPLE)
