"""``salmap verify RUN``: check a run end to end, records, files and row counts, and report in
one table. Every commit record is read and validated (:mod:`salmap.pipeline.commit_record`), every
file it lists must exist (one listing per unit) and hold the rows the record counts (Parquet
footers); a shard may be committed by one record only. Files in wave folders that no record
lists are leftovers of failed attempts, and records of generations no newer driver vouches for
are stale (written by a driver that had lost the run's lock): both noted, not damage (readers
never see them)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from salmap.workers.unit_id import data_prefix as unit_data_prefix

from .commit_record import WAY_OUT, CommitRecord, DamagedRecord, decode_record
from .ledger import list_records, parse_commit_key
from .storage import Store


@dataclass
class UnitCheck:
    records: int = 0
    damaged: int = 0
    files: int = 0
    missing: int = 0
    rows_recorded: int = 0
    rows_found: int = 0
    leftovers: int = 0
    stale: int = 0  # records no generation vouches for (ignored by readers)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the unit showed no problem."""
        return not self.problems


def _file_rows(store: Store, key: str) -> int:
    import pyarrow.parquet as pq

    with store.fs.open_input_file(store.path(key)) as f:
        return pq.read_metadata(f).num_rows


def verify_run(uri: str, storage: Any = None, threads: int = 16) -> dict[str, UnitCheck]:
    """unit id -> what was found; a unit's ``problems`` name the record or file and the way
    out. Raises FileNotFoundError when ``uri`` holds no run."""
    store = Store.open(uri, storage)
    index = list_records(store)
    keys = [k for waves in index.keys.values() for k in waves.values()]
    if not keys and not index.stale and not store.list("data"):
        raise FileNotFoundError(f"no run at {store.uri}: no commit records and no data")

    def load(key: str) -> tuple[str, CommitRecord | None, str]:
        try:
            return key, decode_record(store.read_bytes(key), key, store.url(key)), ""
        except DamagedRecord as err:
            return key, None, err.problem

    with ThreadPoolExecutor(max(1, min(threads, len(keys) or 1))) as pool:
        loaded = list(pool.map(load, keys))
    units: dict[str, UnitCheck] = {}
    records: dict[str, dict[str, CommitRecord]] = {}
    for key in index.stale:
        units.setdefault(parse_commit_key(key)[0], UnitCheck()).stale += 1  # type: ignore[index]
    for key, rec, problem in loaded:
        unit_id = key.split("/")[1]
        u = units.setdefault(unit_id, UnitCheck())
        u.records += 1
        if rec is None:
            u.damaged += 1
            u.problems.append(f"record {store.url(key)} is damaged: {problem}; {WAY_OUT}")
        else:
            records.setdefault(unit_id, {})[key] = rec
    for unit_id, recs in sorted(records.items()):
        u = units[unit_id]
        present = store.list_sizes(unit_data_prefix(unit_id))
        listed: set[str] = set()
        shard_of: dict[str, str] = {}
        to_count: list[tuple[str, str]] = []
        for key, rec in sorted(recs.items()):
            for shard in rec.shards:
                if shard in shard_of:
                    u.problems.append(f"shard {shard} is committed by {store.url(key)} and by "
                                      f"{store.url(shard_of[shard])}: its rows would be read twice; "
                                      f"{WAY_OUT}")
                shard_of.setdefault(shard, key)
            u.files += len(rec.files)
            u.rows_recorded += rec.rows
            listed.update(rec.files)
            gone = [f for f in rec.files if f not in present]
            if gone:
                u.missing += len(gone)
                u.problems.append(f"record {store.url(key)} lists {len(gone)} file(s) that do not "
                                  f"exist (e.g. {store.url(gone[0])}); `salmap run` with this "
                                  "run's config redoes the wave")
            to_count.extend((key, f) for f in rec.files if f in present)
        with ThreadPoolExecutor(max(1, min(threads, len(to_count) or 1))) as pool:
            counts = list(pool.map(lambda kf: _count(store, kf[1]), to_count))
        per_record: dict[str, int] = {}
        unreadable: set[str] = set()
        for (key, f), n in zip(to_count, counts):
            if isinstance(n, str):
                unreadable.add(key)
                u.problems.append(f"file {store.url(f)} of record {store.url(key)} cannot be read "
                                  f"({n}); move the record away to have `salmap run` redo its "
                                  "wave")
                continue
            per_record[key] = per_record.get(key, 0) + n
            u.rows_found += n
        for key, rec in sorted(recs.items()):
            if key in unreadable or any(f not in present for f in rec.files):
                continue
            found = per_record.get(key, 0)
            if found != rec.rows:
                u.problems.append(f"record {store.url(key)} counts {rec.rows} rows but its "
                                  f"files hold {found}; {WAY_OUT}")
        committed_waves = {f"{unit_data_prefix(unit_id)}/{rec.wave}/" for rec in recs.values()}
        u.leftovers = sum(1 for k in present if k not in listed
                          and any(k.startswith(w) for w in committed_waves))
    return units


def _count(store: Store, key: str) -> int | str:
    try:
        return _file_rows(store, key)
    except Exception as err:  # noqa: BLE001 - reported per file
        return f"{type(err).__name__}: {err}"


def format_table(units: dict[str, UnitCheck]) -> list[str]:
    """One table: a row per unit, then each problem on its own line."""
    header = ("unit", "records", "damaged", "files", "missing", "rows (records)", "rows (files)",
              "status")
    rows = [header]
    for uid, u in sorted(units.items()):
        rows.append((uid, str(u.records), str(u.damaged), str(u.files), str(u.missing),
                     str(u.rows_recorded), str(u.rows_found), "ok" if u.ok else "DAMAGED"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for uid, u in sorted(units.items()):
        lines.extend(f"{uid}: {p}" for p in u.problems)
        if u.leftovers:
            lines.append(f"{uid}: note: {u.leftovers} file(s) of failed attempts in committed wave "
                         "folders, listed by no record (never read; the next commit of such a "
                         "wave deletes them)")
        if u.stale:
            lines.append(f"{uid}: note: {u.stale} stale commit record(s) of a driver that had "
                         "lost the run's lock, vouched for by no generation (never read; the "
                         "next `salmap run` deletes them)")
    return lines
