"""Resume checks and the run's plan: what a run id already holds must fit this config (the
same units' settings, unchanged shards, unless ``run.extend``), and ``_plan.json`` records
every shard and unit the run has planned so that a resumed run can tell new work from old.
"""

from __future__ import annotations

import datetime as dt
import time

from salmap.workers.unit_id import data_prefix

from .config import ConfigError, SalmapConfig
from .decode import shard_name
from .driver import public_config
from .ledger import PLAN_KEY, Ledger
from .plan import Unit
from .storage import Store


def check_compatible(run_id: str, ledger: Ledger, plan: dict | None, cfg: SalmapConfig,
                     units: list[Unit], shards: list[str], previous: dict | None = None) -> None:
    """Same run id, different work: refuse unless run.extend says new units/shards are fine.
    Only committed rows pin a unit's config: a run that committed nothing can be retried with
    a fixed config under the same id. ``previous``: the run's manifest, whose config names the
    keys that changed."""
    from .config_diff import changed_keys

    for u in units:
        old = ledger.totals.get(u.id)
        if old and old.waves and old.config_hash != u.config_hash:
            keys = changed_keys((previous or {}).get("config"), public_config(cfg), u.id)
            what = (f"changed: {'; '.join(keys)}" if keys else
                    "the earlier config is not in the manifest to name the keys")
            raise ConfigError(
                f"run {run_id!r} has committed rows of unit {u.id} made with a different config "
                f"({what}; hash {old.config_hash} vs {u.config_hash}); use a new run.id, or "
                "restore the original values to resume")
    if not any(t.waves for t in ledger.totals.values()):
        return
    planned = set((plan or {}).get("units", {}))
    new_units = [u.id for u in units if not ledger.totals.get(u.id) and u.id not in planned]
    old_shards = set((plan or {}).get("shards", {})) | set(ledger.identity)
    new_shards = [shard_name(s) for s in shards if shard_name(s) not in old_shards]
    if (new_units or new_shards) and not cfg.run.extend:
        what = []
        if new_units:
            what.append(f"new units {', '.join(new_units)}")
        if new_shards:
            what.append(f"{len(new_shards)} new shard(s) (e.g. {new_shards[0]})")
        raise ConfigError(
            f"run {run_id!r} exists and this config adds {' and '.join(what)}; "
            "pass run.extend=true to add them to the run, or use a new run.id")


def reconcile_changed_shards(ledger: Ledger, cfg: SalmapConfig, run_id: str,
                             identity: dict[str, dict], out) -> None:
    """A committed shard rewritten under the same name is never skipped silently: a config
    error naming it, or with run.extend=true its waves are withdrawn and redone."""
    changed = ledger.changed_shards(identity)
    if not changed:
        return
    name, (old, new) = next(iter(sorted(changed.items())))
    if not cfg.run.extend:
        raise ConfigError(
            f"run {run_id!r}: shard {name} changed since it was committed (size {old.get('size')} "
            f"-> {new.get('size')}, modified {_when(old)} -> {_when(new)})"
            + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
            + "; its rows would be stale. Use a new run.id, or pass run.extend=true to redo the "
            "changed shard(s) under this run")
    prefixes = {unit_id: data_prefix(unit_id) for unit_id in ledger.shard_wave}
    withdrawn = 0
    for unit_id, waves in list(ledger.shard_wave.items()):
        for wave_id in sorted({waves[s] for s in changed if s in waves}):
            ledger.uncommit(unit_id, wave_id, prefixes[unit_id])
            withdrawn += 1
    ledger.forget_identity(changed)
    out(f"salmap: {len(changed)} shard(s) changed since they were committed "
        f"(e.g. {name}); run.extend=true: {withdrawn} wave(s) withdrawn and redone")


def _when(identity: dict) -> str:
    ns = identity.get("mtime_ns")
    if ns is None:
        return "?"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_plan(store: Store, before: dict | None, shards: list[str], identity: dict,
                units: list[Unit]) -> None:
    """``_plan.json``: every shard and unit the run has planned (this config's and earlier
    ones'), so that a resumed run can tell new work from old."""
    planned = dict((before or {}).get("shards", {}))
    for s in shards:
        planned[shard_name(s)] = {"url": s, **identity.get(shard_name(s), {})}
    planned_units = {**(before or {}).get("units", {}), **{u.id: u.config_hash for u in units}}
    if planned != (before or {}).get("shards") or planned_units != (before or {}).get("units"):
        store.write_json(PLAN_KEY, {"shards": planned, "units": planned_units,
                                    "updated": time.time()})
