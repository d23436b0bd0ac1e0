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

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .storage import Store

LOCK_KEY = "_lock.json"
MANIFEST_KEY = "manifest.json"
COMMITS = "_commits"


class LockHeld(RuntimeError):
    """Another driver holds this run's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    """A lock object with a lease, renewed by a heartbeat thread while the driver works."""

    store: Store
    lease_s: float = 120.0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "heartbeat": time.time(), "lease_s": self.lease_s,
        }).encode()

    def _is_stale(self, info: dict) -> bool:
        if time.time() - float(info.get("heartbeat", 0)) > float(info.get("lease_s", self.lease_s)):
            return True
        same_host = info.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(info.get("pid", -1)))

    def acquire(self) -> None:
        if self.store.create_exclusive(LOCK_KEY, self._body()):
            self._start_heartbeat()
            return
        try:
            info = self.store.read_json(LOCK_KEY)
        except (FileNotFoundError, json.JSONDecodeError):
            info = {}
        if info and not self._is_stale(info):
            raise LockHeld(
                f"run is locked by another driver (host {info.get('host')}, pid {info.get('pid')}, "
                f"heartbeat {time.time() - float(info.get('heartbeat', 0)):.0f} s ago); wait for it to "
                f"finish, or delete {self.store.url(LOCK_KEY)} if you are sure it is dead"
            )
        self.store.delete(LOCK_KEY)
        if not self.store.create_exclusive(LOCK_KEY, self._body()):
            raise LockHeld("another driver took over the stale lock at the same moment")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(max(1.0, self.lease_s / 4)):
                try:
                    current = self.store.read_json(LOCK_KEY)
                    if current.get("owner") != self.owner:
                        return
                    self.store.write_bytes(LOCK_KEY, self._body())
                except Exception:  # noqa: BLE001 - a missed beat is retried on the next one
                    pass

        self._thread = threading.Thread(target=beat, name="salmap-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        try:
            if self.store.read_json(LOCK_KEY).get("owner") == self.owner:
                self.store.delete(LOCK_KEY)
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            pass


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
