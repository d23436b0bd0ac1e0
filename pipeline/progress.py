"""Progress a person can read in a long run: per unit, samples done / total, rows committed,
rate and ETA, printed every ``interval`` seconds (10 s) while the unit runs.

Two sources, the larger wins:

- what was written, from the execution's own output (one record per Parquet file), which
  moves only when a batch has gone through the post and write stage;
- what the model actors report while they work, through one small counter actor for the
  job (:class:`Counter`, named :data:`workers.progress.COUNTER_NAME`): per unit, samples
  finished plus the part of the current batch done, which iterative methods report step by
  step (see :mod:`workers.progress`). So the count moves during long batches too.

``ray.progress``: ``auto`` and ``lines`` print these lines (``auto`` also on a terminal);
``bars`` adds Ray Data's per-stage bars; ``off`` prints nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from workers.progress import COUNTER_NAME

RATE_WINDOW_S = 120.0  # the rate is measured over this much recent history


class Counter:
    """The job's counter (a Ray actor, no CPU): per unit, each model actor's latest report."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, tuple[float, float]]] = {}

    def report(self, unit: str, key: str, finished: float, partial: float) -> None:
        self.reports.setdefault(unit, {})[key] = (float(finished), float(partial))

    def value(self, unit: str) -> float:
        return sum(f + p for f, p in self.reports.get(unit, {}).values())

    def reset(self, unit: str) -> None:
        self.reports.pop(unit, None)


_counter: list = []  # the creator's handle: it keeps the job's counter alive (Ray ends an
                    # actor when its creator's handles are gone; handles got by name do not count)


def start_counter():
    """The job's counter actor (started on first use, then shared by every unit of the
    driver; it ends with the job); None when Ray is not running."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        try:
            found = ray.get_actor(COUNTER_NAME)
        except ValueError:
            found = None
        if found is not None:
            mine = [h for h in _counter if h._actor_id == found._actor_id]
            return mine[0] if mine else found
        cls = ray.remote(num_cpus=0, max_restarts=0)(Counter)
        handle = cls.options(name=COUNTER_NAME, get_if_exists=True).remote()
        _counter[:] = [handle]
        return handle
    except Exception:  # noqa: BLE001 - progress is never worth failing a run for
        return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def format_line(unit: str, done: float, total: int | None, rate: float | None,
                rows: int | None = None) -> str:
    """``salmap: UNIT: 12/29 samples (41%), 36 rows committed, 0.52 samples/s, ETA 0m33s``."""
    if total:
        done = min(done, float(total))
    count = f"{done:.1f}" if done < 100 and done != int(done) else f"{int(done)}"
    parts = [f"{count}/{total} samples ({100.0 * done / total:.0f}%)" if total
             else f"{count} samples"]
    if rows is not None:
        parts.append(f"{rows} rows committed")
    parts.append(f"{rate:.2f} samples/s" if rate else "rate ?")
    if total:
        left = float(total) - done
        parts.append("ETA 0m00s" if left <= 0 else
                     (f"ETA {_duration(left / rate)}" if rate else "ETA ?"))
    return f"salmap: {unit}: " + ", ".join(parts)


class ProgressLine:
    """One unit's progress lines (every mode but ``ray.progress=off``).

    ``source``: a callable giving the actors' count (default: a counter actor started here
    when Ray is running); ``thread=False`` leaves printing to :meth:`tick` (tests).
    """

    def __init__(self, unit: str, total: int | None, cfg, out=print, interval: float = 10.0,
                 clock: Callable[[], float] = time.time,
                 source: Callable[[], float] | None = None, thread: bool = True) -> None:
        self.enabled = cfg.ray.progress != "off"
        self.unit, self.total, self.out, self.interval, self.clock = unit, total, out, interval, clock
        self.t0 = clock()
        self.written = 0.0  # samples with rows written (the execution's records)
        self.shown = 0.0  # what the last line said (never goes back)
        self.rows = 0  # rows committed
        self.committed_samples = 0
        self.history: collections.deque[tuple[float, float]] = collections.deque()
        self.last_line = ""
        self.lock = threading.Lock()
        self._actor = None
        self.source = source
        if self.enabled and source is None:
            self._actor = start_counter()
            if self._actor is not None:
                self._actor.reset.remote(unit)  # a unit run again in this job starts at zero
                self.source = self._poll_counter
        self._stop = threading.Event()
        self._thread = None
        if self.enabled and thread:
            self._thread = threading.Thread(target=self._run, name=f"salmap-progress-{unit}",
                                            daemon=True)
            self._thread.start()

    def _poll_counter(self) -> float:
        import ray

        return float(ray.get(self._actor.value.remote(self.unit), timeout=5))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    # -- inputs ----------------------------------------------------------------------------
    def update(self, done: int) -> None:
        """Samples with rows written so far (from the execution's records)."""
        with self.lock:
            self.written = max(self.written, float(done))

    def wave_done(self, record: dict) -> None:
        with self.lock:
            self.committed_samples += int(record["samples"])
            self.rows += int(record["rows"])

    # -- output ----------------------------------------------------------------------------
    def current(self) -> float:
        """Samples done: the larger of what was written and what the actors report."""
        reported = 0.0
        if self.source is not None:
            try:
                reported = float(self.source())
            except Exception:  # noqa: BLE001 - a slow or gone counter: use what was written
                reported = 0.0
        with self.lock:
            done = max(self.shown, self.written, reported)
            if self.total:
                done = min(done, float(self.total))
            self.shown = done
            return done

    def rate(self, now: float, done: float) -> float | None:
        """Samples per second over the last :data:`RATE_WINDOW_S` (None before two points
        with progress between them: start-up, model loading)."""
        h = self.history
        h.append((now, done))
        while len(h) > 2 and now - h[1][0] >= RATE_WINDOW_S:
            h.popleft()
        first = next(((t, d) for t, d in h if d > 0), None)
        if first is None or now <= first[0]:
            return None
        if h[0][1] > 0:
            first = h[0]
        return (done - first[1]) / (now - first[0]) if done > first[1] else None

    def tick(self) -> str:
        """Print one line (and return it)."""
        now = self.clock()
        done = self.current()
        line = format_line(self.unit, done, self.total, self.rate(now, done), self.rows)
        if self.enabled:
            self.out(line)
        self.last_line = line
        return line

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.enabled:
            with self.lock:
                done = max(self.shown, self.written)
            elapsed = self.clock() - self.t0
            rate = done / elapsed if elapsed > 0 and done > 0 else None
            self.out(format_line(self.unit, done, self.total, rate, self.rows).replace(
                ", ETA 0m00s", "") + f", done in {_duration(elapsed)}")
        if self._actor is not None:
            try:
                self._actor.reset.remote(self.unit)
            except Exception:  # noqa: BLE001 - the job is ending
                pass
            self._actor = None
