"""The commit protocol and the run's roll-up: what makes output visible, exactly once, at a
cost per commit that does not grow with the run.

Layout under ``<run.output>/<run.id>/``::

    data/<model>/<method>/<wave id>/part-<hash>.parquet   rows, written by the pipeline's tasks
    _commits/<unit id>/<wave id>.g<N>.json                 a wave's commit record, written LAST
                                                           by the driver of generation N
    _commits/_generations/g<N>                             generation N's start: the records
                                                           it adopted (JSON; not a record)
    _plan.json                                             the run's shards and their identity
    manifest.json                                          a small roll-up, rewritten per commit
    _lock.json                                             one driver at a time (pipeline.lock)

A wave's rows are committed iff a commit record of it *counts*; the record lists its files, its
shards with their identity (size, modification time, indexed sample count) and the reconciled
counts. Readers that go through the commit records (``salmap read``, :func:`read_run`) never see
partial or duplicate data. A driver that starts work first deletes wave folders that have no
commit record (leftovers of a crashed attempt).

Fencing. Each driver has a generation N, carried by the run's lock (:mod:`salmap.pipeline.lock`:
one more than the lock it took over, at least one more than any generation started). At its
start (:func:`start_ledger`) it creates ``_commits/_generations/g<N>`` (conditionally: one
driver per N) listing the records that count then, deletes the others, and writes its records
as ``<wave>.g<N>.json``. A record counts when it is of the newest generation or adopted by it
(:func:`list_records`; per wave the newest such). A driver paused between its lock check and
its record write, that resumes after a successor started, therefore writes a record that
never counts (and is never read by anyone, deleted by the next start), whatever the successor
did with that wave. Records without a generation (``<wave>.json``, a ledger used outside a
locked run) count while no generation has started.

Costs: the driver reads the commit records once when it starts (one listing, one GET per
record in parallel, one GET of the newest adoption list when older generations' records are
there; plus one listing of ``_generations/`` and one conditional PUT to start its generation)
and keeps the roll-up in memory; a commit is two single PUTs (its record, created
conditionally so that it never replaces another, and the manifest, which holds per-unit
totals only) plus the run lock's check, whatever came before: three requests. Per-wave detail stays in the
commit records (:mod:`salmap.pipeline.commit_record`: the one reader and writer, validated on load).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .commit_record import (
    COMMITS,
    GENERATIONS,
    CommitRecord,
    DamagedRecord,
    commit_key,
    decode_record,
    encode_record,
    generation_key,
    parse_commit_key,
    parse_generation_key,
)
from .lock import LockLost
from .storage import Store

__all__ = ["COMMITS", "GENERATIONS", "commit_key", "parse_commit_key"]

MANIFEST_KEY = "manifest.json"
PLAN_KEY = "_plan.json"
MANIFEST_FORMAT = 2
MAX_FAILURE_LINES = 200  # the manifest lists at most this many; the count is always exact


@dataclass
class RecordIndex:
    """What one listing of ``_commits/`` says: the record readers use for each wave (the newest
    one a generation vouches for), the records nobody vouches for, and the newest generation."""

    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # unit -> wave -> key
    sizes: dict[str, int] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    generation: int = 0  # the newest generation that started on this run (0: none)


def list_records(store: Store) -> RecordIndex:
    """Which commit records count: one listing of ``_commits/`` and, only when records of
    older generations are there, one read of the newest generation's adoption list.

    A record of generation ``g`` counts when ``g`` is the newest generation, or when the
    newest generation adopted it at its start; every other record was written by a driver
    that had lost the run's lock after its successor started (or was superseded by a newer
    record of its wave) and is ignored. Records without a generation (``<wave>.json``: ledgers
    outside a locked run) count while no generation has started."""
    listed = store.list_sizes(COMMITS)
    generations = [g for g in map(parse_generation_key, listed) if g is not None]
    newest = max(generations, default=0)
    found: list[tuple[str, str, int, str]] = []
    for key in listed:
        parsed = parse_commit_key(key)
        if parsed is not None:
            found.append((*parsed, key))
    adopted: dict[str, dict[str, int]] = {}
    if newest and any(g < newest for _, _, g, _ in found):
        adopted = read_generation(store, newest).get("adopted", {})
    index = RecordIndex(generation=newest)
    best: dict[tuple[str, str], tuple[int, str]] = {}
    for unit_id, wave_id, g, key in found:
        if g == newest or adopted.get(unit_id, {}).get(wave_id) == g:
            had = best.get((unit_id, wave_id))
            if had is None or g > had[0]:
                if had is not None:
                    index.stale.append(had[1])
                best[(unit_id, wave_id)] = (g, key)
                continue
        index.stale.append(key)
    for (unit_id, wave_id), (_, key) in sorted(best.items()):
        index.keys.setdefault(unit_id, {})[wave_id] = key
        index.sizes[key] = listed[key]
    index.stale.sort()
    return index


def read_generation(store: Store, generation: int) -> dict:
    """A generation's adoption list (``{"generation", "owner", "adopted": {unit: {wave: g}}}``)."""
    key = generation_key(generation)
    raw = store.read_bytes(key)
    try:
        info = json.loads(raw.decode("utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("adopted", {}), dict):
            raise ValueError("not an object with an 'adopted' map")
    except (UnicodeDecodeError, ValueError) as err:
        raise DamagedRecord(store.url(key), f"the generation's adoption list is unreadable "
                                            f"({err})") from None
    return info


def next_generation(store: Store) -> int:
    """One more than every generation started on this run (a listing of its adoption lists):
    the floor of the generation a driver takes with the run's lock."""
    listed = store.list(GENERATIONS)
    return max((g for g in map(parse_generation_key, listed) if g is not None), default=0) + 1


class GenerationTaken(LockLost):
    """Another driver started the same generation (this one lost the run's lock)."""


def begin_generation(store: Store, generation: int, owner: str = "",
                     out: Callable[[str], None] | None = None) -> RecordIndex:
    """Start this driver's generation (right after it took the run's lock with it): adopt the
    records that count now, in one conditional create of the generation's adoption list, then
    delete the records that do not count. From then on a record of an older generation that
    lands (a driver that lost the lock, paused between its lock check and its record write)
    is ignored by every reader. Returns the index the driver loads (:func:`load_commits`)."""
    index = list_records(store)
    if index.generation >= generation:
        raise GenerationTaken(f"generation {generation} of this run is not newer than the "
                              f"newest one started ({index.generation}): another driver took "
                              "the run's lock; run again to resume")
    adopted = {u: {w: parse_commit_key(k)[2] for w, k in waves.items()}  # type: ignore[index]
               for u, waves in index.keys.items()}
    body = json.dumps({"generation": generation, "owner": owner, "started": time.time(),
                       "adopted": adopted}, sort_keys=True).encode()
    if not store.create_exclusive(generation_key(generation), body):
        raise GenerationTaken(f"generation {generation} of this run was started by another "
                              "driver (this one lost the run's lock); run again to resume")
    for key in index.stale:
        store.delete(key)
    if index.stale and out is not None:
        out(f"salmap: removed {len(index.stale)} stale commit record(s) of drivers that had lost "
            f"the run's lock (e.g. {store.url(index.stale[0])})")
    index.stale, index.generation = [], generation
    return index


def start_ledger(store: Store, generation: int, owner: str = "",
                 out: Callable[[str], None] | None = None
                 ) -> tuple[Ledger, dict[str, dict[str, CommitRecord]]]:
    """A driver's start, right after it took the run's lock with ``generation``: begin the
    generation (:func:`begin_generation`), read the records that count, and the ledger that
    writes this generation's records."""
    commits = load_commits(store, index=begin_generation(store, generation, owner, out))
    ledger = Ledger.load(store, commits)
    ledger.generation = generation
    return ledger, commits


def load_commits(store: Store, threads: int = 16, index: RecordIndex | None = None
                 ) -> dict[str, dict[str, CommitRecord]]:
    """unit id -> wave id -> commit record: the records that count (:func:`list_records`),
    one read per record (in parallel), each validated
    (:func:`salmap.pipeline.commit_record.decode_record`); a shard committed by two records of
    a unit is damage too. Raises :class:`DamagedRecord`."""
    index = list_records(store) if index is None else index
    keys = [k for waves in index.keys.values() for k in waves.values()]
    if not keys:
        return {}

    def read(key: str) -> dict:
        return decode_record(store.read_bytes(key, index.sizes.get(key)), key, store.url(key))

    with ThreadPoolExecutor(max(1, min(threads, len(keys)))) as pool:
        records = list(pool.map(read, keys))
    out: dict[str, dict[str, CommitRecord]] = {}
    for rec in records:
        out.setdefault(rec.unit, {})[rec.wave] = rec
    for waves in out.values():
        seen: dict[str, str] = {}
        for wave_id, rec in waves.items():
            for shard in rec.shards:
                if shard in seen:
                    raise DamagedRecord(
                        store.url(record_key(rec)),
                        f"shard {shard} is committed by it and by "
                        f"{store.url(record_key(waves[seen[shard]]))} too (its rows would be "
                        "read twice)")
                seen[shard] = wave_id
    return out


def record_key(record: CommitRecord) -> str:
    """Where a (loaded or written) record is stored."""
    return commit_key(record.unit, record.wave, record.generation)


def committed_files(commits: dict[str, dict[str, CommitRecord]], unit_id: str | None = None) -> list[str]:
    """Relative keys of every committed Parquet file (optionally of one unit), in order."""
    files: list[str] = []
    for uid, waves in sorted(commits.items()):
        if unit_id is None or uid == unit_id:
            for _, rec in sorted(waves.items()):
                files.extend(rec.files)
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

    def add(self, record: CommitRecord, sign: int = 1) -> None:
        """Extend the totals by a commit record (``sign=-1``: take a withdrawn one out)."""
        if sign < 0 or record.aggregate is None:
            self.aggregated, self.aggregate = False, None
        elif self.aggregated:
            from .aggregate import merge, unpack

            self.aggregate = merge(self.aggregate, unpack(record.aggregate))
        self.rows += sign * record.rows
        self.errors += sign * record.errors
        self.samples += sign * record.samples
        self.waves += sign
        self.shards += sign * len(record.shards)
        self.elapsed_s += sign * float(record.elapsed_s)
        if sign > 0:
            self.config_hash = record.config_hash or self.config_hash


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
    # unit id -> how many of its shards are in shard_failures (kept as they change)
    failed_shards: dict[str, int] = field(default_factory=dict)
    # the driver's check that it still holds the run's lock, run when a record exists already
    fence: Callable[[], None] | None = None
    # held while the roll-up changes (the driver's lock over its in-memory state)
    guard: Any = field(default_factory=contextlib.nullcontext)
    # the generation this driver writes its records with (begin_generation); 0: outside a
    # locked run (records named <wave>.json, no generation)
    generation: int = 0
    # unit id -> wave id -> generation of the record that committed it
    wave_generation: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, store: Store, commits: dict[str, dict[str, CommitRecord]] | None = None) -> Ledger:
        ledger = cls(store)
        for unit_id, waves in (load_commits(store) if commits is None else commits).items():
            for rec in waves.values():
                ledger._apply(unit_id, rec)
        return ledger

    def _apply(self, unit_id: str, record: CommitRecord | Mapping[str, Any]) -> None:
        if not isinstance(record, CommitRecord):
            record = CommitRecord.from_dict({"unit": unit_id, **record})
        self.totals.setdefault(unit_id, UnitTotals()).add(record)
        self.wave_generation.setdefault(unit_id, {})[record.wave] = record.generation
        waves = self.shard_wave.setdefault(unit_id, {})
        identities = record.shard_identity
        for shard in record.shards:
            waves[shard] = record.wave
            if shard in identities and shard not in self.identity:
                self.identity[shard] = identities[shard]
        for shard, why in record.failures.items():
            self._set_failure(unit_id, shard, why)

    def _set_failure(self, unit_id: str, shard: str, why: str | None) -> None:
        had = (unit_id, shard) in self.shard_failures
        if why is None:
            self.shard_failures.pop((unit_id, shard), None)
        else:
            self.shard_failures[(unit_id, shard)] = why
        now = (unit_id, shard) in self.shard_failures
        if had != now:
            self.failed_shards[unit_id] = self.failed_shards.get(unit_id, 0) + (1 if now else -1)

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

    def first_failures(self, n: int) -> list[str]:
        """Up to ``n`` failure lines in the order they were found: the running manifest's
        list, at a cost that does not grow with the failures (the count is
        ``len(shard_failures)``)."""
        return [f"{unit}: shard {shard} committed incomplete: {why}"
                for (unit, shard), why in itertools.islice(self.shard_failures.items(), n)]

    # -- changes -----------------------------------------------------------------------
    def commit(self, unit_id: str, record: CommitRecord | Mapping[str, Any]) -> CommitRecord:
        """Make one wave visible: create its commit record (one conditional PUT: it never
        replaces a record), then extend the roll-up (under ``guard``); returns the record now
        committed.

        When the record exists already: the same bytes are this driver's own earlier write
        (a retried request that had landed); else ``fence()`` runs (it raises when this
        driver lost the run's lock: the record there stands) and the record, written by a
        driver that had lost the lock, is adopted when it covers the same shards and its
        files exist, or replaced."""
        record = self.write(unit_id, record, self.fence)
        with self.guard:
            self._apply(unit_id, record)
        return record

    def write(self, unit_id: str, record: CommitRecord | Mapping[str, Any],
              fence: Callable[[], None] | None = None) -> CommitRecord:
        """:meth:`commit`'s storage part (no change in memory)."""
        record = CommitRecord.from_dict(record)
        if self.generation:
            record = record.replace(generation=self.generation)
        key = commit_key(unit_id, record.wave, self.generation)
        data = encode_record(record)
        try:
            created = self.store.create_exclusive(key, data)
        except Exception as err:
            raise CommitWriteError(
                f"{unit_id}: could not write the commit record {self.store.url(key)} of wave "
                f"{record['wave']}: {type(err).__name__}: {err}") from err
        if not created:
            record = self._settle(unit_id, key, record, data, fence)
        return record

    def _settle(self, unit_id: str, key: str, record: CommitRecord, data: bytes,
                fence: Callable[[], None] | None) -> CommitRecord:
        raw = self.store.read_bytes(key)
        if raw == data:
            return record
        if fence is not None:
            fence()
        try:
            other = decode_record(raw, key, self.store.url(key))
        except DamagedRecord:
            other = None
        if other is not None and sorted(other.shards) == sorted(record.shards):
            folder = key_folder(other.files[0]) if other.files else None
            there = set(self.store.list(folder)) if folder else set()
            if all(f in there for f in other.files):
                return other
        self.store.delete(key)
        if not self.store.create_exclusive(key, data):
            raise CommitWriteError(f"{unit_id}: the commit record {self.store.url(key)} of wave "
                                   f"{record['wave']} keeps being written by another driver")
        return record

    def uncommit(self, unit_id: str, wave_id: str, data_prefix: str) -> list[str]:
        """Withdraw a committed wave (its shard changed): the record goes first, then the rows.
        Returns the shards that become pending again."""
        key = commit_key(unit_id, wave_id, self.wave_generation.get(unit_id, {}).get(wave_id, 0))
        record = decode_record(self.store.read_bytes(key), key, self.store.url(key))
        self.store.delete(key)
        self.store.delete_dir(f"{data_prefix}/{wave_id}")
        self.wave_generation.get(unit_id, {}).pop(wave_id, None)
        if unit_id in self.totals:
            self.totals[unit_id].add(record, sign=-1)
        waves = self.shard_wave.get(unit_id, {})
        for shard in record.shards:
            waves.pop(shard, None)
            self._set_failure(unit_id, shard, None)
        return list(record.shards)

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


def key_folder(key: str) -> str:
    return key.rsplit("/", 1)[0]


class CommitWriteError(RuntimeError):
    """A wave's commit record could not be written (after the storage's retries)."""


def remove_uncommitted(store: Store, ledger: Ledger, unit_prefixes: dict[str, str],
                       keep: dict[str, set[str]] | None = None,
                       kept: set[tuple[str, str]] | None = None) -> list[str]:
    """Delete wave folders that have no commit record; return what was removed.

    ``keep``: unit id -> waves this driver will redo. Their folders stay (a driver that lost
    the run's lock may still commit such a wave pointing at its files there); what the
    committed record does not list is deleted after the commit (:func:`remove_unlisted`);
    ``kept`` receives (unit id, wave id) of those that exist."""
    removed = []
    for unit_id, prefix in unit_prefixes.items():
        done = ledger.committed_waves(unit_id)
        kept_waves = (keep or {}).get(unit_id, set())
        for d in store.list_dirs(prefix):
            wave_id = d.rsplit("/", 1)[-1]
            if wave_id in done:
                continue
            if wave_id in kept_waves:
                if kept is not None:
                    kept.add((unit_id, wave_id))
                continue
            store.delete_dir(d)
            removed.append(d)
    return removed


def remove_unlisted(store: Store, folder: str, record: CommitRecord) -> list[str]:
    """Delete the files of a committed wave's folder that its record does not list (what an
    earlier attempt left there); returns them."""
    listed = set(record.files)
    gone = [k for k in store.list(folder) if k not in listed]
    for k in gone:
        store.delete(k)
    return gone


def manifest(run_id: str, status: str, output: str, config: dict, config_hash: str,
             versions: dict, ledger: Ledger, units: dict[str, dict], shards_total: int,
             failures: list[str], started: float, extra: dict | None = None,
             failures_total: int | None = None) -> dict:
    """The small roll-up: per-unit totals and pointers, never per-shard or per-file lists.

    ``units``: unit id -> its static fields (model, method, config_hash, data, summary, ...).
    """
    out_units = {}
    for uid, info in units.items():
        t = ledger.totals.get(uid, UnitTotals())
        failed = ledger.failed_shards.get(uid, 0)
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
        "failures": failures[:MAX_FAILURE_LINES], "failures_total": len(failures) if failures_total is None else failures_total,
        "started": started, "updated": time.time(),
        "read_rule": "committed rows = the files listed in _commits/<unit>/<wave>.json",
        **(extra or {}),
    }
