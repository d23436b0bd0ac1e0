"""Stopping a run early: SIGTERM handled like Ctrl-C, and the manifest told so.

A scheduler stops a driver with SIGTERM (Kubernetes, ``ray job stop``, systemd), then SIGKILL
after a grace period. Python's default for SIGTERM is to die on the spot: no ``finally``, the
lock left to go stale, the manifest still saying "running". Inside :func:`sigterm_as_interrupt`
SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread instead, so the
run unwinds as on Ctrl-C: the manifest gets status ``interrupted`` (:func:`mark_interrupted`),
the lock is released, and ``salmap run`` exits 3 with the resume hint.

``ray.init`` installs its own SIGTERM handler; :func:`reassert_sigterm_handler` (called by
``init_ray``) puts ours back.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("salmap")

MANIFEST_KEY = "manifest.json"


class Terminated(KeyboardInterrupt):
    """The driver received SIGTERM; handled like Ctrl-C."""


_handler: Any = None  # ours, while a sigterm_as_interrupt block is active


def _make_handler():
    fired = False

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        nonlocal fired
        if fired:  # a second SIGTERM must not interrupt the clean-up of the first
            log.warning("salmap: SIGTERM again; still stopping")
            return
        fired = True
        raise Terminated(signal.Signals(signum).name)

    return handler


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (once)."""
    global _handler
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _handler = _make_handler()
    signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        _handler = None
        signal.signal(signal.SIGTERM, previous)


def reassert_sigterm_handler() -> None:
    """Put our handler back after something (``ray.init``) replaced it; no-op outside a
    :func:`sigterm_as_interrupt` block or off the main thread."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def interrupt_reason(err: BaseException) -> str:
    """``SIGTERM`` for :class:`Terminated`, else ``Ctrl-C (SIGINT)``."""
    if isinstance(err, Terminated):
        return str(err) or "SIGTERM"
    return "Ctrl-C (SIGINT)"


def mark_interrupted(store: Any, reason: str) -> bool:
    """Set the manifest's status to ``interrupted`` (with when and why), keeping the rest:
    committed rows stay committed and the next run resumes. Best effort: False when the
    manifest could not be written (the interruption itself is never masked)."""
    try:
        manifest = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else {}
        now = time.time()
        manifest.update(status="interrupted", updated=now,
                        interrupted={"at": now, "reason": reason})
        store.write_json(MANIFEST_KEY, manifest)
        return True
    except Exception as err:  # noqa: BLE001
        log.warning("salmap: could not mark the manifest interrupted: %s: %s",
                    type(err).__name__, err)
        return False
