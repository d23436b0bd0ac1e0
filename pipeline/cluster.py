"""The Ray side of a run: starting or joining Ray, the Data context, and sizing the actor pools
against the cluster's resources (including what an autoscaling cluster may grow to).

The share policy (README "Resources: defaults and policy"): the cluster has ``slots`` actor
places (GPUs / ``gpus_per_actor``; without GPUs, the CPUs left after the CPU stages' share,
/ ``cpus_per_actor``). With ``actors_per_unit: auto`` each unit running gets a minimum pool of
slots in proportion to its expected work (:mod:`salmap.workers.methods.cost`, refined by rates
measured earlier in the run), and may grow to every slot as other units finish; units too
cheap for a slot of their own share "lanes", one after the other. The pure logic
(:func:`plan_shares`, :func:`apportion`, :func:`actor_slots`) needs no Ray.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .config import SalmapConfig, split_metrics
from .interrupt import reassert_sigterm_handler


def init_ray(cfg: SalmapConfig) -> None:
    """Connect to the config's Ray cluster or start a local one (once per process)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": cfg.ray.include_dashboard,
                              "dashboard_host": cfg.ray.dashboard_host,
                              "log_to_driver": False, "configure_logging": True,
                              "logging_level": logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False, logging_level=logging.WARNING)
        reassert_sigterm_handler()  # ray.init replaced it with its own
        return
    kwargs["address"] = "local"  # a fresh local instance, never a cluster found by accident
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    ray.init(**kwargs)
    reassert_sigterm_handler()


def configure_data_context(cfg: SalmapConfig) -> None:
    """Ray Data settings of a run: no silently dropped blocks, unordered output, progress bars as
    the config says."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # never drop rows silently: failures fail the wave
    ctx.execution_options.preserve_order = False
    ctx.max_consecutive_actor_init_deaths = 3
    bars = cfg.ray.progress == "bars"  # auto/lines: salmap's own lines (pipeline.progress)
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    ctx.print_on_execution_start = False
    try:
        ctx.execution_options.verbose_progress = False
    except AttributeError:
        pass


def cluster_resources() -> dict[str, float]:
    """The cluster's resources now, raised to the autoscaler's configured maximum where that is
    larger (GPU workers that scale from zero show up only there)."""
    import ray

    res = dict(ray.cluster_resources())
    try:
        from ray._private.state import state

        for key, value in (state.get_max_resources_from_cluster_config() or {}).items():
            res[key] = max(res.get(key, 0), value)
    except Exception:  # noqa: BLE001 - private API; absent on local instances
        pass
    return res


def gpus_per_actor(cfg: SalmapConfig, res: dict[str, float] | None = None) -> float:
    """GPUs one model actor holds: the config's number, or for ``auto`` 1 when the cluster has GPUs,
    else 0."""
    value = cfg.resources.gpus_per_actor
    if value == "auto":
        res = cluster_resources() if res is None else res
        return 1.0 if res.get("GPU", 0) > 0 else 0.0
    return float(value)


# -- the share policy (pure logic) ------------------------------------------------------------
#: CPU work per image of the CPU stages (read, decode, post + write), in forward+backward passes
#: of the cheapest shipped model (EfficientNet-Lite0) on a CPU: decode 0.035 + post and Parquet
#: 0.14-0.23 of a Lite0 F+B per ~500 px photo, measured (BENCHMARKS.md "Actor shares"), rounded
#: up for reading and task overhead; a larger model makes it relatively smaller
CPU_STAGE_WORK = 0.3


@dataclass(frozen=True)
class Slots:
    """Where actors go: ``count`` places of ``per_actor`` units of ``resource``."""

    resource: str  # "GPU" | "CPU"
    per_actor: float
    count: int
    total: float  # the cluster's amount of ``resource``
    reserved_cpus: float = 0.0  # CPUs kept for the CPU stages (CPU actors only)


def cpu_reserve(cpus: float, work_per_image: float) -> int:
    """CPUs kept for the read, decode and post tasks when actors run on CPUs: the CPU stages'
    share of the work per image (``CPU_STAGE_WORK`` against the actors' ``work_per_image``),
    at least one CPU (else the executions wait on each other forever), at most all but one."""
    if cpus <= 1:
        return 0
    share = CPU_STAGE_WORK / (CPU_STAGE_WORK + max(work_per_image, 1e-9))
    return int(min(cpus - 1, max(1, math.ceil(cpus * share))))


#: CPUs Ray Data reserves for an actor that asks for GPUs and no CPUs (its Python work)
GPU_ACTOR_CPUS = 1.0


def actor_slots(res: dict[str, float], gpus: float, cpus_per_actor: float,
                work_per_image: float = 1.0) -> Slots:
    """The actor places of a cluster with resources ``res`` (at least one). GPU actors: one
    per ``gpus`` GPUs, as long as their CPUs (:data:`GPU_ACTOR_CPUS` each) leave one CPU for
    the CPU stages; CPU actors: the CPUs left after :func:`cpu_reserve`, ``cpus_per_actor``
    each."""
    if gpus > 0:
        total = float(res.get("GPU", 0))
        cpus = float(res.get("CPU", 1))
        by_gpu = int(total // gpus + 1e-9)
        by_cpu = int(max(0.0, cpus - 1) // GPU_ACTOR_CPUS + 1e-9)
        return Slots("GPU", gpus, max(1, min(by_gpu, by_cpu)), total, 1.0 if cpus > 1 else 0.0)
    total = float(res.get("CPU", 1))
    reserve = cpu_reserve(total, work_per_image)
    count = int((total - reserve) // cpus_per_actor + 1e-9) if cpus_per_actor > 0 else 1
    return Slots("CPU", cpus_per_actor, max(1, count), total, reserve)


def apportion(weights: dict[str, float], total: int, minimum: int = 1) -> dict[str, int]:
    """Split ``total`` whole slots in proportion to ``weights``, each at least ``minimum``
    (largest remainders; ties to the heavier, then to the earlier). Needs
    ``total >= minimum * len(weights)``."""
    keys = list(weights)
    if not keys:
        return {}
    assert total >= minimum * len(keys), (total, minimum, len(keys))
    out = {k: minimum for k in keys}
    left = total - minimum * len(keys)
    w_sum = sum(max(0.0, weights[k]) for k in keys)
    if left <= 0:
        return out
    if w_sum <= 0:
        ideal = {k: total / len(keys) for k in keys}
    else:
        ideal = {k: total * max(0.0, weights[k]) / w_sum for k in keys}
    # raise the most under-served first: whole parts, then the largest remainders
    while left > 0:
        need = {k: ideal[k] - out[k] for k in keys}
        k = max(keys, key=lambda k: (need[k], weights[k], -keys.index(k)))
        out[k] += 1
        left -= 1
    return out


@dataclass
class SharePlan:
    """How units run: ``order`` (the order they start in), at most ``parallel`` at once, unit
    ``u`` with at least ``mins[u]`` actors; ``shares``: the ideal (fractional) slots."""

    order: list[str]
    mins: dict[str, int]
    parallel: int
    shares: dict[str, float] = field(default_factory=dict)
    lanes: int = 0  # slots shared, one unit after the other, by the units in ``queued``
    queued: list[str] = field(default_factory=list)


def plan_shares(work: dict[str, float], slots: int, max_parallel: int | None = None) -> SharePlan:
    """Cost-aware shares of ``slots`` actor places among units of expected ``work``.

    Unit u's ideal share is ``slots * work[u] / sum(work)``. Units whose share is at least one
    slot run from the start with a minimum pool of their share (rounded, at least 1); the
    others ("small") run one after the other in ``lanes``, as many as their summed share
    rounds to (at least 1), costliest first, each lane with its part of that share (1 slot
    unless ``max_parallel`` leaves fewer lanes than the small units' share). Started in ``order`` (big units first, then the
    small ones by decreasing work) on ``parallel`` = big units + lanes threads, every slot
    holds an actor from the start and no unit waits for a slot while another idles it.
    ``max_parallel`` caps the units running at once (``resources.units_in_parallel``).
    """
    units = sorted(work, key=lambda u: (-work[u], list(work).index(u)))
    slots = max(1, int(slots))
    cap = max(1, min(slots, max_parallel or slots, len(units)))
    total = sum(max(0.0, w) for w in work.values())
    shares = {u: (slots * max(0.0, work[u]) / total if total > 0 else slots / len(units))
              for u in units}
    if len(units) <= cap:  # everyone runs at once
        mins = apportion({u: shares[u] for u in units}, slots) if len(units) <= slots else \
            {u: 1 for u in units}
        return SharePlan(units, mins, len(units), shares)
    big = [u for u in units if shares[u] >= 1.0][: cap - 1]  # leave a thread for a lane
    small = [u for u in units if u not in big]
    small_share = sum(shares[u] for u in small)
    lanes = min(len(small), cap - len(big), max(1, round(small_share)))
    per_lane = max(1, min(round(small_share), slots - len(big)) // lanes)
    mins = apportion({u: shares[u] for u in big}, slots - lanes * per_lane) if big else {}
    mins.update({u: per_lane for u in small})
    return SharePlan(big + small, mins, len(big) + lanes, shares, lanes, small)


def refine_costs(declared: dict[str, float], measured: dict[str, float | None]) -> dict[str, float]:
    """Work per image of each unit for sharing: where earlier drivers of the run measured a
    rate (device-seconds per image), that; for the others, the declared cost (F+B units)
    converted to seconds with the median ratio measured / declared of the measured units.
    Without any measurement: the declared costs."""
    ratios = sorted(m / declared[u] for u, m in measured.items()
                    if m and m > 0 and declared.get(u, 0) > 0)
    if not ratios:
        return dict(declared)
    mid = len(ratios) // 2
    k = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {u: (measured[u] if measured.get(u) and measured[u] > 0 else c * k)
            for u, c in declared.items()}


# -- the plan of one run ------------------------------------------------------------------------
@dataclass
class PoolPlan:
    """Per unit: its pool (an int: fixed; (min, max): autoscaling) and the order and number
    of units at once; ``info`` goes into the manifest."""

    order: list[str]
    parallel: int
    actors: dict[str, int | tuple[int, int]]
    slots: Slots
    info: dict[str, dict] = field(default_factory=dict)
    note: str = ""


def plan_pools(cfg: SalmapConfig, work: dict[str, float], per_image: dict[str, float],
               res: dict[str, float] | None = None) -> PoolPlan:
    """The pools of a run's pending units (``work``: unit -> expected work; ``per_image``:
    unit -> work per image, for the CPU reserve) on a cluster with resources ``res``."""
    r = cfg.resources
    res = cluster_resources() if res is None else res
    units = list(work)
    total_images = sum(work[u] / per_image[u] for u in units if per_image.get(u))
    mean = sum(work.values()) / total_images if total_images else 1.0
    slots = actor_slots(res, gpus_per_actor(cfg, res), r.cpus_per_actor, mean)
    fixed_actors = r.actors_per_unit != "auto"
    fixed_parallel = r.units_in_parallel != "auto"
    note = ""
    if fixed_actors:
        n = int(r.actors_per_unit)
        fit = max(1, slots.count // n)
        if fixed_parallel:  # as before: config order, capped to what the cluster holds
            wanted = max(1, min(int(r.units_in_parallel), len(units)))
            parallel = min(wanted, fit)
            order = units
            if parallel < wanted:
                note = (f"running {parallel} unit(s) at once, not {wanted}: the cluster's "
                        f"{slots.resource}s hold no more pools of {n} actor(s)")
        else:
            parallel = max(1, min(len(units), fit))
            order = sorted(units, key=lambda u: -work[u])
        actors: dict[str, int | tuple[int, int]] = {u: n for u in units}
        info = {u: {"pool": n, "work": work[u]} for u in units}
        return PoolPlan(order, parallel, actors, slots, info, note)
    cap = None if not fixed_parallel else int(r.units_in_parallel)
    if cap is not None and cap > slots.count:
        note = (f"running at most {slots.count} unit(s) at once, not {cap}: each needs one of "
                f"the cluster's {slots.count} actor slot(s)")
    share = plan_shares(work, slots.count, cap)
    actors = {}
    info = {}
    for u in units:
        lo = share.mins[u]
        actors[u] = lo if lo >= slots.count else (lo, slots.count)
        info[u] = {"pool": list(actors[u]) if isinstance(actors[u], tuple) else actors[u],
                   "share": round(share.shares[u], 3), "work": work[u],
                   "lane": u in share.queued}
    return PoolPlan(share.order, share.parallel, actors, slots, info, note)


def units_that_fit(cfg: SalmapConfig, wanted: int, res: dict[str, float] | None = None,
                   work_per_image: float | None = None) -> int:
    """How many units with fixed pools of ``actors_per_unit`` actors may execute at once: each
    holds its pool for its whole execution, and the CPU stages keep their CPUs (at least
    one, or every execution waits on the others: a hang, not an error)."""
    res = cluster_resources() if res is None else res
    if work_per_image is None:
        work_per_image = job_work_per_image(cfg)
    n = 1 if cfg.resources.actors_per_unit == "auto" else int(cfg.resources.actors_per_unit)
    slots = actor_slots(res, gpus_per_actor(cfg, res), cfg.resources.cpus_per_actor,
                        work_per_image)
    return max(1, min(wanted, slots.count // n))


def job_work_per_image(cfg: SalmapConfig) -> float:
    """The mean expected work per image over the config's units (F+B units)."""
    from salmap.workers.methods.cost import unit_cost

    model_metrics = split_metrics(cfg)[0]
    costs = [unit_cost(m.name, dict(m.params), model_metrics) for m in cfg.methods]
    return sum(costs) / len(costs) if costs else 1.0
