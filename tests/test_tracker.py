"""WaveTracker: when a wave of a streaming execution is complete and what its record says."""

from __future__ import annotations

import pytest
from salmap.pipeline.plan import Wave, waves_of
from salmap.pipeline.tracker import ReconcileError, WaveTracker


def _tracker(n_shards=4, per_wave=2, index=None, identity=None):
    shards = [f"/d/s-{i}.tar" for i in range(n_shards)]
    waves = waves_of(shards, per_wave)
    return WaveTracker("m__g", "h", waves, identity or {}, index or {}, clock=iter(range(100)).__next__), waves


def _keys(shard, n, start=0, target=1):
    return [(f"{shard}/{i}", shard, target, "ok") for i in range(start, start + n)]


def test_a_wave_is_ready_only_when_every_shard_has_its_marker_and_all_its_samples():
    t, waves = _tracker()
    t.add_file("f1", _keys("s-0", 2))
    t.add_marker("s-0", 3)
    t.add_file("f2", _keys("s-1", 1))
    t.add_marker("s-1", 1)
    assert t.ready() == []  # s-0 has rows for 2 of its 3 samples
    t.add_file("f3", _keys("s-0", 1, start=2))
    (rec,) = t.ready()
    assert rec["wave"] == waves[0].id and rec["shards"] == ["s-0", "s-1"]
    assert rec["files"] == ["f1", "f2", "f3"] and rec["rows"] == 4 and rec["samples"] == 4
    assert rec["per_shard"]["s-0"] == {"samples": 3, "rows": 3, "errors": 0}
    assert t.ready() == []  # handed out once
    assert [w.id for w in t.pending()] == [waves[1].id]


def test_markers_may_arrive_before_the_rows_and_several_rows_per_sample_count_once():
    t, waves = _tracker(n_shards=1, per_wave=1)
    t.add_marker("s-0", 2)
    assert t.ready() == []
    # topk:2 -> two rows per sample, one of them an error row
    t.add_file("f", [("s-0/0", "s-0", 1, "ok"), ("s-0/0", "s-0", 2, "ok"),
                     ("s-0/1", "s-0", 1, "ok"), ("s-0/1", "s-0", 2, "error")])
    (rec,) = t.ready()
    assert (rec["samples"], rec["rows"], rec["errors"]) == (2, 4, 1)
    assert t.samples_written == 2


def test_duplicates_foreign_shards_and_excess_samples_are_refused():
    t, _ = _tracker()
    t.add_file("f1", _keys("s-0", 1))
    with pytest.raises(ReconcileError, match="duplicate row"):
        t.add_file("f2", _keys("s-0", 1))
    with pytest.raises(ReconcileError, match="unexpected shard"):
        t.add_file("f3", _keys("other", 1))
    with pytest.raises(ReconcileError, match="several waves"):
        t.add_file("f4", _keys("s-1", 1, start=5) + _keys("s-2", 1))
    t2, _ = _tracker(n_shards=1, per_wave=1)
    t2.add_file("f", _keys("s-0", 3))
    t2.add_marker("s-0", 2)
    with pytest.raises(ReconcileError, match="held 2"):
        t2.ready()


def test_truncated_and_unreadable_shards():
    identity = {f"s-{i}": {"size": i, "mtime_ns": 7} for i in range(2)}
    t, _ = _tracker(n_shards=2, per_wave=2, identity=identity)
    t.add_file("f", _keys("s-0", 2))
    t.add_marker("s-0", 2, "shard truncated or corrupt after 2 sample(s): tarfile.ReadError: x")
    t.add_marker("s-1", 0, "cannot open the shard: FileNotFoundError", unreadable=True)
    (rec,) = t.ready()
    # the truncated shard is committed with its failure named; the unreadable one is not
    assert rec["shards"] == ["s-0"] and "tarfile.ReadError" in rec["per_shard"]["s-0"]["failure"]
    assert rec["unreadable"] == {"s-1": "cannot open the shard: FileNotFoundError"}
    assert rec["shard_identity"] == {"s-0": identity["s-0"]}
    assert t.unreadable() == {"s-1": "cannot open the shard: FileNotFoundError"}


def test_an_index_that_disagrees_with_the_shard_is_named_as_a_failure():
    t, _ = _tracker(n_shards=1, per_wave=1, index={"s-0": 5})
    t.add_file("f", _keys("s-0", 3))
    t.add_marker("s-0", 3)
    (rec,) = t.ready()
    assert "index (shards.json) lists 5" in rec["per_shard"]["s-0"]["failure"]


def test_elapsed_is_the_time_since_the_previous_commit():
    t, _ = _tracker(n_shards=2, per_wave=1)  # clock: 0 at start, then 1, 2, ...
    for s in ("s-0", "s-1"):
        t.add_file(f"f-{s}", _keys(s, 1))
        t.add_marker(s, 1)
    recs = t.ready()
    assert [r["elapsed_s"] for r in recs] == [1, 1]


def test_waves_cap_shards_and_indexed_samples():
    shards = [f"/d/s-{i}.tar" for i in range(7)]
    assert [len(w.shards) for w in waves_of(shards, 3)] == [3, 3, 1]
    index = {f"s-{i}": 40 for i in range(7)}
    assert [len(w.shards) for w in waves_of(shards, 8, max_samples=100, index=index)] == [2, 2, 2, 1]
    big = {"s-0": 500}
    assert [len(w.shards) for w in waves_of(shards[:2], 8, max_samples=100, index=big)] == [1, 1]
    # a wave's id is a function of its shards' names only
    assert Wave(["/a/s-0.tar", "/a/s-1.tar"]).id == Wave(["s3://b/s-1.tar", "/x/s-0.tar"]).id


def test_rows_without_the_shard_end_marker_are_not_enough():
    t, _ = _tracker(n_shards=2, per_wave=2)
    t.add_file("f0", _keys("s-0", 2))
    t.add_marker("s-0", 2)
    t.add_file("f1", _keys("s-1", 2))  # s-1's reader has not said it is done
    assert t.ready() == []
    t.add_marker("s-1", 2)
    assert len(t.ready()) == 1



def test_small_shards_are_read_several_per_task_big_ones_one_each():
    from salmap.pipeline.execute import read_groups

    waves = waves_of([f"/d/s-{i}.tar" for i in range(10)], 8)
    small = {f"s-{i}": {"size": 10_000} for i in range(10)}
    assert [len(g) for g in read_groups(waves, small)] == [8, 2]  # one task per wave
    big = {f"s-{i}": {"size": 2**30} for i in range(10)}
    assert [len(g) for g in read_groups(waves, big)] == [1] * 10
    mixed = {**small, "s-1": {"size": 2**30}}
    assert [len(g) for g in read_groups(waves, mixed)] == [2, 6, 2]
    assert [len(g) for g in read_groups(waves, {})] == [1] * 10  # sizes unknown: one each
    assert [s for g in read_groups(waves, small) for s in g] == [s for w in waves for s in w.shards]
