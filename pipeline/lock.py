"""One driver per run: a lock object with a lease, renewed by a heartbeat, taken over when stale.

Every change of the lock object is a compare-and-swap against what its writer last saw, so two
drivers can never both believe they hold it:

- create: the object appears with its content in one step, only if it does not exist (locally
  a temp file hard-linked to the name; on S3 a conditional PUT, ``If-None-Match: *``);
- take over a stale lock, heartbeat, release: replace or delete the object only if it is still
  the version this driver read (S3: ``If-Match`` with its ETag; locally: compare the bytes and
  replace under an exclusive ``flock`` on ``_lock.json.guard``, which every writer takes).

A driver that finds its lock gone or taken over (a heartbeat fails its compare, or
:meth:`RunLock.check` reads another owner) has lost it; :meth:`RunLock.check` then raises
:class:`LockLost`. Call it right before anything becomes visible (a commit record, the
manifest) so a driver that was presumed dead cannot commit next to the one that replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .storage import (
    PRECONDITION_CODES,
    Store,
    create_exclusive_local,
    s3_client,
    s3_error_code,
    write_atomic_local,
)

LOCK_KEY = "_lock.json"


class LockHeld(RuntimeError):
    """Another driver holds this run's lock."""


class LockLost(RuntimeError):
    """This driver held the run's lock and no longer does (taken over, deleted, lease expired)."""


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. A zombie (killed, not yet reaped: a driver whose
    parent died, in a container whose init does not reap) is dead: it will never renew."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- the compare-and-swap primitives, per kind of store ----------------------------------------
class _LocalLockFile:
    """A lock file on a local or shared (NFS) filesystem. The version token is the content."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.guard_path = f"{path}.guard"
        self.guarded_ok = True  # False when the filesystem refuses flock

    def read(self) -> tuple[bytes | None, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data

    def create(self, data: bytes) -> Any:
        return data if create_exclusive_local(self.path, data) else None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.guard_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def replace(self, data: bytes, token: Any) -> Any:
        with self._guard():
            current, _ = self.read()
            if current is None or current != token:
                return None
            write_atomic_local(self.path, data)
            return data

    def delete(self, token: Any) -> bool:
        with self._guard():
            current, _ = self.read()
            if current is None or current != token:
                return False
            os.unlink(self.path)
            return True

    def can_take_over(self) -> bool:
        """Whether flock works here (a takeover without it could race; then it is refused)."""
        try:
            with self._guard():
                return True
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise


class _S3LockObject:
    """A lock object on S3 or an S3-compatible store. The version token is the ETag.

    Every successful conditional write is read back: a store that ignores the conditional
    headers then still shows a lost race (best effort there, exact on S3 and stores that honour
    ``If-None-Match`` / ``If-Match``).
    """

    def __init__(self, store: Store, key: str) -> None:
        self.client = s3_client(store.storage)
        self.bucket, _, self.key = store.path(key).partition("/")
        self.url = store.url(key)

    def read(self) -> tuple[bytes | None, Any]:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if s3_error_code(err) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        return resp["Body"].read(), resp["ETag"]

    def _put(self, data: bytes, **cond: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          **cond)["ETag"]
        except ClientError as err:
            if s3_error_code(err) in (*PRECONDITION_CODES, "NoSuchKey", "404"):
                return None
            raise
        try:
            current, _ = self.read()
        except Exception:  # noqa: BLE001 - the PUT succeeded; the read-back is only a cross-check
            return etag
        return etag if current == data else None

    def create(self, data: bytes) -> Any:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: Any) -> Any:
        return self._put(data, IfMatch=token)

    def delete(self, token: Any) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            return True
        except ClientError as err:
            if s3_error_code(err) in (*PRECONDITION_CODES, "NoSuchKey", "404"):
                return False
            if s3_error_code(err) not in ("NotImplemented", "InvalidArgument"):
                raise
        # a store without conditional deletes: delete if the object is still ours (best effort)
        _, etag = self.read()
        if etag != token:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True

    def can_take_over(self) -> bool:
        return True


def _backend(store: Store, key: str) -> _LocalLockFile | _S3LockObject:
    return _S3LockObject(store, key) if store.is_s3 else _LocalLockFile(store.path(key))


# -- the lock ---------------------------------------------------------------------------------
@dataclass
class RunLock:
    """The run's lock: :meth:`acquire`, :meth:`check` before every commit, :meth:`release`."""

    store: Store
    lease_s: float = 120.0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    key: str = LOCK_KEY

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ValueError(f"lock lease must be > 0 s, got {self.lease_s}")
        self._obj = _backend(self.store, self.key)
        self._token: Any = None  # the version of the lock object this driver last wrote
        self._last_beat = 0.0  # when the last successful write of it started (monotonic)
        self._lost: str | None = None
        # this driver's generation, fixed when it acquires: one more than the lock it took over
        # (or the floor it was given: one more than every generation the run has seen)
        self.generation = 0
        self._guard = threading.Lock()  # heartbeat thread vs check/release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.url(self.key)

    def _body(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "heartbeat": time.time(), "lease_s": self.lease_s, "generation": self.generation,
        }).encode()

    def _is_stale(self, info: dict) -> bool:
        age = time.time() - float(info.get("heartbeat", 0))
        if age > float(info.get("lease_s", self.lease_s)):
            return True
        same_host = info.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(info.get("pid", -1)))

    def _held_message(self, info: dict) -> str:
        age = time.time() - float(info.get("heartbeat", 0))
        return (f"run is locked by another driver (host {info.get('host')}, pid {info.get('pid')}, "
                f"heartbeat {age:.0f} s ago); wait for it to finish, or delete {self.url} if you "
                "are sure it is dead")

    def acquire(self, generation_floor: int = 1) -> None:
        """Create the lock, or take it over when it is stale; :class:`LockHeld` otherwise.

        The lock carries a generation: ``generation_floor`` when it is created, one more than
        the stale lock's (at least the floor) when taken over. The takeover is a
        compare-and-swap, so two drivers never get the same generation from one lock, and a
        driver's generation is always newer than that of the driver it replaced (the commit
        records carry it: :mod:`salmap.pipeline.ledger`)."""
        for _ in range(5):
            started = time.monotonic()
            self.generation = max(1, generation_floor)
            token = self._obj.create(self._body())
            if token is not None:
                return self._won(token, started)
            raw, token = self._obj.read()
            if raw is None:  # released between our create and our read: try again
                continue
            try:
                info = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise LockHeld(f"the run's lock {self.url} is unreadable; delete it if no driver "
                               "is running") from None
            if not self._is_stale(info):
                raise LockHeld(self._held_message(info))
            if not self._obj.can_take_over():
                raise LockHeld(f"the run's lock {self.url} is stale, but this filesystem has no "
                               "flock to take it over safely; delete it if no driver is running")
            started = time.monotonic()
            try:
                taken = int(info.get("generation") or 0)
            except (TypeError, ValueError):
                taken = 0
            self.generation = max(1, generation_floor, taken + 1)
            new = self._obj.replace(self._body(), token)
            if new is not None:
                return self._won(new, started)
            # another driver replaced or released the stale lock first: look again
        raise LockHeld(f"the run's lock {self.url} changed hands repeatedly while acquiring; "
                       "another driver is starting")

    def _won(self, token: Any, started: float) -> None:
        self._token, self._last_beat, self._lost = token, started, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name="salmap-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(max(0.05, self.lease_s / 4)):
            if not self.beat():
                return

    def beat(self) -> bool:
        """Renew the lease once; False when the lock is lost (recorded for :meth:`check`)."""
        with self._guard:
            if self._lost or self._token is None:
                return False
            started = time.monotonic()
            try:
                new = self._obj.replace(self._body(), self._token)
            except Exception:  # noqa: BLE001 - a missed beat is retried on the next one
                return True
            if new is None:
                self._lost = self._describe_loss()
                return False
            self._token, self._last_beat = new, started
            return True

    def _describe_loss(self) -> str:
        try:
            raw, _ = self._obj.read()
        except Exception as err:  # noqa: BLE001
            return f"the lock {self.url} could not be renewed ({type(err).__name__})"
        if raw is None:
            return f"the lock {self.url} was deleted by someone else"
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"the lock {self.url} was overwritten"
        if info.get("owner") == self.owner:
            return f"the lock {self.url} was changed behind this driver's back"
        return (f"another driver took over the lock {self.url} (host {info.get('host')}, pid "
                f"{info.get('pid')})")

    def check(self) -> None:
        """Raise :class:`LockLost` unless this driver still owns the lock with a live lease.

        Reads the lock object (one small GET); call it right before making anything visible.
        """
        with self._guard:
            if self._token is None and not self._lost:
                self._lost = "the lock was released (or never acquired)"
            if not self._lost:
                raw, token = self._obj.read()
                if raw is None or token != self._token:
                    self._lost = self._describe_loss()
                elif time.monotonic() - self._last_beat > self.lease_s:
                    self._lost = (f"the lease of {self.url} ran out: no heartbeat for "
                                  f"{time.monotonic() - self._last_beat:.0f} s (run.lock_lease_s="
                                  f"{self.lease_s:g}), so another driver may take it over")
            if self._lost:
                raise LockLost(f"this driver no longer holds the run's lock: {self._lost}; "
                               "stopping without committing more (run again to resume)")

    @property
    def lost(self) -> str | None:
        """Why the lock was lost, as the heartbeat or :meth:`check` found; None while held."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this driver's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._guard:
            token, self._token = self._token, None
            if token is None or self._lost:
                return
            try:
                self._obj.delete(token)
            except Exception:  # noqa: BLE001 - a lock left behind goes stale after its lease
                pass


def release_owned(store: Store, owner: str, key: str = LOCK_KEY) -> bool:
    """Delete the run's lock if ``owner`` still holds it (for a supervisor whose driver died
    without releasing it); False when it is gone or someone else's."""
    obj = _backend(store, key)
    raw, token = obj.read()
    if raw is None:
        return False
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return info.get("owner") == owner and bool(obj.delete(token))
