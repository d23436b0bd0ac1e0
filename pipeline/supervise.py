"""``salmap run`` as two processes: a small supervisor around the Ray driver.

Ray's core worker can end the driver process from C++ (``QuickExit``, exit 1) a moment after
its raylet or the GCS dies: no ``finally`` runs, the manifest stays ``running``, the lock stays
behind, and the console shows Ray's crash dump instead of a salmap line. So the command line
runs the job in a child process and waits for it. The child notes, in a small JSON-lines file
(path in :data:`ENV`), the run it locked, the raylet / GCS it started, the Ray death notices it
received, and finally its exit code. A child that ends without that last note died under
Ray: the supervisor marks the manifest ``interrupted`` with the cause, releases the child's
lock, prints one salmap line naming what died, and exits 3; the same command resumes.

Signals: SIGINT and SIGTERM sent to the supervisor are passed to the child (its own process
group, so a terminal's Ctrl-C reaches it once), which stops as it always does (exit 3). A
supervisor killed outright takes the child with it (Linux: ``PR_SET_PDEATHSIG``), as killing a
one-process driver would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

ENV = "SALMAP_SUPERVISOR_NOTES"
EXIT_INCOMPLETE = 3  # pipeline.run's code, without importing it (the supervisor stays light)


# -- the child's side --------------------------------------------------------------------------
def note(**record: Any) -> None:
    """Append one record for the supervisor (no-op when not supervised; never raises)."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def supervised() -> bool:
    """Whether this process is the job child of ``salmap run``'s supervisor."""
    return bool(os.environ.get(ENV))


# -- the supervisor's side ---------------------------------------------------------------------
def read_notes(path: str) -> dict[str, Any]:
    """The child's records merged: later keys win; ``deaths`` keeps every death notice."""
    merged: dict[str, Any] = {"deaths": []}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the child's death
                if "death" in rec:
                    merged["deaths"].append(rec["death"])
                merged.update({k: v for k, v in rec.items() if k != "death"})
    except OSError:
        pass
    return merged


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (Linux /proc; elsewhere kill(0))."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the supervisor dies (Linux; elsewhere no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(EXIT_INCOMPLETE)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_supervised(argv: list[str]) -> int:
    """Run ``python -m salmap.pipeline.cli *argv`` as the child; its exit code, or 3 (see module)."""
    fd, path = tempfile.mkstemp(prefix="salmap-supervisor-", suffix=".jsonl")
    os.close(fd)
    parent = os.getpid()
    child = subprocess.Popen([sys.executable, "-m", "salmap.pipeline.cli", *argv],
                             env={**os.environ, ENV: path}, process_group=0,
                             preexec_fn=lambda: _die_with_parent(parent))
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:  # noqa: ARG001
        forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    before = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_death: str | None = None
    try:
        while True:
            try:
                code = child.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if first_death is None:
                first_death = _watch(read_notes(path))
        notes = read_notes(path)
        if "exit" in notes:
            return int(notes["exit"])
        return _finish_for_dead_child(notes, code, first_death or _watch(notes))
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        try:
            os.unlink(path)
        except OSError:
            pass


def _watch(notes: dict) -> str | None:
    """What of the child's local Ray has died, from the PIDs it noted."""
    for kind, pid in (notes.get("ray_pids") or {}).items():
        if pid and _dead(int(pid)):
            return {"raylet": f"Ray's raylet (pid {pid}) died",
                    "gcs": f"Ray's GCS server (pid {pid}) died"}.get(kind, f"Ray's {kind} died")
    return None


def _finish_for_dead_child(notes: dict, code: int, watched: str | None) -> int:
    """The child died without its exit note: interrupted, lock released, one line, exit 3."""
    what = watched or (notes["deaths"][0] if notes["deaths"] else None)
    cause = (f"Ray failed: {what} (the driver then ended with {_describe_exit(code)})" if what
             else f"the driver process died ({_describe_exit(code)}) before finishing")
    run = notes.get("run")
    where = ""
    if run:
        where = _release_run(run, cause)
    if not notes.get("said"):
        print(f"salmap: interrupted: {cause}{where}; run the same command again to resume",
              file=sys.stderr, flush=True)
    return EXIT_INCOMPLETE


def _release_run(run: dict, cause: str) -> str:
    """Mark the child's run interrupted (unless it got further) and release its lock."""
    try:
        from .interrupt import mark_interrupted
        from .lock import release_owned
        from .storage import Store

        store = Store.open(run["store"], run.get("storage"))
        manifest = store.read_json("manifest.json") if store.exists("manifest.json") else {}
        if manifest.get("status") not in ("interrupted", "complete", "incomplete"):
            mark_interrupted(store, cause)
        release_owned(store, run["lock_owner"])
        return ""
    except Exception as err:  # noqa: BLE001 - the line below still says what happened
        from .redact import redact

        return redact(f" (its manifest and lock at {run.get('store')} could not be updated: "
                      f"{type(err).__name__}: {err}; a new run takes a dead driver's lock over)")
