"""Quiet console output: salmap's own lines by default, Ray's with ``--verbose``.

Two kinds of noise reach a user's console from Ray, on every run, none of which asks for any
action:

- Python log records of Ray core and Ray Data (the token-authentication notice, "Progress
  bars disabled", the per-execution INFO lines). :func:`quiet_ray_logging` raises the level
  of the loggers and console handlers that print them; Ray's log *files* keep everything.
- One ``E``-level line of Ray's C++ core worker, written straight to file descriptor 2:
  Ray Data's actor pools always pass their DataContext and transform chain as object-store
  references and restart actors, which Ray warns about (ray-project/ray#53727). Those
  references live as long as the execution that holds them, so the warning does not apply.
  :class:`StderrFilter` drops exactly the lines matching :data:`BENIGN_STDERR` and passes
  everything else through, in order. Only the CLI installs it (a notebook's stderr is not
  file descriptor 2).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

# Python loggers whose console output is noise at the default verbosity (their records still
# go to Ray's own log files)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune",
               "ray._private.authentication.authentication_token_setup")

# C++ lines (file descriptor 2) that never need action; matched anywhere in the line
BENIGN_STDERR = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '.*' .*has constructor arguments "
               r"in the object store and max_restarts > 0"),
    # Ray recovering objects on its own (after a worker or node loss; it succeeds or the
    # failure surfaces as an exception that salmap reports)
    re.compile(r"core_worker\.cc:\d+: :info_message: Attempting to recover \d+ lost objects"),
)

_tty_before_filter: bool | None = None


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (as it was before :class:`StderrFilter` replaced it)."""
    if _tty_before_filter is not None:
        return _tty_before_filter
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


_QUIET = _AtLeast(logging.ERROR)
_verbose = False


def is_verbose() -> bool:
    """Whether the last :func:`quiet_ray_logging` call asked for Ray's own lines."""
    return _verbose


class _NotRayDeath(logging.Filter):
    """Drops Ray's ERROR records about its own death (a raylet, the GCS, a node): the run says
    so in one line of its own (:mod:`salmap.pipeline.ray_failure`); Ray's log files keep them."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .ray_failure import ray_failure, recorded_death

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and ray_failure(exc):
            return False
        # Ray Data's advice line that precedes the stack trace of a system error
        return not (recorded_death() and "Ray Core internal code" in str(record.msg))


_NO_RAY_DEATH = _NotRayDeath()


def quiet_ray_logging(verbose: bool = False) -> None:
    """Keep Ray's Python log records below ERROR off the console (``verbose``: undo that).

    Applies to the loggers in :data:`RAY_LOGGERS` and to the console handlers attached to
    them now (Ray Data's are made on import; call it again after ``ray.init``, which adds the
    core's).
    """
    import ray.data  # noqa: F401 - configures Ray Data's loggers, so their handlers exist

    from .redact import REDACTING, redact_logging

    global _verbose
    _verbose = verbose
    redact_logging()
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if name.startswith("ray._private."):  # a leaf logger: its level is the switch
            logger.setLevel(logging.NOTSET if verbose else logging.ERROR)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) or "File" in type(handler).__name__:
                continue  # Ray's log files keep everything
            if REDACTING not in handler.filters:  # secrets in URLs: redacted, verbose or not
                handler.addFilter(REDACTING)
            if verbose:
                handler.removeFilter(_QUIET)
                handler.removeFilter(_NO_RAY_DEATH)
            elif _QUIET not in handler.filters:
                handler.addFilter(_QUIET)
                handler.addFilter(_NO_RAY_DEATH)
    if not verbose:
        # Ray Data's "Progress bars disabled" notice is logged once per process at WARNING
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    else:
        logging.getLogger("ray.data._internal.progress").setLevel(logging.NOTSET)


class StderrFilter:
    """Drop the lines matching ``patterns`` from file descriptor 2 while active.

    fd 2 is replaced by a pipe; a thread copies each line to the original stderr unless it
    matches. ``stop()`` (or leaving the ``with`` block) restores fd 2 and flushes what is left.
    """

    def __init__(self, patterns=BENIGN_STDERR) -> None:
        self.patterns = tuple(patterns)
        self.dropped: list[str] = []
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StderrFilter:
        """Start filtering the process's stderr (idempotent); returns self."""
        global _tty_before_filter
        if self._saved is not None:
            return self
        _tty_before_filter = stderr_is_tty()
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError):
            pass
        self._saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd, self._saved),
                                        name="salmap-stderr", daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_fd: int, out_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line + b"\n", out_fd)
            if pending:
                self._emit(pending, out_fd)

    def _emit(self, line: bytes, out_fd: int) -> None:
        text = line.decode("utf-8", "replace")
        if any(p.search(text) for p in self.patterns):
            self.dropped.append(text.rstrip("\n"))
            return
        os.write(out_fd, line)

    def stop(self) -> None:
        """Restore stderr as it was (idempotent)."""
        global _tty_before_filter
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes the pipe's last writer held here: the pump sees EOF
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        os.close(self._saved)
        self._saved, self._thread, _tty_before_filter = None, None, None

    def __enter__(self) -> StderrFilter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
