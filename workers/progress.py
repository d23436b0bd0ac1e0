"""How far a model actor is inside its current batch, told to the driver while it works.

The driver (:mod:`pipeline.progress`) starts one small named Ray actor per unit, the
*counter*, named :func:`counter_name`. Each :class:`workers.actor.Explainer` looks it up once
and sends it, at most once a second, its own cumulative state: samples finished and the
fraction of the current batch done, in samples. Inside a batch the fraction comes from the
method (its loops report through :meth:`workers.methods.base.Method.track`) and from the
model metrics' forward passes. Without Ray, or without a counter, every call is a no-op.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

COUNTER_PREFIX = "salmap-progress:"


def counter_name(unit_id: str) -> str:
    """The Ray actor name of a unit's progress counter (in the job's namespace)."""
    return f"{COUNTER_PREFIX}{unit_id}"


def _lookup(unit_id: str) -> Any:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(counter_name(unit_id))
    except Exception:  # noqa: BLE001 - no counter (progress off, or not run by the driver)
        return None


class ProgressReporter:
    """One actor's reports: ``(key, samples finished, samples of the current batch done)``."""

    def __init__(self, handle: Any = None, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handle = handle
        self.key = uuid.uuid4().hex
        self.min_interval, self.clock = min_interval, clock
        self.finished = 0
        self.in_batch = 0.0  # samples of the current batch whose explanation is complete
        self.partial = 0.0  # what was last reported for the current batch
        self.last_sent = float("-inf")
        # learned from the previous group: the method's share of a sample's time, and how
        # many images the model metrics put through the model per sample
        self.method_share = 1.0
        self.metric_images_per_sample = 0.0

    @classmethod
    def for_unit(cls, unit_id: str) -> ProgressReporter:
        return cls(_lookup(unit_id))

    def _send(self, force: bool) -> None:
        if self.handle is None:
            return
        now = self.clock()
        if not force and now - self.last_sent < self.min_interval:
            return
        self.last_sent = now
        try:
            self.handle.report.remote(self.key, self.finished, self.partial)
        except Exception:  # noqa: BLE001 - the counter is gone (unit over): stop reporting
            self.handle = None

    def set_partial(self, samples: float) -> None:
        self.partial = max(self.partial, samples)  # never backwards inside a batch
        self._send(force=False)

    def begin_batch(self) -> None:
        self.in_batch = self.partial = 0.0

    def end_batch(self, samples: int) -> None:
        self.finished += int(samples)
        self.in_batch = self.partial = 0.0
        self._send(force=True)

    def group(self, samples: int) -> Group:
        """The explanation of ``samples`` samples: one method call and its model metrics."""
        return Group(self, samples)


class Group:
    """Progress of one method call (0..``method_share``) then of its metrics (the rest)."""

    def __init__(self, reporter: ProgressReporter, samples: int) -> None:
        self.r, self.samples = reporter, samples
        self.base = reporter.in_batch
        self.t0 = reporter.clock()
        self.t_method: float | None = None
        self.images = 0

    def _at(self, fraction: float) -> None:
        self.r.set_partial(self.base + self.samples * min(max(fraction, 0.0), 1.0))

    def method_progress(self, fraction: float) -> None:
        """The method reports how far its call is (0..1)."""
        self._at(self.r.method_share * fraction)

    def method_done(self) -> None:
        self.t_method = self.r.clock()
        self._at(self.r.method_share)

    def counting(self, forward: Callable) -> Callable:
        """``forward`` wrapped to count the images the model metrics send through it."""
        def run(x):
            out = forward(x)
            self.images += int(x.shape[0])
            expected = self.r.metric_images_per_sample * self.samples
            if expected > 0:
                share = self.r.method_share
                self._at(share + (1.0 - share) * min(1.0, self.images / expected))
            return out
        return run

    def close(self) -> None:
        """The group is explained: learn its time split, count its samples as done."""
        end = self.r.clock()
        if self.samples and self.images and self.t_method is not None and end > self.t0:
            self.r.metric_images_per_sample = self.images / self.samples
            self.r.method_share = min(1.0, max(0.05, (self.t_method - self.t0) / (end - self.t0)))
        self.r.in_batch = self.base + self.samples
        self.r.set_partial(self.r.in_batch)
