"""The Ray side of a run: starting or joining Ray, the Data context, and sizing the actor pools
against the cluster's resources (including what an autoscaling cluster may grow to)."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import SalmapConfig
from .interrupt import reassert_sigterm_handler


def init_ray(cfg: SalmapConfig) -> None:
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


def gpus_per_actor(cfg: SalmapConfig) -> float:
    value = cfg.resources.gpus_per_actor
    if value == "auto":
        return 1.0 if cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(value)


def units_that_fit(cfg: SalmapConfig, wanted: int) -> int:
    """How many units may execute at once: each holds ``actors_per_unit`` actors for its whole
    execution, and one CPU must stay free for the read, decode and write tasks, or every
    execution waits on the others (a hang, not an error)."""
    res = cluster_resources()
    r = cfg.resources
    fit = wanted
    if r.cpus_per_actor > 0:
        fit = min(fit, int((res.get("CPU", 1) - 1) // (r.actors_per_unit * r.cpus_per_actor)))
    gpus = gpus_per_actor(cfg)
    if gpus > 0:
        fit = min(fit, int(res.get("GPU", 0) // (r.actors_per_unit * gpus)))
    return max(1, min(wanted, fit))
