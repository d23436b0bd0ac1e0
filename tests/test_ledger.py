"""The commit protocol without Ray: cost per commit, the roll-up, resume checks, changed shards.

A commit must cost the same number of storage requests whatever came before (measured through
a counting filesystem), and the driver's memory must grow with committed shards, not rows.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import torch
from salmap.pipeline.config import ConfigError, load_config
from salmap.pipeline.ledger import (
    MANIFEST_KEY,
    Ledger,
    commit_key,
    committed_files,
    load_commits,
    remove_uncommitted,
    same_identity,
)
from salmap.pipeline.plan import units_of, waves_of
from salmap.pipeline.run import _Run, check_compatible, reconcile_changed_shards
from salmap.pipeline.storage_stats import counting_memory_store
from salmap.pipeline.tracker import WaveTracker


def _cfg(tmp_path, methods=("gradient",), **run):
    cfg = {"run": {"id": "r", "output": "mem://runs", "report": False, **run},
           "input": {"shards": ["/x/"]},
           "models": [{"name": "m", "source": "torchvision:resnet18", "weights": "none"}],
           "methods": [{"name": n} for n in methods]}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))
    return load_config(str(path))


def _names(n):
    return [f"s-{i:06d}" for i in range(n)]


def _commit_all(run, unit, shards, identity=None, per_wave=1):
    """Drive the real tracker and commit for ``shards`` (one sample each), as the execution
    would; return the storage requests of each commit."""
    waves = waves_of([f"/x/{s}.tar" for s in shards], per_wave)
    tracker = WaveTracker(unit.id, unit.config_hash, waves, identity or {})
    cost = []
    for w in waves:
        names = [s.rsplit("/", 1)[1][:-4] for s in w.shards]
        key = f"{unit.data_prefix}/{w.id}/part-0.parquet"
        run.store.write_bytes(key, b"x")
        tracker.add_file(key, [(f"{n}/0", n, 1, "ok") for n in names])
        for n in names:
            tracker.add_marker(n, 1)
        (rec,) = tracker.ready()
        before = dict(run.counts)
        run.commit(unit, rec)
        cost.append({k: run.counts[k] - before.get(k, 0) for k in run.counts
                     if run.counts[k] != before.get(k, 0)})
    return cost


def _run(tmp_path, cfg=None):
    cfg = cfg or _cfg(tmp_path)
    store, counts = counting_memory_store("mem://runs/r")
    run = _Run(cfg, "r", store, units_of(cfg), Ledger.load(store), 0, [], time.time(),
               out=lambda *a: None)
    run.counts = counts
    return run


def _history(store, unit, n_commits, shards_per_commit=8):
    """``n_commits`` commit records of a unit written straight to the store (a long run's
    history), quicker than committing them one by one."""
    for c in range(n_commits):
        names = [f"h-{c:06d}-{k}" for k in range(shards_per_commit)]
        store.write_json(commit_key(unit.id, f"w{c}"), {
            "unit": unit.id, "wave": f"w{c}", "config_hash": unit.config_hash, "shards": names,
            "shard_identity": {n: {"size": 1, "mtime_ns": 2} for n in names},
            "files": [f"{unit.data_prefix}/w{c}/part-0.parquet"], "rows": shards_per_commit,
            "errors": 0, "samples": shards_per_commit,
            "per_shard": {n: {"samples": 1, "rows": 1, "errors": 0} for n in names},
            "elapsed_s": 1.0, "committed_at": 0.0})


@pytest.mark.parametrize("history", [10, 1_000])
def test_a_commit_costs_two_puts_whatever_came_before(tmp_path, history):
    """The 11th and the 1,001st commit: one PUT for the record, one for the manifest; nothing
    is listed or re-read (the old protocol re-read every record after every wave), and the
    manifest holds totals (a list of the 8,002 committed shards' names would not fit in it)."""
    cfg = _cfg(tmp_path)
    store, counts = counting_memory_store("mem://runs/r")
    (unit,) = units_of(cfg)
    _history(store, unit, history)
    run = _Run(cfg, "r", store, units_of(cfg), Ledger.load(store), 8 * history + 2, [],
               time.time(), out=lambda *a: None)
    run.counts = counts
    costs = _commit_all(run, unit, _names(2))
    assert costs == [{"put": 2}, {"put": 2}]
    manifest = json.loads(run.store.read_bytes(MANIFEST_KEY))
    assert manifest["units"]["m__gradient"]["rows"] == 8 * history + 2
    assert manifest["units"]["m__gradient"]["shards_committed"] == 8 * history + 2
    assert len(run.store.read_bytes(MANIFEST_KEY)) < 8_000  # totals, not lists


def test_driver_memory_grows_with_committed_shards_not_with_rows_or_files(tmp_path):
    """The roll-up after 10 and after 1,000 commits of 8 shards (1,000 rows and 40 files
    each): a few hundred bytes per committed shard (its wave, its identity), nothing per row
    or file (keeping each record's 40 file names would add about 550 bytes per shard)."""
    grown = {}
    for n_commits in (10, 1_000):
        ledger = Ledger(store=None)  # type: ignore[arg-type]  # _apply does no I/O
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for c in range(n_commits):
            names = [f"s-{c:06d}-{k}" for k in range(8)]
            ledger._apply("m__g", {
                "wave": f"s-{c:06d}-0-8-0123abcd", "config_hash": "h", "shards": names,
                "shard_identity": {n: {"size": 10**9, "mtime_ns": 10**18} for n in names},
                "files": [f"data/m/g/w{c}/part-{f:020d}.parquet" for f in range(40)],
                "rows": 1000, "errors": 0, "samples": 1000, "elapsed_s": 1.0,
                "per_shard": {n: {"samples": 125, "rows": 125, "errors": 0} for n in names}})
        grown[n_commits] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    per_shard = grown[1_000] / 8_000
    assert per_shard < 600, grown  # bytes per committed shard
    assert grown[10] < 50_000, grown


def test_the_roll_up_survives_a_new_driver_and_the_reader_reads_each_record_once(tmp_path):
    run = _run(tmp_path)
    (unit,) = run.units
    _commit_all(run, unit, _names(20), per_wave=4)
    before = sum(run.counts.values())
    again = Ledger.load(run.store)
    assert sum(run.counts.values()) - before == 1 + 5  # one listing, five records
    assert again.totals[unit.id].rows == 20 and again.totals[unit.id].waves == 5
    assert set(again.committed(unit.id)) == set(_names(20))
    files = committed_files(load_commits(run.store), unit.id)
    assert len(files) == 5 and all(f.startswith("data/m/gradient/") for f in files)


def test_uncommitted_folders_are_removed_and_only_those(tmp_path):
    run = _run(tmp_path)
    (unit,) = run.units
    _commit_all(run, unit, _names(2))
    run.store.write_bytes(f"{unit.data_prefix}/orphan-wave/part-1.parquet", b"x")
    removed = remove_uncommitted(run.store, run.ledger, {unit.id: unit.data_prefix})
    assert removed == [f"{unit.data_prefix}/orphan-wave"]
    assert len(committed_files(load_commits(run.store))) == 2
    assert len(run.store.list(unit.data_prefix)) == 2


def test_only_committed_rows_pin_a_units_config(tmp_path):
    cfg = _cfg(tmp_path)
    run = _run(tmp_path, cfg)
    (unit,) = run.units
    other = _cfg(tmp_path, methods=("gradient",), map_dtype="float32")  # another unit hash
    shards = ["/x/s-000000.tar"]
    check_compatible("r", run.ledger, None, other, units_of(other), shards)  # nothing committed
    _commit_all(run, unit, _names(1), {"s-000000": {"size": 1, "mtime_ns": 1}})
    with pytest.raises(ConfigError, match="different config"):
        check_compatible("r", run.ledger, None, other, units_of(other), shards)
    check_compatible("r", run.ledger, None, cfg, units_of(cfg), shards)
    more = _cfg(tmp_path, methods=("gradient", "gradcam"))
    plan = {"shards": {"s-000000": {}}, "units": {unit.id: unit.config_hash}}
    with pytest.raises(ConfigError, match="new units m__gradcam"):
        check_compatible("r", run.ledger, plan, more, units_of(more), shards)
    with pytest.raises(ConfigError, match="1 new shard"):
        check_compatible("r", run.ledger, plan, cfg, units_of(cfg), [*shards, "/x/s-000009.tar"])
    # a unit planned by the interrupted run but not committed yet is not new
    plan["units"]["m__gradcam"] = "h"
    check_compatible("r", run.ledger, plan, more, units_of(more), shards)


def test_a_changed_shard_is_an_error_or_with_extend_is_withdrawn_and_redone(tmp_path):
    run = _run(tmp_path)
    (unit,) = run.units
    names = _names(4)
    identity = {n: {"size": 100, "mtime_ns": 5, "samples": 1} for n in names}
    _commit_all(run, unit, names, identity, per_wave=2)
    now = {**identity, "s-000003": {"size": 120, "mtime_ns": 9, "samples": 1}}
    said = []
    with pytest.raises(ConfigError) as err:
        reconcile_changed_shards(run.ledger, run.cfg, "r", now, said.append)
    msg = str(err.value)
    assert "s-000003 changed" in msg and "new run.id" in msg and "run.extend=true" in msg
    reconcile_changed_shards(run.ledger, run.cfg, "r", identity, said.append)  # unchanged: ok
    extend = _cfg(tmp_path, extend=True)
    reconcile_changed_shards(run.ledger, extend, "r", now, said.append)
    # the wave holding s-000003 (with s-000002) is withdrawn: record first, then its folder
    assert set(run.ledger.committed(unit.id)) == {"s-000000", "s-000001"}
    assert len(load_commits(run.store)[unit.id]) == 1
    assert run.ledger.totals[unit.id].rows == 2
    assert not any("s-000002" in k for k in run.store.list("data"))
    assert "1 wave(s) withdrawn" in said[-1]
    assert not run.store.exists(commit_key(unit.id, waves_of(
        ["/x/s-000002.tar", "/x/s-000003.tar"], 2)[0].id))


def test_identity_compares_size_mtime_and_indexed_count():
    a = {"size": 1, "mtime_ns": 2, "samples": 3}
    assert same_identity(a, dict(a))
    assert not same_identity(a, {**a, "size": 9})
    assert not same_identity(a, {**a, "mtime_ns": 9})
    assert not same_identity(a, {**a, "samples": 9})
    assert same_identity(a, {"size": 1, "mtime_ns": 2})  # no index now: not a change


@pytest.mark.parametrize("source, weights, size", [
    ("torchvision:resnet18", "none", None),
    ("torchvision:resnet18", "none", 64),
    ("torchvision:resnet18", "IMAGENET1K_V1", None),
    ("torchvision:vit_b_16", "DEFAULT", None),
    ("torchvision:efficientnet_b3", "DEFAULT", 200),
    ("efficientnet_lite0", None, None),
    ("efficientnet_lite0", None, 96),
])
def test_the_driver_knows_the_preprocessing_without_building_the_model(source, weights, size,
                                                                        monkeypatch):
    """preprocess_of agrees with what load_model returns (weights that would be downloaded
    are stubbed out: the driver never builds the model)."""
    import torchvision.models as tvm
    from salmap.workers.models import load_model
    from salmap.workers.preprocessing import preprocess_of

    got = preprocess_of(source, weights, size)
    if source.startswith("torchvision:") and weights != "none":
        # load_model would download the weights: build a stand-in model instead
        monkeypatch.setattr(tvm, "get_model", lambda arch, weights=None: torch.nn.Conv2d(3, 2, 1))
        import salmap.workers.methods.layers as layers

        monkeypatch.setattr(layers, "resolve_layer", lambda m, t: ("x", m))
    expected = load_model(source, weights, input_size=size).preprocess
    assert got == expected
