"""The share policy, the cost model and the actor accounting, without Ray (fast)."""

from __future__ import annotations

import inspect
import json
import random

import numpy as np
import pytest
from salmap.pipeline.accounting import UnitAccounting, held_summary, job_peak, peak_concurrency
from salmap.pipeline.cluster import (
    actor_slots,
    apportion,
    cpu_reserve,
    plan_pools,
    plan_shares,
    refine_costs,
    units_that_fit,
)
from salmap.pipeline.config import ConfigError, load_config
from salmap.workers.methods import names
from salmap.workers.methods.cost import FORWARD, method_cost, metric_cost, unit_cost


# -- cost per image ------------------------------------------------------------------------------
def test_every_method_has_a_cost_and_the_costly_ones_are_orders_above_grad_cam():
    costs = {n: method_cost(n) for n in names()}
    assert all(c > 0 for c in costs.values())
    assert costs["gradcam"] == pytest.approx(FORWARD)
    assert costs["smoothgrad"] == 25 and costs["integrated_gradients"] == 50  # the defaults
    for heavy in ("scorecam", "dmbp", "hdm"):
        assert costs[heavy] > 100 * costs["gradcam"], heavy
    assert min(costs["hdm"], costs["dmbp"]) > costs["scorecam"] > costs["integrated_gradients"]
    # HDM's declared cost: stages x (1 + steps x masks) + 2, here 2 x (1 + 30 x 4) + 2 passes
    assert costs["hdm"] == pytest.approx(2 * (FORWARD + 30 * 4) + 2 * FORWARD)
    assert costs["dmbp"] == pytest.approx(FORWARD + (1 - FORWARD) * (4 * 100 + 3))  # steps=100


def test_cost_follows_params_and_the_defaults_in_the_signature(monkeypatch):
    assert method_cost("integrated_gradients", {"steps": 10}) == 10
    assert method_cost("hdm", {"stages": 1, "steps": 2, "benchmark_sizes": [4],
                               "auxiliary_sizes": [8, 16]}) == pytest.approx(3 * FORWARD + 2 * 3)
    assert method_cost("scorecam", channels=2047) == pytest.approx(2048 * FORWARD)
    from salmap.workers.methods.smoothgrad import SmoothGrad

    original = SmoothGrad.__init__
    sig = inspect.signature(original)
    changed = sig.replace(parameters=[p.replace(default=7) if p.name == "nsamples" else p
                                      for p in sig.parameters.values()])

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)

    init.__signature__ = changed
    monkeypatch.setattr(SmoothGrad, "__init__", init)
    assert method_cost("smoothgrad") == 7  # a changed default changes the estimate


def test_metric_and_unit_cost():
    assert metric_cost({}) == 0
    assert metric_cost({"deletion_auc": {}, "insertion_auc": {"steps": 10}}) == \
        pytest.approx((29 + 11) * FORWARD)
    assert metric_cost({"average_drop": {}, "confidence_increase": {}, "gini": {}}) == \
        pytest.approx(FORWARD)  # one masked forward for both; gini is a post metric
    assert unit_cost("gradient", {}, {"road": {}}) == pytest.approx(FORWARD + 1 + 18 * FORWARD)


# -- slots -----------------------------------------------------------------------------------------
def test_actor_slots_on_gpus_and_cpus():
    s = actor_slots({"GPU": 4, "CPU": 16}, 1.0, 1.0)
    assert (s.resource, s.count, s.per_actor) == ("GPU", 4, 1.0)
    assert actor_slots({"GPU": 4, "CPU": 16}, 0.5, 1.0).count == 8  # two actors per GPU
    # a GPU actor holds a CPU in Ray Data: one CPU stays for read, decode and write
    assert actor_slots({"GPU": 4, "CPU": 4}, 1.0, 1.0).count == 3
    assert actor_slots({"GPU": 1, "CPU": 16}, 0.5, 1.0).count == 2
    # CPU actors: the CPU stages keep their share of the work per image (at least one CPU)
    assert cpu_reserve(2, 20.0) == 1 and actor_slots({"CPU": 2}, 0, 1.0, 20.0).count == 1
    assert cpu_reserve(16, 100.0) == 1 and actor_slots({"CPU": 16}, 0, 1.0, 100.0).count == 15
    assert cpu_reserve(16, 0.3) == 8 and actor_slots({"CPU": 16}, 0, 1.0, 0.3).count == 8
    assert actor_slots({"CPU": 16}, 0, 2.0, 100.0).count == 7
    assert actor_slots({"CPU": 1}, 0, 1.0).count == 1


# -- shares ---------------------------------------------------------------------------------------
def test_apportion_is_proportional_with_a_floor():
    assert apportion({"a": 3.45, "b": 0.55}, 4) == {"a": 3, "b": 1}
    assert apportion({"a": 1, "b": 1, "c": 2}, 8) == {"a": 2, "b": 2, "c": 4}
    assert apportion({"a": 100, "b": 0.001, "c": 0.001}, 4) == {"a": 2, "b": 1, "c": 1}
    assert sum(apportion({"a": 1, "b": 1, "c": 1}, 4).values()) == 4
    assert apportion({"a": 0, "b": 0}, 4) == {"a": 2, "b": 2}


def test_two_units_share_four_gpus_by_cost():
    plan = plan_shares({"cheap": 24 * 1.33, "costly": 24 * 8.33}, 4)
    assert plan.mins == {"costly": 3, "cheap": 1}
    assert plan.order == ["costly", "cheap"] and plan.parallel == 2
    equal = plan_shares({"a": 5.0, "b": 5.0}, 4)
    assert equal.mins == {"a": 2, "b": 2}


def test_more_units_than_slots_the_cheap_ones_share_a_lane():
    work = {"g1": 1.0, "hdm": 241.0, "g2": 1.0, "g3": 1.0, "g4": 1.0, "g5": 1.0}
    plan = plan_shares(work, 4)
    assert plan.order[0] == "hdm" and plan.mins["hdm"] == 3
    assert plan.parallel == 2 and plan.lanes == 1 and set(plan.queued) == {"g1", "g2", "g3", "g4", "g5"}
    assert all(plan.mins[g] == 1 for g in plan.queued)
    ten = plan_shares({f"u{i}": 1.0 for i in range(10)}, 4)
    assert ten.parallel == 4 and all(m == 1 for m in ten.mins.values())
    one = plan_shares({"a": 3.0, "b": 1.0}, 1)
    assert one.parallel == 1 and one.order == ["a", "b"] and one.mins == {"a": 1, "b": 1}


def test_a_cap_on_units_at_once_gives_the_lanes_their_share():
    plan = plan_shares({c: 1.0 for c in "abcde"}, 8, max_parallel=2)
    assert plan.parallel == 2
    running = [plan.mins[u] for u in plan.order[:2]]
    assert sum(running) <= 8 and min(running) > 1  # not 7 + 1 for a fifth of the work


@pytest.mark.parametrize("seed", range(40))
def test_shares_never_overbook_and_follow_the_work(seed):
    rng = random.Random(seed)
    units = {f"u{i}": rng.choice([0.3, 1, 1.3, 8, 25, 171, 5401]) * rng.randint(1, 50)
             for i in range(rng.randint(1, 9))}
    slots = rng.randint(1, 12)
    cap = rng.choice([None, 1, 2, 3, 5])
    plan = plan_shares(units, slots, cap)
    assert sorted(plan.order) == sorted(units) and all(m >= 1 for m in plan.mins.values())
    assert 1 <= plan.parallel <= min(slots, cap or slots, len(units))
    # the units that start together fit, and later ones only take a finished unit's place
    started = plan.order[: plan.parallel]
    assert sum(plan.mins[u] for u in started) <= slots
    lane_min = max((plan.mins[u] for u in plan.queued), default=0)
    big = [u for u in plan.order if u not in plan.queued]
    assert sum(plan.mins[u] for u in big) + plan.lanes * lane_min <= slots
    if len(units) <= slots and cap is None:
        assert sum(plan.mins.values()) == slots  # every slot holds an actor from the start
        # within one slot of the share, less what the floor of 1 gave the units under a slot
        floor_gift = sum(1 - v for v in plan.shares.values() if v < 1)
        for u in units:
            if plan.shares[u] >= 1:
                assert plan.shares[u] - 1 - floor_gift - 1e-9 < plan.mins[u] < plan.shares[u] + 1
    works = sorted(units, key=units.get)
    for lo, hi in zip(works, works[1:]):  # more work never gets a smaller minimum pool
        if lo not in plan.queued and hi not in plan.queued:
            assert plan.mins[lo] <= plan.mins[hi]


def test_measured_rates_refine_the_declared_costs():
    declared = {"a": 1.0, "b": 10.0, "c": 100.0}
    assert refine_costs(declared, {}) == declared
    # a was measured at 0.5 s per image: b and c are scaled by 0.5 s per F+B unit
    assert refine_costs(declared, {"a": 0.5, "b": None}) == {"a": 0.5, "b": 5.0, "c": 50.0}
    got = refine_costs(declared, {"a": 0.5, "b": 2.0})  # ratios 0.5 and 0.2: median 0.35
    assert got["a"] == 0.5 and got["b"] == 2.0 and got["c"] == pytest.approx(35.0)


# -- the run's pools from the config ---------------------------------------------------------
def _cfg(*overrides: str):
    return load_config("configs/demo.yaml", ["resources.actors_per_unit=auto", *overrides])


def test_defaults_are_auto_and_fixed_settings_are_validated():
    from salmap.pipeline.config import ResourcesSection

    assert ResourcesSection().actors_per_unit == "auto" and ResourcesSection().units_in_parallel == "auto"
    cfg = _cfg("resources.units_in_parallel=2", "resources.gpus_per_actor=0.5")
    assert cfg.resources.units_in_parallel == 2 and cfg.resources.gpus_per_actor == 0.5
    for bad, why in [("resources.actors_per_unit=0", "whole number >= 1"),
                     ("resources.actors_per_unit=many", "'auto' or a whole number"),
                     ("resources.units_in_parallel=1.5", "whole number"),
                     ("resources.gpus_per_actor=1.5", "whole number"),
                     ("resources.gpus_per_actor=-1", ">= 0"),
                     ("resources.cpus_per_actor=0", "> 0")]:
        with pytest.raises(ConfigError, match=why):
            _cfg(bad)


def test_plan_pools_on_a_gpu_cluster():
    work = {"m__gradcam": 100 * 0.67, "m__scorecam": 100 * 171.3}
    per_image = {"m__gradcam": 0.67, "m__scorecam": 171.3}
    res = {"GPU": 8, "CPU": 64}
    plan = plan_pools(_cfg(), work, per_image, res)
    assert plan.slots.resource == "GPU" and plan.slots.count == 8 and plan.parallel == 2
    assert plan.actors == {"m__scorecam": (7, 8), "m__gradcam": (1, 8)}
    assert plan.order == ["m__scorecam", "m__gradcam"]
    assert plan.info["m__scorecam"]["pool"] == [7, 8]
    # fractional GPUs: twice the slots
    half = plan_pools(_cfg("resources.gpus_per_actor=0.5"), work, per_image, res)
    assert half.slots.count == 16 and half.actors["m__scorecam"] == (15, 16)
    # fixed pools: units at once from the slots; fixed both: as before (config order, capped)
    fixed = plan_pools(_cfg("resources.actors_per_unit=3"), work, per_image, res)
    assert fixed.actors == {"m__gradcam": 3, "m__scorecam": 3} and fixed.parallel == 2
    both = plan_pools(_cfg("resources.actors_per_unit=1", "resources.units_in_parallel=1"),
                      work, per_image, res)
    assert both.parallel == 1 and both.order == list(work) and both.actors["m__gradcam"] == 1
    capped = plan_pools(_cfg("resources.actors_per_unit=6", "resources.units_in_parallel=2"),
                        work, per_image, res)
    assert capped.parallel == 1 and "not 2" in capped.note


def test_plan_pools_on_two_cpus_is_one_unit_with_one_actor_as_before():
    work = {"e__gradient": 5 * 21.0, "e__gradcam": 5 * 20.3, "e__gradcam_pp": 5 * 20.3}
    plan = plan_pools(_cfg("resources.gpus_per_actor=0"), work, {u: 20.0 for u in work},
                      {"CPU": 2})
    assert plan.slots.count == 1 and plan.parallel == 1
    assert set(plan.actors.values()) == {1}  # a fixed pool of one: no autoscaling for nothing
    many = plan_pools(_cfg("resources.units_in_parallel=5", "resources.gpus_per_actor=0"),
                      work, {u: 20.0 for u in work}, {"CPU": 2})
    assert many.parallel == 1 and "not 5" in many.note
    assert units_that_fit(_cfg("resources.gpus_per_actor=0"), 8, {"CPU": 4}) == 3


# -- actor accounting ---------------------------------------------------------------------------
def test_peak_concurrency():
    assert peak_concurrency([]) == 0
    assert peak_concurrency([(0, 10), (1, 2), (3, 4), (5, 6)]) == 2
    assert peak_concurrency([(0, 1), (1, 2)]) == 2  # touching at an instant counts
    assert peak_concurrency([(0, 5), (1, 6), (2, 7), (6.5, 8)]) == 3


def test_held_summary_integrates_the_samples():
    assert held_summary([]) == {"device_s": 0.0, "peak": 0.0, "sampled_s": 0.0, "mean_share": None}
    got = held_summary([(10.0, 4, 4), (12.0, 3, 4), (13.0, 0, 4), (14.0, 0, 4)])
    assert got == {"device_s": 4 * 2 + 3 * 1 + 0, "peak": 4, "sampled_s": 4.0,
                   "mean_share": round(11 / 16, 4)}


def test_the_driver_accounting_does_not_grow_with_batches_or_samples():
    """A long run's accounting is bounded (issue 20): an actor's dedupe window keeps at most
    RECENT_BATCHES end times however many batches it ran (a batch split over two post
    batches still counts its time once), and the held-time sampler keeps running totals that
    equal held_summary over every sample, not the samples."""
    from salmap.pipeline.accounting import RECENT_BATCHES, HeldSampler

    acc = UnitAccounting("m__x", "CPU", 1.0)
    n = 10 * RECENT_BATCHES
    for i in range(n):
        split = ["a", "cpu", 0, 1_000 + 3 * i, 2, 1]
        acc.add([split, split])  # one batch whose rows came back in two post batches
    assert len(acc.actors["a"].recent) == RECENT_BATCHES
    s = acc.summary()
    assert s["samples"] == 2 * n and s["busy_device_s"] == pytest.approx(n * 0.002)

    rng = random.Random(0)
    samples = [(float(t), float(rng.randint(0, 4)), 4.0) for t in range(50_000)]
    sampler = HeldSampler("GPU")
    for sample in samples:
        sampler.add(*sample)
    assert sampler.summary() == pytest.approx(held_summary(samples))
    assert not [k for k, v in vars(sampler).items() if isinstance(v, (list, dict, set, tuple))
                and len(v) > 3], vars(sampler).keys()


def test_unit_accounting_from_batches_and_the_actor_table():
    acc = UnitAccounting("m__x", "GPU", 0.5, before={"actors": 2, "peak": 1, "device_s": 10.0,
                                                       "busy_device_s": 8.0, "samples": 20})
    # actor a: started at t=100 s, two batches ending at 102 and 104 (1 s each), the second
    # split over two post batches; actor b: one batch
    acc.add([["a", "cuda", 100_000, 102_000, 1000, 4], ["b", "cuda", 101_000, 103_000, 2000, 3]])
    acc.add([["a", "cuda", 100_000, 104_000, 1000, 2]])
    acc.add([["a", "cuda", 100_000, 104_000, 1000, 2]])
    s = acc.summary()
    assert s["actors"] == 2 + 2 and s["peak"] == 2 and s["samples"] == 20 + 4 + 3 + 2 + 2
    assert s["devices"] == {"cuda": 2}
    assert s["device_s"] == pytest.approx(10.0 + (4 + 2) * 0.5)
    assert s["busy_device_s"] == pytest.approx(8.0 + (1 + 1 + 2) * 0.5)
    # Ray's actor table: a lived until 110; c never got a batch but held its GPU 105..108
    acc.set_lifetimes({"a": (100.5, 110.0), "c": (105.0, 108.0)})
    s = acc.summary()
    assert s["actors"] == 5 and s["devices"] == {"cuda": 2, "none (no batch)": 1}
    assert s["device_s"] == pytest.approx(10.0 + (10 + 2 + 3) * 0.5)
    assert s["peak"] == 2
    other = UnitAccounting("m__y", "GPU", 0.5)
    other.set_lifetimes({"d": (102.5, 103.5)})
    assert job_peak([acc, other]) == 3


def test_the_actor_reports_itself_and_the_post_stage_groups_its_batches(monkeypatch):
    from conftest import jpeg_bytes
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.pipeline.execute import actor_entries
    from salmap.workers.actor import ActorSpec, Explainer
    from salmap.workers.columns import output_schema

    monkeypatch.setenv("SLEEPY_MS", "0")
    explainer = Explainer(ActorSpec(model={"name": "s", "source": "sleepy_model:sleepy_net",
                                           "input_size": 32}, method="gradient", device="cpu"))
    rows = [{"__key__": f"k{i}", "__url__": "/x/shard-0.tar", "jpg": jpeg_bytes(i)} for i in range(3)]
    spec = DecodeSpec(("jpg",), "cls", "json", 32, 37, 10**8)
    first, second = explainer(decode_batch(rows[:2], spec)), explainer(decode_batch(rows[2:], spec))
    for out in (first, second):
        assert set(out["actor_id"]) == {explainer.actor_id} and set(out["actor_device"]) == {"cpu"}
        assert (out["actor_start_ms"] == explainer.started_ms).all()
        assert (out["batch_end_ms"] >= explainer.started_ms).all() and (out["batch_ms"] >= 0).all()
    assert second["batch_end_ms"][0] >= first["batch_end_ms"][0]
    names = set(output_schema(32, 32).names)
    assert not {"actor_id", "actor_device", "actor_start_ms", "batch_end_ms", "batch_ms"} & names
    # one post batch holding both actor batches and a shard-end marker row
    merged = {k: np.concatenate([first[k], second[k]]) for k in first}
    merged["status"] = merged["status"].copy()
    merged["status"][0] = "shard_end"
    entries = json.loads(actor_entries(merged))
    assert sorted(e[-1] for e in entries) == [1, 1]  # the marker row is not a sample
    assert {tuple(e[:3]) for e in entries} == {(explainer.actor_id, "cpu", explainer.started_ms)}
    assert len({e[3] for e in entries}) == 2  # two batches, told apart by their end


def test_report_table_of_actors_per_unit():
    from types import SimpleNamespace

    from salmap.pipeline.report.page import actors_section

    actors = {"pool": [3, 4], "share": 3.45, "cost_per_image": 8.333, "actors": 3, "peak": 3,
              "device_s": 1234.5, "busy_device_s": 617.25, "busy_s_per_image": 1.2,
              "devices": {"cuda": 3}}
    units = [SimpleNamespace(model="m", method="smoothgrad", info={"actors": actors}),
             SimpleNamespace(model="m", method="gradient", info={"actors": {"pool": 2}}),
             SimpleNamespace(model="m", method="notrun", info={})]
    cluster = {"resource": "GPU", "per_actor": 1.0, "slots": 4, "units_in_parallel": 2,
               "peak_actors": 4}
    html = actors_section(SimpleNamespace(manifest={"cluster": cluster}, units=units))
    assert html.count("<tr><td>") == 2 and "notrun" not in html
    row = html.split("<tr><td>m</td><td>smoothgrad</td>")[1].split("</tr>")[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>") if ">" in c]
    assert cells == ["3–4", "3.45", "8.33", "3", "3", "1,234.5", "50", "1.200", "cuda: 3"]
    assert "4 actor slot(s) of 1.00 GPU each" in html and "at most 4 actor(s)" in html
    empty = actors_section(SimpleNamespace(manifest={}, units=units[2:]))
    assert "no actor accounting" in empty


def test_a_resumed_run_shares_by_the_rates_measured_before(tmp_path, monkeypatch):
    """Declared costs say SmoothGrad is 38x Grad-CAM; an earlier driver of the run measured
    Grad-CAM at 10x SmoothGrad's device-seconds per image: the resumed run follows the rates."""
    import salmap.pipeline.cluster as cluster
    from salmap.pipeline.ledger import Ledger
    from salmap.pipeline.plan import units_of, waves_of
    from salmap.pipeline.run import _Run, plan_run
    from salmap.pipeline.storage import Store

    monkeypatch.setattr(cluster, "cluster_resources", lambda: {"GPU": 8.0, "CPU": 64.0})
    cfg = load_config("configs/demo.yaml", [
        "metrics=[]", "methods=[{name: gradcam}, {name: smoothgrad}]",
        "resources.actors_per_unit=auto", "resources.gpus_per_actor=auto"])
    store = Store.open(str(tmp_path / "run"))
    units = units_of(cfg)
    shards = [f"/data/shard-{i:06d}.tar" for i in range(4)]
    index = {f"shard-{i:06d}": 100 for i in range(4)}
    todo = [(u, waves_of(shards, 2, None, index)) for u in units]

    def plan(previous):
        run = _Run(cfg, "r", store, units, Ledger(store), 4, [], 0.0, lambda *a: None)
        return run, plan_run(run, todo, index, previous)

    run, fresh = plan(None)
    cam, sg = (u.id for u in units)
    assert fresh.actors[sg] == (7, 8) and fresh.actors[cam] == (1, 8)
    assert run.pools[cam]["images"] == 400 and run.pools[cam]["measured_s_per_image"] is None
    assert run.extra["cluster"]["slots"] == 8 and run.accounting[sg].resource == "GPU"
    before = {"units": {cam: {"actors": {"busy_s_per_image": 1.0, "device_s": 50.0,
                                         "busy_device_s": 40.0, "samples": 40, "actors": 2}},
                        sg: {"actors": {"busy_s_per_image": 0.1}}}}
    run, resumed = plan(before)
    assert resumed.actors[cam] == (7, 8) and resumed.actors[sg] == (1, 8)
    assert run.pools[cam]["measured_s_per_image"] == 1.0
    summary = run.accounting[cam].summary()  # earlier drivers' figures carry over
    assert summary["device_s"] == 50.0 and summary["samples"] == 40 and summary["actors"] == 2


def test_actor_lifetimes_pick_the_units_actors_from_rays_table(monkeypatch):
    import ray
    from ray._private import state
    from salmap.pipeline.accounting import actor_lifetimes

    table = {
        "a1": {"ActorClassName": "MapWorker(MapBatches(Explainer[m__gradcam]))",
               "StartTime": 100_500, "EndTime": 110_000},
        "a2": {"ActorClassName": "MapWorker(MapBatches(_Decode)->MapBatches(Explainer[m__gradcam]))",
               "StartTime": 101_000, "EndTime": 0},  # alive, behind a fused stage
        "old": {"ActorClassName": "MapWorker(MapBatches(Explainer[m__gradcam]))",
                "StartTime": 50_000, "EndTime": 60_000},  # an earlier run in this process
        "other": {"ActorClassName": "MapWorker(MapBatches(Explainer[m__gradcam_pp]))",
                  "StartTime": 100_500, "EndTime": 110_000},
    }
    asked = {}
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: type("C", (), {"get_job_id": lambda self: "02000000"})())
    monkeypatch.setattr(state, "actors", lambda job_id=None: asked.setdefault("job", job_id) and table)
    got = actor_lifetimes("m__gradcam", since=100.0)
    assert got == {"a1": (100.5, 110.0), "a2": (101.0, None)}
    assert asked["job"] == ray.JobID.from_hex("02000000")  # this driver's job only
