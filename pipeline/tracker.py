"""Which waves of a unit's streaming execution are complete and may be committed.

The pipeline's write tasks report, as they go, each Parquet file they wrote (with the
(sample, target) keys in it) and each shard-end marker the reader produced (how many samples
the shard held, and why it ended early if it did). A wave is complete when every one of its
shards has its marker and rows for exactly that many samples. Pure logic, no Ray, no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .commit_record import CommitRecord
from .plan import Wave


class ReconcileError(RuntimeError):
    """The rows written disagree with what was read (a duplicate, a foreign shard, too many)."""


@dataclass
class _ShardState:
    samples: set[str] = field(default_factory=set)
    rows: int = 0
    errors: int = 0
    expected: int | None = None  # from the marker
    failure: str = ""  # committed incomplete (truncated tar, index mismatch)
    unreadable: str = ""  # not committed (could not be opened)


@dataclass
class _WaveState:
    wave: Wave
    shards: dict[str, _ShardState]
    files: list[str] = field(default_factory=list)
    keys: set[tuple[str, int]] = field(default_factory=set)
    aggregate: dict | None = None  # pipeline.aggregate of the wave's files (None: one had none)
    aggregated: bool = True


class WaveTracker:
    """Follow the waves of one unit through one execution; hand out complete ones once."""

    def __init__(self, unit_id: str, config_hash: str, waves: list[Wave],
                 identity: dict[str, dict] | None = None, index: dict[str, int] | None = None,
                 clock=time.time, sample_cap: int | None = None) -> None:
        from .decode import shard_name

        self.unit_id, self.config_hash = unit_id, config_hash
        self.identity = identity or {}
        self.index = index or {}
        self.clock = clock
        self.sample_cap = sample_cap  # samples a record's aggregate keeps (aggregate.WAVE_SAMPLE)
        self.last_commit = clock()
        self.waves: dict[str, _WaveState] = {}
        self.shard_of: dict[str, str] = {}  # shard name -> wave id
        self.order = {w.id: i for i, w in enumerate(waves)}
        for w in waves:
            names = [shard_name(s) for s in w.shards]
            self.waves[w.id] = _WaveState(w, {n: _ShardState() for n in names})
            self.shard_of.update({n: w.id for n in names})
        self.done: set[str] = set()
        self.touched: set[str] = set()  # waves that got news since the last ready()
        self.samples_written = 0
        self.failed_commits = 0

    def _shard(self, shard: str) -> tuple[_WaveState, _ShardState]:
        wave_id = self.shard_of.get(shard)
        if wave_id is None:
            raise ReconcileError(f"{self.unit_id}: rows of unexpected shard {shard!r}")
        if wave_id in self.done:
            raise ReconcileError(f"{self.unit_id}: rows of shard {shard!r} arrived after its wave "
                                 f"{wave_id} was committed")
        w = self.waves[wave_id]
        return w, w.shards[shard]

    def add_file(self, path: str, keys: list[tuple[str, str, int, str]],
                 aggregate: dict | None = None) -> None:
        """A written file, its rows' ``(sample_id, shard, target, status)`` and their
        aggregate (:mod:`salmap.pipeline.aggregate`), merged into the wave's commit record."""
        waves = set()
        for sample_id, shard, target, status in keys:
            w, s = self._shard(shard)
            key = (sample_id, int(target))
            if key in w.keys:
                raise ReconcileError(f"{self.unit_id}: duplicate row for sample {sample_id!r} "
                                     f"target {target} (wave {w.wave.id})")
            w.keys.add(key)
            if sample_id not in s.samples:
                s.samples.add(sample_id)
                self.samples_written += 1
            s.rows += 1
            s.errors += status != "ok"
            waves.add(w.wave.id)
        if len(waves) > 1:
            raise ReconcileError(f"{self.unit_id}: file {path} holds rows of several waves")
        for wave_id in waves:
            w = self.waves[wave_id]
            w.files.append(path)
            if aggregate is None:
                w.aggregated, w.aggregate = False, None
            elif w.aggregated:
                from .aggregate import WAVE_SAMPLE, merge

                w.aggregate = merge(w.aggregate, aggregate, self.sample_cap or WAVE_SAMPLE)
        self.touched |= waves

    def add_marker(self, shard: str, samples: int, error: str = "", unreadable: bool = False) -> None:
        """A shard-end marker: the shard held ``samples`` samples (or could not be opened)."""
        w, s = self._shard(shard)
        self.touched.add(w.wave.id)
        if s.expected is not None:
            raise ReconcileError(f"{self.unit_id}: shard {shard!r} ended twice")
        s.expected = int(samples)
        if unreadable:
            s.unreadable = error or "the shard could not be read"
            return
        if error:
            s.failure = error
        indexed = self.index.get(shard)
        if indexed is not None and indexed != samples and not error:
            s.failure = (f"the shard holds {samples} samples but its index (shards.json) lists "
                         f"{indexed}; the index is stale or the shard was rewritten")

    def _complete(self, w: _WaveState) -> bool:
        for name, s in w.shards.items():
            if s.expected is None:
                return False
            if len(s.samples) > s.expected:
                raise ReconcileError(f"{self.unit_id}: shard {name!r} has rows for "
                                     f"{len(s.samples)} samples but held {s.expected}")
            if len(s.samples) < s.expected:
                return False
        return True

    def ready(self) -> list[CommitRecord]:
        """Commit records of the waves that just became complete (each handed out once; one
        whose commit fails goes back to pending with :meth:`not_committed`)."""
        out = []
        touched, self.touched = self.touched, set()
        for wave_id in sorted(touched, key=self.order.__getitem__):
            w = self.waves[wave_id]
            if wave_id in self.done or not self._complete(w):
                continue
            self.done.add(wave_id)
            out.append(self._record(w))
            w.keys = set()  # a committed wave keeps only its counts
            w.aggregate = None
            for s in w.shards.values():
                s.samples = set()
        return out

    def not_committed(self, wave_id: str) -> None:
        """The record of a handed-out wave could not be made durable: the wave is pending
        again (for the unit's retry, which redoes it), and counted in ``failed_commits``."""
        self.done.discard(wave_id)
        self.failed_commits += 1

    def unreadable(self) -> dict[str, str]:
        """Shards of handed-out waves that could not be opened: name -> reason."""
        return {n: s.unreadable for wid in self.done for n, s in self.waves[wid].shards.items()
                if s.unreadable}

    def pending(self) -> list[Wave]:
        return [w.wave for wid, w in self.waves.items() if wid not in self.done]

    def _record(self, w: _WaveState) -> CommitRecord:
        now = self.clock()
        elapsed, self.last_commit = now - self.last_commit, now
        committed = {n: s for n, s in w.shards.items() if not s.unreadable}
        per_shard = {}
        for n, s in committed.items():
            per_shard[n] = {"samples": len(s.samples), "rows": s.rows, "errors": s.errors}
            if s.failure:
                per_shard[n]["failure"] = s.failure
        return CommitRecord(
            unit=self.unit_id, wave=w.wave.id, config_hash=self.config_hash,
            shards=sorted(committed),
            shard_identity={n: self.identity[n] for n in sorted(committed) if n in self.identity},
            unreadable={n: s.unreadable for n, s in w.shards.items() if s.unreadable},
            files=sorted(w.files),
            rows=sum(s.rows for s in committed.values()),
            errors=sum(s.errors for s in committed.values()),
            samples=sum(len(s.samples) for s in committed.values()),
            per_shard=per_shard, elapsed_s=round(elapsed, 3), committed_at=now,
            aggregate=_packed(w.aggregate) if w.aggregated else None,
        )


def _packed(aggregate: dict | None) -> dict:
    from .aggregate import empty, pack

    return pack(aggregate or empty())
