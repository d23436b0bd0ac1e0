"""Ray itself failing under a run: a raylet or the GCS that dies, a node that is lost.

That is no unit's fault and no reason to mark shards failed: the run is *interrupted*
(manifest status ``interrupted`` with the cause, lock released, exit 3) and the same command
resumes it. :func:`ray_failure` tells such an error from a unit's own (a model error, a bad
shard, one actor killed: those Ray Data retries or salmap reports per shard) and names what
died in one line; :class:`RayFailure` carries that line up to the driver's clean-up.

Ray's C++ core worker may end the driver process on its own a moment after its raylet dies
(``QuickExit`` when the object store connection breaks), before any Python clean-up runs; the
CLI's supervisor (:mod:`salmap.pipeline.supervise`) finishes the job from outside in that case. The
death notices Ray prints on the driver's stdout (the raylet's last log lines) are recorded for
it by :func:`watch_ray_errors` and kept off the console unless ``--verbose``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import chain

_NODE_ID = re.compile(r"node(?: with)?(?: node)? id:? ?([0-9a-f]{8,})", re.I)
_NODE_LOST = re.compile(r"\bnode\b[^.]*?\b(?:died|crashed|is dead|was lost|has been marked dead"
                        r"|been marked dead)", re.I)


class RayFailure(RuntimeError):
    """Ray failed under the run (not the run's work); ``str()`` names what died."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _short_node(text: str) -> str:
    m = _NODE_ID.search(text)
    return f" {m.group(1)[:12]}" if m else ""


def describe_ray_message(text: str) -> str | None:
    """What died, from a message of Ray's (an exception's or a GCS error notice), or None."""
    low = text.lower()
    if "local raylet died" in low:
        return "Ray's raylet on this machine died"
    if "raylet is terminated" in low or "raylet died" in low:
        return f"Ray's raylet{_short_node(text)} died"
    if "gcs" in low and any(w in low for w in ("died", "failed to connect", "unavailable",
                                                "disconnected", "timed out")):
        return "Ray's GCS (the cluster's head service) is unreachable or died"
    if _NODE_LOST.search(text):
        return f"Ray node{_short_node(text)} was lost"
    return None


def ray_failure(err: BaseException) -> str | None:
    """One line naming the Ray component that died under ``err``, or None when ``err`` is a
    unit's own failure (Ray's wrappers followed, as :func:`salmap.pipeline.errors.root_cause` does)."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return None
    for e in chain(err):
        if isinstance(e, rx.LocalRayletDiedError):
            return "Ray's raylet on this machine died"
        if isinstance(e, rx.NodeDiedError):
            return f"Ray node{_short_node(str(e))} was lost"
        if isinstance(e, rx.RpcError) or type(e).__name__ == "GcsRpcError":
            return describe_ray_message(str(e)) or (
                f"Ray's RPC to its core services failed ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]})")
        if isinstance(e, (rx.RaySystemError, rx.ActorDiedError, rx.OwnerDiedError,
                          rx.ObjectLostError)):
            found = describe_ray_message(str(e))
            if found:  # an actor or object lost with its node, not a killed worker
                return found
    return None


# -- the driver-side notices Ray prints (GCS error messages) --------------------------------
_recorded: list[str] = []


def watch_ray_errors(verbose: bool, on_death: Callable[[str], None] | None = None) -> None:
    """Record the error notices Ray's driver thread receives; a death notice is kept off the
    console (unless ``verbose``) and passed to ``on_death`` as one line naming what died.

    Ray prints them from a thread of its own through ``ray._private.worker.print_to_stdstream``
    (looked up at call time); other notices (a task killed for memory, ...) are printed as
    before.
    """
    try:
        import ray._private.worker as worker
    except ImportError:
        return
    original = getattr(worker.print_to_stdstream, "__wrapped_by_salmap__", None) \
        or worker.print_to_stdstream
    _recorded.clear()  # a new run (a notebook's next one): earlier deaths are not its own

    def printer(data, ignore_prefix: bool, _original=original):
        if data.get("pid") == "raylet":
            text = "\n".join(str(line) for line in data.get("lines") or [])
            what = describe_ray_message(text)
            if what:
                _recorded.append(what)
                if on_death is not None:
                    on_death(what)
                if not verbose:
                    return None
        return _original(data, ignore_prefix=ignore_prefix)

    printer.__wrapped_by_salmap__ = original  # type: ignore[attr-defined]
    worker.print_to_stdstream = printer


def recorded_death() -> str | None:
    """The first Ray death notice this process received, or None."""
    return _recorded[0] if _recorded else None


def local_ray_processes() -> dict[str, int]:
    """PIDs of the raylet and GCS this driver started (a local instance), else {}."""
    try:
        import ray._private.worker as worker

        node = worker._global_node
        if node is None:
            return {}
        out = {}
        for kind, key in (("raylet", "raylet"), ("gcs", "gcs_server")):
            infos = node.all_processes.get(key) or []
            if infos and getattr(infos[0], "process", None) is not None:
                out[kind] = infos[0].process.pid
        return out
    except Exception:  # noqa: BLE001 - private API: no pids, no pid watch
        return {}
