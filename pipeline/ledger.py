"""The commit protocol and the run's roll-up: what makes output visible, exactly once, at a
cost per commit that does not grow with the run.

Layout under ``<run.output>/<run.id>/``::

    data/<model>/<method>/<wave id>/part-<hash>.parquet   rows, written by the pipeline's tasks
    _commits/<unit id>/<wave id>.json                      a wave's commit record, written LAST
    _plan.json                                             the run's shards and their identity
    manifest.json                                          a small roll-up, rewritten per commit
    _lock.json                                             one driver at a time (pipeline.lock)

A wave's rows are committed iff its commit record exists; the record lists its files, its
shards with their identity (size, modification time, indexed sample count) and the reconciled
counts. Readers that go through the commit records (``salmap read``, :func:`read_run`) never see
partial or duplicate data. A driver that starts work first deletes wave folders that have no
commit record (leftovers of a crashed attempt).

Costs: the driver reads the commit records once when it starts (one listing, parallel reads)
and keeps the roll-up in memory; a commit is two PUTs (its record and the manifest, which holds
per-unit totals only), whatever came before. Per-wave detail stays in the commit records.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .storage import Store

MANIFEST_KEY = "manifest.json"
PLAN_KEY = "_plan.json"
COMMITS = "_commits"
MANIFEST_FORMAT = 2
MAX_FAILURE_LINES = 200  # the manifest lists at most this many; the count is always exact


def commit_key(unit_id: str, wave_id: str) -> str:
    return f"{COMMITS}/{unit_id}/{wave_id}.json"


def load_commits(store: Store, threads: int = 16) -> dict[str, dict[str, dict]]:
    """unit id -> wave id -> commit record: one listing of ``_commits/`` and parallel reads."""
    sizes = {k: n for k, n in store.list_sizes(COMMITS).items()
             if k.endswith(".json") and len(k.split("/")) == 3}
    keys = list(sizes)
    if not keys:
        return {}
    with ThreadPoolExecutor(max(1, min(threads, len(keys)))) as pool:
        records = list(pool.map(lambda k: store.read_json(k, sizes[k]), keys))
    out: dict[str, dict[str, dict]] = {}
    for key, rec in zip(keys, records):
        _, unit_id, fname = key.split("/")
        out.setdefault(unit_id, {})[fname[:-5]] = rec
    return out


def committed_files(commits: dict[str, dict[str, dict]], unit_id: str | None = None) -> list[str]:
    """Relative keys of every committed Parquet file (optionally of one unit), in order."""
    files: list[str] = []
    for uid, waves in sorted(commits.items()):
        if unit_id is None or uid == unit_id:
            for _, rec in sorted(waves.items()):
                files.extend(rec["files"])
    return files


@dataclass
class UnitTotals:
    """The running totals of one unit, extended by each commit."""

    rows: int = 0
    errors: int = 0
    samples: int = 0
    waves: int = 0
    shards: int = 0
    elapsed_s: float = 0.0
    config_hash: str | None = None
    # pipeline.aggregate of the unit's committed rows, merged record by record; ``aggregated``
    # turns False when a record has none or one is withdrawn (a bottom-k sample cannot give
    # rows back): then the end of the run merges the unit's records again
    aggregate: dict | None = field(default=None, repr=False)
    aggregated: bool = True

    def add(self, record: dict, sign: int = 1) -> None:
        """Extend the totals by a commit record (``sign=-1``: take a withdrawn one out)."""
        if sign < 0 or "aggregate" not in record:
            self.aggregated, self.aggregate = False, None
        elif self.aggregated:
            from .aggregate import merge, unpack

            self.aggregate = merge(self.aggregate, unpack(record["aggregate"]))
        self.rows += sign * int(record["rows"])
        self.errors += sign * int(record["errors"])
        self.samples += sign * int(record["samples"])
        self.waves += sign
        self.shards += sign * len(record["shards"])
        self.elapsed_s += sign * float(record.get("elapsed_s", 0.0))
        if sign > 0:
            self.config_hash = record.get("config_hash", self.config_hash)


@dataclass
class Ledger:
    """A run's committed state in memory: loaded once from the commit records, extended by each
    commit this driver makes. Everything a plan, a resume check or the manifest needs."""

    store: Store
    totals: dict[str, UnitTotals] = field(default_factory=dict)
    # unit id -> shard name -> wave id that committed it
    shard_wave: dict[str, dict[str, str]] = field(default_factory=dict)
    # shard name -> identity recorded when it was committed (first record wins)
    identity: dict[str, dict] = field(default_factory=dict)
    # (unit id, shard name) -> why the shard was committed incomplete (truncated tar, ...)
    shard_failures: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, store: Store, commits: dict[str, dict[str, dict]] | None = None) -> Ledger:
        ledger = cls(store)
        for unit_id, waves in (load_commits(store) if commits is None else commits).items():
            for rec in waves.values():
                ledger._apply(unit_id, rec)
        return ledger

    def _apply(self, unit_id: str, record: dict) -> None:
        self.totals.setdefault(unit_id, UnitTotals()).add(record)
        waves = self.shard_wave.setdefault(unit_id, {})
        identities = record.get("shard_identity") or {}
        for shard in record["shards"]:
            waves[shard] = record["wave"]
            if shard in identities and shard not in self.identity:
                self.identity[shard] = identities[shard]
        for shard, info in (record.get("per_shard") or {}).items():
            if info.get("failure"):
                self.shard_failures[(unit_id, shard)] = info["failure"]

    # -- queries -----------------------------------------------------------------------
    def committed(self, unit_id: str) -> dict[str, str]:
        """shard name -> wave id, for the shards this unit has committed."""
        return self.shard_wave.get(unit_id, {})

    def committed_waves(self, unit_id: str) -> set[str]:
        return set(self.committed(unit_id).values())

    def changed_shards(self, current: dict[str, dict]) -> dict[str, tuple[dict, dict]]:
        """Committed shards whose identity differs now: name -> (recorded, current)."""
        changed = {}
        for name, now in current.items():
            old = self.identity.get(name)
            if old is not None and not same_identity(old, now):
                changed[name] = (old, now)
        return changed

    def failures(self) -> list[str]:
        return [f"{unit}: shard {shard} committed incomplete: {why}"
                for (unit, shard), why in sorted(self.shard_failures.items())]

    # -- changes -----------------------------------------------------------------------
    def commit(self, unit_id: str, record: dict) -> None:
        """Make one wave visible: write its commit record (one PUT), extend the roll-up."""
        self.store.write_json(commit_key(unit_id, record["wave"]), record)
        self._apply(unit_id, record)

    def uncommit(self, unit_id: str, wave_id: str, data_prefix: str) -> list[str]:
        """Withdraw a committed wave (its shard changed): the record goes first, then the rows.
        Returns the shards that become pending again."""
        record = self.store.read_json(commit_key(unit_id, wave_id))
        self.store.delete(commit_key(unit_id, wave_id))
        self.store.delete_dir(f"{data_prefix}/{wave_id}")
        if unit_id in self.totals:
            self.totals[unit_id].add(record, sign=-1)
        waves = self.shard_wave.get(unit_id, {})
        for shard in record["shards"]:
            waves.pop(shard, None)
            self.shard_failures.pop((unit_id, shard), None)
        return list(record["shards"])

    def forget_identity(self, shards: Iterable[str]) -> None:
        for s in shards:
            self.identity.pop(s, None)


def same_identity(old: dict, new: dict) -> bool:
    """Same size and modification time (and, where both were indexed, the same sample count)."""
    if old.get("size") != new.get("size"):
        return False
    if old.get("mtime_ns") is not None and new.get("mtime_ns") is not None \
            and old["mtime_ns"] != new["mtime_ns"]:
        return False
    if old.get("samples") is not None and new.get("samples") is not None \
            and old["samples"] != new["samples"]:
        return False
    return True


def remove_uncommitted(store: Store, ledger: Ledger, unit_prefixes: dict[str, str]) -> list[str]:
    """Delete wave folders that have no commit record; return what was removed."""
    removed = []
    for unit_id, prefix in unit_prefixes.items():
        done = ledger.committed_waves(unit_id)
        for d in store.list_dirs(prefix):
            if d.rsplit("/", 1)[-1] not in done:
                store.delete_dir(d)
                removed.append(d)
    return removed


def manifest(run_id: str, status: str, output: str, config: dict, config_hash: str,
             versions: dict, ledger: Ledger, units: dict[str, dict], shards_total: int,
             failures: list[str], started: float, extra: dict | None = None) -> dict:
    """The small roll-up: per-unit totals and pointers, never per-shard or per-file lists.

    ``units``: unit id -> its static fields (model, method, config_hash, data, summary, ...).
    """
    out_units = {}
    for uid, info in units.items():
        t = ledger.totals.get(uid, UnitTotals())
        failed = sum(1 for (u, _s) in ledger.shard_failures if u == uid)
        out_units[uid] = {
            **info,
            "rows": t.rows, "errors": t.errors, "samples": t.samples, "waves": t.waves,
            "shards_committed": t.shards, "shards_pending": max(0, shards_total - t.shards),
            "shards_incomplete": failed,
            "elapsed_s": round(t.elapsed_s, 3),
            "images_per_s": round(t.samples / t.elapsed_s, 3) if t.elapsed_s > 0 else None,
            "commits": f"{COMMITS}/{uid}/",
        }
    return {
        "run_id": run_id, "status": status, "salmap_format": MANIFEST_FORMAT, "output": output,
        "config": config, "config_hash": config_hash, "versions": versions,
        "shards_total": shards_total, "plan": PLAN_KEY, "units": out_units,
        "failures": failures[:MAX_FAILURE_LINES], "failures_total": len(failures),
        "started": started, "updated": time.time(),
        "read_rule": "committed rows = the files listed in _commits/<unit>/<wave>.json",
        **(extra or {}),
    }
