"""Progress a person can read in a long run: per unit, samples done / total, rate, ETA.

The driver learns what was written from the execution's own output (one record per Parquet
file), so it needs no side channel. On a terminal Ray Data's progress bars show the stages;
elsewhere (CI, cluster logs) a line is printed at most every ``interval`` seconds.
"""

from __future__ import annotations

import sys
import threading
import time


def format_line(unit: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        pct = 100.0 * done / total
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return f"salmap: {unit}: {done}/{total} samples ({pct:.0f}%), {rate:.2f} images/s, ETA {eta_s}"
    return f"salmap: {unit}: {done} samples, {rate:.2f} images/s"


class ProgressLine:
    """Per-unit progress lines (``ray.progress``: ``lines``, or ``auto`` off a terminal)."""

    def __init__(self, unit: str, total: int | None, cfg, out=print, interval: float = 10.0,
                 clock=time.time) -> None:
        mode = cfg.ray.progress
        self.enabled = mode == "lines" or (mode == "auto" and not sys.stderr.isatty())
        self.unit, self.total, self.out, self.interval, self.clock = unit, total, out, interval, clock
        self.t0 = self.last = clock()
        self.done = 0
        self.committed_samples = 0
        self.lock = threading.Lock()

    def update(self, done: int) -> None:
        with self.lock:
            self.done = max(self.done, done)
            now = self.clock()
            if self.enabled and now - self.last >= self.interval:
                self.last = now
                self.out(format_line(self.unit, self.done, self.total, now - self.t0))

    def wave_done(self, record: dict) -> None:
        self.committed_samples += int(record["samples"])

    def finish(self) -> None:
        if self.enabled:
            self.out(format_line(self.unit, self.done, self.total, self.clock() - self.t0))
