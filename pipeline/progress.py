"""Progress a person can read in a long run: per unit, samples done / total, rows committed,
rate and ETA, printed every ``interval`` seconds (10 s) while the unit runs.

Two sources, the larger wins:

- what was written, from the execution's own output (one record per Parquet file), which
  moves only when a batch has gone through the post and write stage;
- what the model actors report while they work, through one small counter actor for the
  job (:class:`Counter`, named :data:`salmap.workers.progress.COUNTER_NAME`): per unit, samples
  finished plus the part of the current batch done, which iterative methods report step by
  step (see :mod:`salmap.workers.progress`). So the count moves during long batches too.

The line counts whole samples; its percentage follows the fractional progress, so it moves
inside a long batch. The total comes from the shard index, else from the tar headers or the
listed shard sizes (:mod:`salmap.pipeline.shard_count`; ``~`` marks an estimate). The rate is measured
over recent history once the count has moved between two lines, and before that comes from the
actors' completed batches (samples / seconds in batches, summed over actors), so it is there
from the first completed batch on. A line that would say nothing new (same count, percentage
and rows) is not printed, except once a minute with how long nothing has changed.

``ray.progress``: ``auto`` and ``lines`` print these lines (``auto`` also on a terminal);
``bars`` adds Ray Data's per-stage bars; ``off`` prints nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from salmap.workers.progress import COUNTER_NAME

RATE_WINDOW_S = 120.0  # the rate is measured over this much recent history
QUIET_S = 60.0  # a line with nothing new is printed at most this often


class Counter:
    """The job's counter (a Ray actor, no CPU): per unit, each model actor's latest report."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, tuple[float, float, float]]] = {}

    def report(self, unit: str, key: str, finished: float, partial: float,
               busy_s: float = 0.0) -> None:
        """An actor's progress for ``unit``: samples finished and in its current batch, busy time."""
        self.reports.setdefault(unit, {})[key] = (float(finished), float(partial), float(busy_s))

    def value(self, unit: str) -> float:
        """Samples of ``unit`` done so far, over all its actors (partial batches included)."""
        return sum(f + p for f, p, _ in self.reports.get(unit, {}).values())

    def state(self, unit: str) -> tuple[float, float | None]:
        """(samples done, the actors' rate: each actor's finished samples over the seconds its
        completed batches took, summed; None before a batch has completed)."""
        reports = self.reports.get(unit, {}).values()
        rates = [f / b for f, _, b in reports if f > 0 and b > 0]
        return self.value(unit), (sum(rates) if rates else None)

    def reset(self, unit: str) -> None:
        """Forget ``unit``'s reports."""
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
                rows: int | None = None, approx: bool = False) -> str:
    """``salmap: UNIT: 12/29 samples (43%), 36 rows committed, 0.52 samples/s, ETA 0m33s``:
    whole samples; the percentage from the fractional progress (it moves inside a batch);
    ``approx``: the total is an estimate (``~29``)."""
    if total:
        done = min(done, float(total))
    count = int(done + 1e-9)
    parts = [f"{count}/{'~' if approx else ''}{total} samples ({100.0 * done / total:.0f}%)"
             if total else f"{count} samples"]
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
                 source: Callable[[], float | tuple[float, float | None]] | None = None,
                 thread: bool = True, approx: bool = False) -> None:
        self.enabled = cfg.ray.progress != "off"
        self.unit, self.total, self.out, self.interval, self.clock = unit, total, out, interval, clock
        self.approx = approx  # the total is an estimate (shard sizes)
        self.actor_rate: float | None = None  # from the actors' completed batches
        self.last_news: tuple | None = None  # what the last printed line said, rate aside
        self.last_printed = float("-inf")
        self.t0 = clock()
        self.news_since = self.t0  # when the count, percentage or rows last changed
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

    def _poll_counter(self) -> tuple[float, float | None]:
        import ray

        return tuple(ray.get(self._actor.state.remote(self.unit), timeout=5))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    # -- inputs ----------------------------------------------------------------------------
    def update(self, done: int) -> None:
        """Samples with rows written so far (from the execution's records)."""
        with self.lock:
            self.written = max(self.written, float(done))

    def wave_done(self, record: dict) -> None:
        """Count a committed wave's samples and rows."""
        with self.lock:
            self.committed_samples += int(record["samples"])
            self.rows += int(record["rows"])

    # -- output ----------------------------------------------------------------------------
    def current(self) -> float:
        """Samples done: the larger of what was written and what the actors report."""
        reported = 0.0
        if self.source is not None:
            try:
                got = self.source()
                if isinstance(got, tuple):
                    got, self.actor_rate = got
                reported = float(got)
            except Exception:  # noqa: BLE001 - a slow or gone counter: use what was written
                reported = 0.0
        with self.lock:
            done = max(self.shown, self.written, reported)
            if self.total:
                done = min(done, float(self.total))
            self.shown = done
            return done

    def rate(self, now: float, done: float) -> float | None:
        """Samples per second over the last :data:`RATE_WINDOW_S`; before two points with
        progress between them (start-up, model loading) the actors' rate, else None."""
        measured = self._measured(now, done)
        return measured if measured is not None else self.actor_rate

    def _measured(self, now: float, done: float) -> float | None:
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
        """Print one line, unless it says nothing new (and return it)."""
        now = self.clock()
        done = self.current()
        line = format_line(self.unit, done, self.total, self.rate(now, done), self.rows,
                           self.approx)
        news = (int(done + 1e-9), round(100.0 * done / self.total) if self.total else None,
                self.rows)
        if news != self.last_news:
            self.news_since = now
        elif now - self.last_printed < QUIET_S:
            return line  # the same count, percentage and rows: nothing to say
        else:
            line += f", no change for {_duration(now - self.news_since)}"
        if self.enabled:
            self.out(line)
            self.last_printed = now
        self.last_news = news
        self.last_line = line
        return line

    def finish(self) -> None:
        """Stop the printing thread and print the unit's last line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.enabled:
            with self.lock:
                done = max(self.shown, self.written)
            elapsed = self.clock() - self.t0
            rate = done / elapsed if elapsed > 0 and done > 0 else None
            self.out(format_line(self.unit, done, self.total, rate, self.rows, self.approx).replace(
                ", ETA 0m00s", "") + f", done in {_duration(elapsed)}")
        if self._actor is not None:
            try:
                self._actor.reset.remote(self.unit)
            except Exception:  # noqa: BLE001 - the job is ending
                pass
            self._actor = None
