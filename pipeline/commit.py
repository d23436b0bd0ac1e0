"""The commit protocol: what makes output visible, exactly once.

Layout under ``<run.output>/<run.id>/``::

    data/model=<m>/method=<g>/wave=<wave id>/part-000000-0.parquet written by Ray, fixed names
    _commits/<unit id>/<wave id>.json                              the commit record, written LAST
    manifest.json                                                  roll-up, rewritten after each commit
    _lock.json                                                     one driver at a time (lease)

A wave's rows are committed iff its commit record exists; the record lists its files and the
reconciled row counts. Readers that go through the commit records (``salmap read``,
:func:`committed_files`) never see partial or duplicate data. A driver that starts work first
deletes wave folders that have no commit record (leftovers of a crashed attempt), and a wave
is always written with Ray's overwrite mode into its own folder, so a retried wave replaces
its partial files instead of adding to them.
"""

from __future__ import annotations

from typing import Any

from .lock import LOCK_KEY, LockHeld, LockLost, RunLock  # noqa: F401 - re-exported for run.py
from .storage import Store

MANIFEST_KEY = "manifest.json"
COMMITS = "_commits"


def commit_key(unit_id: str, wave_id: str) -> str:
    return f"{COMMITS}/{unit_id}/{wave_id}.json"


def load_commits(store: Store) -> dict[str, dict[str, dict]]:
    """unit id -> wave id -> commit record."""
    out: dict[str, dict[str, dict]] = {}
    for key in store.list(COMMITS):
        if not key.endswith(".json"):
            continue
        parts = key.split("/")
        if len(parts) != 3:
            continue
        _, unit_id, fname = parts
        out.setdefault(unit_id, {})[fname[:-5]] = store.read_json(key)
    return out


def write_commit(store: Store, unit_id: str, wave_id: str, record: dict[str, Any]) -> None:
    store.write_json(commit_key(unit_id, wave_id), record)


def committed_files(store: Store, unit_id: str | None = None) -> list[str]:
    """Relative keys of every committed Parquet file (optionally of one unit)."""
    files: list[str] = []
    for uid, waves in sorted(load_commits(store).items()):
        if unit_id is not None and uid != unit_id:
            continue
        for _, rec in sorted(waves.items()):
            files.extend(rec["files"])
    return files


def remove_uncommitted(store: Store, unit_prefixes: dict[str, str]) -> list[str]:
    """Delete wave folders without a commit record; return what was removed."""
    commits = load_commits(store)
    removed = []
    for unit_id, prefix in unit_prefixes.items():
        done = commits.get(unit_id, {})
        for d in store.list_dirs(prefix):
            wave_id = d.rsplit("/", 1)[-1].removeprefix("wave=")
            if wave_id not in done:
                store.delete_dir(d)
                removed.append(d)
    return removed
