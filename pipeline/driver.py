"""The driver's state for one run (:class:`DriverState`): its config, store, ledger and lock,
the failures, the manifest it rewrites after each commit, and the commit itself (lock check,
record, roll-up, manifest). :mod:`salmap.pipeline.run` orchestrates; this holds what every
unit's thread shares.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from salmap.workers.unit_id import UnitId

from . import __version__
from .accounting import HeldSampler, UnitAccounting, job_peak
from .commit_record import CommitRecord
from .config import SalmapConfig, stable_hash, to_container
from .ledger import MANIFEST_KEY, MAX_FAILURE_LINES, Ledger, manifest, remove_unlisted
from .lock import RunLock
from .plan import Unit
from .redact import redact_obj
from .storage import Store


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The versions of salmap and the packages its results depend on, for the manifest."""
    import pyarrow
    import ray
    import torch
    import torchvision

    return {"salmap": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "python": sys.version.split()[0]}


def public_config(cfg: SalmapConfig) -> dict:
    """The resolved config as stored in the manifest and the Parquet metadata; credentials in
    its URLs are redacted (:mod:`salmap.pipeline.redact`)."""
    return redact_obj(to_container(cfg))


@dataclass
class DriverState:
    """The driver's state for one run: config, store, ledger, failures, manifest writes."""

    cfg: SalmapConfig
    run_id: str
    store: Store
    units: list[Unit]
    ledger: Ledger
    shards_total: int
    failures: list[str]
    started: float
    out: Callable[[str], None]
    lock: RunLock | None = None
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    # manifest sections beside the units: "cluster" (the pool plan), "report" (its status)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    waves_total: int = 0
    waves_done: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    public_config: dict[str, Any] = field(default_factory=dict)
    # actor accounting: the pool plan per unit, this driver's account, earlier drivers' entries
    pools: dict[str, dict] = field(default_factory=dict)
    accounting: dict[str, UnitAccounting] = field(default_factory=dict)
    actors_before: dict[str, dict] = field(default_factory=dict)
    driver_started: float = field(default_factory=time.time)
    held: HeldSampler | None = None
    # (unit id, wave id) whose folder holds files of an earlier attempt: after the wave's
    # commit, what its record does not list is deleted
    dirty: set[tuple[str, str]] = field(default_factory=set)
    in_flight: int = 0  # commits between their lock check and their roll-up
    # a test's seam: called between the lock check and the record write (the fencing window)
    after_check: Callable[[Unit, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.public_config = public_config(self.cfg)  # once: OmegaConf is slow per commit
        self.manifest_seq = 0
        self._manifest_guard = threading.Lock()
        self._manifest_next: tuple[int, dict] | None = None
        self._manifest_writing = False
        self.ledger.guard = self.commit_lock
        if self.lock is not None:
            self.ledger.fence = self.lock.check

    def unit_info(self) -> dict[str, dict]:
        """The manifest's units: this config's and earlier runs' under this id, with their
        actor accounting."""
        info = {u.id: {"model": u.model.name, "method": u.method.name,
                       "config_hash": u.config_hash, "data": u.data_prefix} for u in self.units}
        for uid in self.ledger.totals:  # units of earlier runs under this id
            parsed = UnitId.parse(uid)
            info.setdefault(uid, {"model": parsed.model, "method": parsed.method,
                                  "config_hash": self.ledger.totals[uid].config_hash,
                                  "data": parsed.data_prefix})
        for uid, entry in info.items():
            acc = self.accounting.get(uid)
            actors = {**self.pools.get(uid, {}), **(acc.summary() if acc else {})}
            if actors:
                entry["actors"] = actors
            elif uid in self.actors_before:
                entry["actors"] = self.actors_before[uid]
        return info

    def all_failures(self) -> list[str]:
        """This driver's failure lines and the ledger's (shards committed incomplete)."""
        return [*self.failures, *self.ledger.failures()]

    def manifest(self, status: str, units: dict[str, dict] | None = None,
                 running: bool = False) -> dict:
        """The manifest; ``running``: the per-commit one, whose failure list is the first
        lines found (the count exact) at a cost that does not grow with the failures."""
        units = units or self.unit_info()
        if "cluster" in self.extra:
            self.extra["cluster"]["peak_actors"] = job_peak(self.accounting.values())
            if self.held is not None:
                self.extra["cluster"]["held"] = self.held.summary()
        if running:
            failures = [*self.failures[:MAX_FAILURE_LINES],
                        *self.ledger.first_failures(max(0, MAX_FAILURE_LINES - len(self.failures)))]
            total = len(self.failures) + len(self.ledger.shard_failures)
        else:
            failures, total = self.all_failures(), None
        return redact_obj(manifest(
            self.run_id, status, self.store.uri, self.public_config,
            stable_hash({u: v["config_hash"] for u, v in units.items()}), versions(), self.ledger,
            units, self.shards_total, failures, self.started, self.extra, failures_total=total))

    def write_manifest(self, status: str, units: dict[str, dict] | None = None) -> dict:
        """Build and store the manifest now (one PUT)."""
        m = self.manifest(status, units)
        self.store.write_json(MANIFEST_KEY, m)
        return m

    def commit(self, unit: Unit, record: CommitRecord | dict) -> None:
        """One wave: the run lock's check, its record (one conditional PUT), the manifest (one
        PUT): three requests, none of them under ``commit_lock`` (which the other units'
        threads wait on; it guards the roll-up in memory only)."""
        with self.commit_lock:
            if self.stopping.is_set():  # interrupted: the lock is about to be released
                raise KeyboardInterrupt("run interrupted; this wave stays uncommitted")
            self.in_flight += 1
        record = CommitRecord.from_dict(record)
        try:
            if self.lock is not None:
                self.lock.check()  # fencing: never commit after losing the run lock
            if self.after_check is not None:
                self.after_check(unit, record)
            written = record
            if record.shards:  # the record's PUT; the roll-up under commit_lock
                written = self.ledger.commit(unit.id, record) or record
                if written.files != record.files or (unit.id, record.wave) in self.dirty:
                    remove_unlisted(self.store, f"{unit.data_prefix}/{record.wave}", written)
                    self.dirty.discard((unit.id, record.wave))
            with self.commit_lock:
                for shard, why in written.unreadable.items():
                    self._fail(f"{unit.id}: shard {shard} could not be read: {why}")
                for shard, why in written.failures.items():
                    self.out(f"salmap: FAILED {unit.id}: shard {shard} committed incomplete: "
                             f"{why}")
                self.waves_done += 1
                self.out(f"salmap: [{self.waves_done}/{self.waves_total}] {unit.id}: committed "
                         f"wave {written.wave} ({written.rows} rows, "
                         f"{len(written.shards)} shard(s))")
                self.manifest_seq += 1
                snapshot = (self.manifest_seq, self.manifest("running", running=True))
            self._publish(snapshot)
        finally:
            with self.commit_lock:
                self.in_flight -= 1

    def _publish(self, snapshot: tuple[int, dict]) -> None:
        """Write the newest manifest; a thread that finds another writing leaves its snapshot
        to that one (written right after), so no thread waits on another's PUT."""
        with self._manifest_guard:
            if self._manifest_next is None or snapshot[0] > self._manifest_next[0]:
                self._manifest_next = snapshot
            if self._manifest_writing:
                return
            self._manifest_writing = True
        while True:
            with self._manifest_guard:
                snapshot, self._manifest_next = self._manifest_next, None
                if snapshot is None:
                    self._manifest_writing = False
                    return
            try:
                self.store.write_json(MANIFEST_KEY, snapshot[1])
            except Exception as err:  # noqa: BLE001 - the record is durable: the wave is done
                self.out(f"salmap: warning: manifest.json not updated ({type(err).__name__}: "
                         f"{err}); it is rewritten at the next commit and at the end")

    def wait_for_commits(self, timeout: float = 60.0) -> None:
        """After ``stopping`` is set: wait (bounded) until no commit is in flight."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def _fail(self, line: str) -> None:
        self.failures.append(line)
        self.out(f"salmap: FAILED {line}")
