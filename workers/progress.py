"""How far a model actor is inside its current batch, told to the driver while it works.

The driver (:mod:`salmap.pipeline.progress`) starts one small named Ray actor, the *counter*
(:data:`COUNTER_NAME`, in the job's namespace, shared by the job's units). Each
:class:`salmap.workers.actor.Explainer` looks it up once and sends it, at most once a second, its
unit and its own cumulative state: samples finished, the part of the current batch done, in
samples, and the seconds its completed batches took (so the driver has a rate from the first
completed batch on). Inside a batch the fraction comes from the method (its loops report through
:meth:`salmap.workers.methods.base.Method.track`), then from the model metrics' forward passes
(:func:`salmap.workers.metrics.compute_model_metrics`'s ``progress``). Without Ray, or without a
counter, every call is a no-op.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

COUNTER_NAME = "salmap-progress"  # the Ray actor's name, in the job's namespace


def _lookup() -> Any:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(COUNTER_NAME)
    except Exception:  # noqa: BLE001 - no counter (progress off, or not run by the driver)
        return None


class ProgressReporter:
    """One actor's reports: ``(unit, key, samples finished, samples of the current batch done)``."""

    def __init__(self, handle: Any = None, unit: str = "", min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handle, self.unit = handle, unit
        self.busy_s = 0.0  # seconds spent in completed batches: the driver's first rate
        self.batch_t0: float | None = None
        self.key = uuid.uuid4().hex
        self.min_interval, self.clock = min_interval, clock
        self.finished = 0
        self.in_batch = 0.0  # samples of the current batch whose explanation is complete
        self.partial = 0.0  # what was last reported for the current batch
        self.last_sent = float("-inf")
        # the method's share of a sample's time when model metrics follow it: a guess until a
        # group has been timed
        self.method_share = 0.5

    @classmethod
    def for_unit(cls, unit_id: str) -> ProgressReporter:
        """The reporter of ``unit_id`` to the driver's counter (a no-op without one)."""
        return cls(_lookup(), unit_id)

    def _send(self, force: bool) -> None:
        if self.handle is None:
            return
        now = self.clock()
        if not force and now - self.last_sent < self.min_interval:
            return
        self.last_sent = now
        try:
            self.handle.report.remote(self.unit, self.key, self.finished, self.partial,
                                      self.busy_s)
        except Exception:  # noqa: BLE001 - the counter is gone (unit over): stop reporting
            self.handle = None

    def set_partial(self, samples: float) -> None:
        """Samples of the current batch done so far (never backwards)."""
        self.partial = max(self.partial, samples)  # never backwards inside a batch
        self._send(force=False)

    def begin_batch(self) -> None:
        """Start a batch: no partial progress yet."""
        self.in_batch = self.partial = 0.0
        self.batch_t0 = self.clock()

    def end_batch(self, samples: int) -> None:
        """End a batch of ``samples``: count them finished and report."""
        self.finished += int(samples)
        if self.batch_t0 is not None:
            self.busy_s += max(self.clock() - self.batch_t0, 0.0)
            self.batch_t0 = None
        self.in_batch = self.partial = 0.0
        self._send(force=True)

    def group(self, samples: int, metrics: bool = False) -> Group:
        """The explanation of ``samples`` samples: one method call, and model metrics after
        it when ``metrics``."""
        return Group(self, samples, metrics)


class Group:
    """Progress of one method call (0..share) then of its model metrics (share..1); share is
    1 without metrics."""

    def __init__(self, reporter: ProgressReporter, samples: int, metrics: bool = False) -> None:
        self.r, self.samples, self.metrics = reporter, samples, metrics
        self.share = reporter.method_share if metrics else 1.0
        self.base = reporter.in_batch
        self.t0 = reporter.clock()
        self.t_method: float | None = None

    def _at(self, fraction: float) -> None:
        self.r.set_partial(self.base + self.samples * min(max(fraction, 0.0), 1.0))

    def method_progress(self, fraction: float) -> None:
        """The method reports how far its call is (0..1)."""
        self._at(self.share * fraction)

    def method_done(self) -> None:
        """The method's call is done: progress at its share, the metrics' part next."""
        self.t_method = self.r.clock()
        self._at(self.share)

    def metric_progress(self, fraction: float) -> None:
        """The model metrics report how far their forwards are (0..1)."""
        self._at(self.share + (1.0 - self.share) * fraction)

    def close(self) -> None:
        """The group is explained: learn its time split, count its samples as done."""
        end = self.r.clock()
        if self.metrics and self.samples and self.t_method is not None and end > self.t0:
            self.r.method_share = min(0.95, max(0.05, (self.t_method - self.t0) / (end - self.t0)))
        self.r.in_batch = self.base + self.samples
        self.r.set_partial(self.r.in_batch)
