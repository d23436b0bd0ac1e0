"""How many units at once, with how many actors: the run's pending work per unit, priced by
each method's declared cost or the rates earlier drivers of the run measured, handed to
:func:`salmap.pipeline.cluster.plan_pools` (the policy); the plan is recorded for the
manifest and the actor accounting.
"""

from __future__ import annotations

from .accounting import UnitAccounting
from .cluster import PoolPlan, plan_pools, refine_costs
from .config import split_metrics
from .decode import shard_name
from .driver import DriverState
from .plan import Unit, Wave


def plan_run(run: DriverState, todo: list[tuple[Unit, list[Wave]]], index: dict[str, int],
             previous: dict | None) -> PoolPlan:
    """Expected work per pending unit (images x work per image: the declared cost, or the rate
    earlier drivers of this run measured), then the pools; recorded for the manifest."""
    from salmap.workers.methods.cost import unit_cost

    cfg = run.cfg
    model_metrics = split_metrics(cfg)[0]
    known = [n for n in index.values() if n]
    mean_images = sum(known) / len(known) if known else 1.0
    images = {u.id: sum(index.get(shard_name(s)) or mean_images for w in waves for s in w.shards)
              for u, waves in todo}
    declared = {u.id: unit_cost(u.method.name, dict(u.method.params), model_metrics)
                for u, _ in todo}
    before = {uid: dict(v.get("actors") or {})
              for uid, v in ((previous or {}).get("units") or {}).items()}
    run.actors_before = {uid: a for uid, a in before.items() if a}
    measured = {uid: before.get(uid, {}).get("busy_s_per_image") for uid in declared}
    per_image = refine_costs(declared, measured)
    work = {uid: images[uid] * per_image[uid] for uid in declared}
    plan = plan_pools(cfg, work, declared)
    slots = plan.slots
    for u, _ in todo:
        measured_here = measured.get(u.id)
        run.pools[u.id] = {**plan.info[u.id], "images": round(images[u.id], 1),
                           "cost_per_image": round(declared[u.id], 3),
                           "measured_s_per_image": measured_here}
        acc_before = {k: v for k, v in before.get(u.id, {}).items()
                      if k in ("actors", "peak", "devices", "device_s", "busy_device_s", "samples")}
        run.accounting[u.id] = UnitAccounting(u.id, slots.resource, slots.per_actor, acc_before)
    run.extra["cluster"] = {
        "resource": slots.resource, "per_actor": slots.per_actor, "slots": slots.count,
        "total": slots.total, "reserved_cpus": slots.reserved_cpus,
        "actors_per_unit": cfg.resources.actors_per_unit,
        "units_in_parallel": plan.parallel, "order": plan.order, "peak_actors": 0,
    }
    return plan
