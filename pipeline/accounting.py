"""Which actors did a unit's work, and for how long: the driver's account of its devices.

Every actor batch carries its actor's id, device, start time, and the batch's end time and
duration (internal columns, :mod:`salmap.workers.columns`); the post + write stage passes one entry
per actor batch to the driver with its file records (:mod:`salmap.pipeline.execute`). From those the
driver knows per unit: how many actors it had, how many at once (peak), and its
device-seconds: each actor's time from its start (model load included) to the end of its last
batch, times the GPUs (or CPUs) one actor holds. ``busy`` counts only the time inside batches.
Pure logic, no Ray.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

RECENT_BATCHES = 1024  # per actor: the batch end times remembered to dedupe split batches
# one entry per actor batch: [actor id, device, actor start ms, batch end ms, batch ms, samples]
Entry = tuple[str, str, int, int, int, int]


@dataclass
class _Actor:
    device: str
    start: float
    end: float
    busy: float = 0.0
    samples: int = 0
    # end times (ms) of this actor's latest batches: a batch split over several post batches
    # comes back close together, so a bounded window dedupes it (memory does not grow with
    # the run)
    recent: dict[int, None] = field(default_factory=dict)


def peak_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``[start, end]`` that overlap at one instant."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((max(start, end), -1))
    events.sort(key=lambda e: (e[0], -e[1]))  # a start at the instant of an end overlaps it
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


@dataclass
class UnitAccounting:
    """The actors of one unit in this driver (all its attempts), plus what earlier drivers of
    the run recorded (``before``: the unit's ``actors`` entry of the previous manifest)."""

    unit_id: str
    resource: str = "CPU"  # what one actor holds: "GPU" or "CPU"
    per_actor: float = 1.0  # how much of it
    before: dict = field(default_factory=dict)
    actors: dict[str, _Actor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, entries: Iterable[Entry]) -> None:
        """Entries of actor batches; a batch split over several post batches comes several
        times (its samples add up, its time counts once)."""
        with self._lock:
            self._add(entries)

    def _add(self, entries: Iterable[Entry]) -> None:
        for actor_id, device, start_ms, end_ms, batch_ms, samples in entries:
            if not actor_id:
                continue
            a = self.actors.get(actor_id)
            if a is None:
                a = self.actors[actor_id] = _Actor(str(device), start_ms / 1000.0, start_ms / 1000.0)
            a.end = max(a.end, end_ms / 1000.0)
            a.samples += int(samples)
            if end_ms not in a.recent:
                a.recent[end_ms] = None
                if len(a.recent) > RECENT_BATCHES:
                    del a.recent[next(iter(a.recent))]
                a.busy += batch_ms / 1000.0

    def set_lifetimes(self, lifetimes: dict[str, tuple[float, float | None]]) -> None:
        """What Ray's actor table says of this unit's actors: id -> (start, end or None while
        alive), in seconds. Adds the actors that never got a batch (they held their device
        all the same) and extends each actor's time to its end."""
        with self._lock:
            for actor_id, (start, end) in lifetimes.items():
                a = self.actors.get(actor_id)
                if a is None:
                    a = self.actors[actor_id] = _Actor("", start, start)
                a.start = min(a.start, start)
                if end is not None:
                    a.end = max(a.end, end)

    def intervals(self) -> list[tuple[float, float]]:
        """Each actor's (start, end), for the device-seconds of the unit."""
        with self._lock:
            return [(a.start, a.end) for a in self.actors.values()]

    def summary(self) -> dict:
        """This unit's entry for the manifest: this driver's figures added to the earlier ones."""
        with self._lock:
            return self._summary()

    def _summary(self) -> dict:
        b = self.before or {}
        device_s = sum(a.end - a.start for a in self.actors.values()) * self.per_actor
        busy_s = sum(a.busy for a in self.actors.values()) * self.per_actor
        samples = sum(a.samples for a in self.actors.values())
        devices: dict[str, int] = dict(b.get("devices") or {})
        for a in self.actors.values():
            device = a.device or "none (no batch)"
            devices[device] = devices.get(device, 0) + 1
        out = {
            "resource": self.resource, "per_actor": self.per_actor,
            "actors": int(b.get("actors", 0)) + len(self.actors),
            "peak": max(int(b.get("peak", 0)),
                        peak_concurrency((a.start, a.end) for a in self.actors.values())),
            "devices": devices,
            "device_s": round(float(b.get("device_s", 0.0)) + device_s, 3),
            "busy_device_s": round(float(b.get("busy_device_s", 0.0)) + busy_s, 3),
            "samples": int(b.get("samples", 0)) + samples,
        }
        out["busy_s_per_image"] = (round(out["busy_device_s"] / out["samples"], 6)
                                   if out["samples"] else None)
        if self.actors:
            out["first_start"] = min(a.start for a in self.actors.values())
            out["last_end"] = max(a.end for a in self.actors.values())
        return out


def job_peak(accountings: Iterable[UnitAccounting]) -> int:
    """The most actors of all units alive at one instant (this driver)."""
    return peak_concurrency(iv for acc in accountings for iv in acc.intervals())


def pool_class_name(unit_id: str) -> str:
    """The name of the unit's actor class (a subclass of ``Explainer`` per unit), so that
    Ray's actor table tells the units' actors apart (and Ray's dashboard shows the unit)."""
    return f"Explainer[{unit_id}]"


def actor_lifetimes(unit_id: str, since: float) -> dict[str, tuple[float, float | None]]:
    """The unit's actors created by this driver since ``since`` (seconds), from Ray's actor
    table: id -> (start, end or None while alive). Empty when the table cannot be read (a
    private Ray API: :func:`ray._private.state.actors`)."""
    try:
        import ray
        from ray._private import state

        table = state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()))
    except Exception:  # noqa: BLE001 - accounting only: the batches' account stays
        return {}
    # "MapWorker(MapBatches(Explainer[<unit>]))", or with a stage fused in front of it
    # "MapWorker(MapBatches(_Decode)->MapBatches(Explainer[<unit>]))"
    want = f"MapBatches({pool_class_name(unit_id)}))"
    out = {}
    for actor_id, info in table.items():
        if not str(info.get("ActorClassName", "")).endswith(want):
            continue
        start = float(info.get("StartTime") or 0) / 1000.0
        end = float(info.get("EndTime") or 0) / 1000.0
        if start and start >= since:
            out[actor_id] = (start, end or None)
    return out


def held_summary(samples: list[tuple[float, float, float]]) -> dict:
    """Samples ``(time, held, total)`` of a resource -> device-seconds held (each sample's value
    until the next), the peak, the time covered and the mean share of ``total`` held."""
    held_s = total_s = 0.0
    for (t, held, total), (t_next, _, _) in zip(samples, samples[1:]):
        held_s += held * (t_next - t)
        total_s += total * (t_next - t)
    span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
    return {"device_s": round(held_s, 3), "peak": max((h for _, h, _ in samples), default=0.0),
            "sampled_s": round(span, 3),
            "mean_share": round(held_s / total_s, 4) if total_s > 0 else None}


class HeldSampler:
    """Samples, every ``interval`` seconds while the driver works, how much of ``resource``
    the cluster's actors and tasks hold (total minus available): whether every GPU holds an
    actor while work remains. Cluster-wide: other jobs on the same cluster count too.

    Keeps running totals, not the samples: :meth:`summary` (asked at every commit) costs the
    same after ten days as after a minute, and memory does not grow."""

    def __init__(self, resource: str, interval: float = 1.0) -> None:
        self.resource, self.interval = resource, interval
        self._lock = threading.Lock()
        self._first: float | None = None
        self._last: tuple[float, float, float] | None = None
        self._held_s = self._total_s = self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="salmap-held", daemon=True)

    def start(self) -> HeldSampler:
        """Start sampling in a daemon thread; returns self."""
        self._thread.start()
        return self

    def add(self, t: float, held: float, total: float) -> None:
        """One sample: the previous sample's value counts until ``t`` (as :func:`held_summary`)."""
        with self._lock:
            if self._last is None:
                self._first = t
            else:
                t0, h0, tot0 = self._last
                self._held_s += h0 * (t - t0)
                self._total_s += tot0 * (t - t0)
            self._last = (t, held, total)
            self._peak = max(self._peak, held)

    def _run(self) -> None:
        import time

        import ray

        while not self._stop.is_set():
            try:
                total = float(ray.cluster_resources().get(self.resource, 0.0))
                free = float(ray.available_resources().get(self.resource, 0.0))
                self.add(time.time(), max(0.0, total - free), total)
            except Exception:  # noqa: BLE001 - accounting only
                pass
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        """Stop sampling (bounded wait) and return the totals."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict:
        """Held device-seconds, peak, time sampled and mean share, from the running totals."""
        with self._lock:
            span = self._last[0] - self._first if self._last and self._first is not None else 0.0
            return {"device_s": round(self._held_s, 3), "peak": self._peak,
                    "sampled_s": round(span, 3),
                    "mean_share": round(self._held_s / self._total_s, 4)
                    if self._total_s > 0 else None}
