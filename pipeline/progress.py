"""Progress a person can read in a long run: per unit, samples done / total, rate, ETA.

On a terminal Ray Data's own progress bars show the stages; elsewhere (CI, cluster logs) a
concise line is printed every ``interval`` seconds. The post stage reports samples to a small
counter actor; the driver polls it.
"""

from __future__ import annotations

import sys
import threading
import time

import ray


@ray.remote(num_cpus=0)
class SampleCounter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += int(k)

    def value(self) -> int:
        return self.n


def format_line(unit: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        pct = 100.0 * done / total
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return f"salmap: {unit}: {done}/{total} samples ({pct:.0f}%), {rate:.2f} images/s, ETA {eta_s}"
    return f"salmap: {unit}: {done} samples, {rate:.2f} images/s"


class ProgressReporter:
    """Starts the counter actor and, unless progress is off or bars are shown, a printer thread."""

    def __init__(self, unit: str, total: int | None, cfg, out=print, interval: float | None = None) -> None:
        self.unit, self.total, self.out = unit, total, out
        mode = cfg.ray.progress
        self.lines = mode == "lines" or (mode == "auto" and not sys.stderr.isatty())
        self.counter = SampleCounter.remote() if mode != "off" else None
        self.interval = interval or (10.0 if self.lines else 0)
        self._stop = threading.Event()
        self._t0 = time.time()
        self._thread = None
        if self.counter is not None and self.lines:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="salmap-progress")
            self._thread.start()

    def _loop(self) -> None:
        last = -1
        while not self._stop.wait(self.interval):
            try:
                done = ray.get(self.counter.value.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            if done != last:
                self.out(format_line(self.unit, done, self.total, time.time() - self._t0))
                last = done

    def stop(self) -> None:
        self._stop.set()
        if self.counter is not None:
            try:
                done = ray.get(self.counter.value.remote(), timeout=5)
                if self.lines:
                    self.out(format_line(self.unit, done, self.total, time.time() - self._t0))
            except Exception:  # noqa: BLE001
                pass
            ray.kill(self.counter)
