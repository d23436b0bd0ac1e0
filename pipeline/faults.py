"""Fault injection for resilience tests and benches: a filesystem whose first N writes fail
transiently, and a port that never answers (:func:`unanswered_port`).

Enabled only by the environment variable ``SALMAP_INJECT_WRITE_FAULTS=<n>:<state folder>``
(read on the driver). The failures look like S3 throttling (``SLOW_DOWN``), which Ray's Parquet
writer and salmap's own writes retry with backoff; the count is shared across processes
through files in the state folder, so exactly ``n`` writes fail in the whole job.
"""

from __future__ import annotations

import os
import socket
import time

import pyarrow.fs as pafs

from .delegating_fs import DelegatingHandler

ENV = "SALMAP_INJECT_WRITE_FAULTS"


class FlakyWrites(DelegatingHandler):
    """Delegates to ``inner``; the first ``n`` output streams opened raise a transient error."""

    prefix = "flaky"

    def __init__(self, inner: pafs.FileSystem, n: int, state: str) -> None:
        super().__init__(inner)
        self.n, self.state = n, state

    def _should_fail(self) -> bool:
        os.makedirs(self.state, exist_ok=True)
        for i in range(self.n):
            try:
                fd = os.open(os.path.join(self.state, f"fail-{i}"), os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            os.close(fd)
            return True
        return False

    def open_output_stream(self, path, metadata):
        """The wrapped filesystem's stream, unless this write is one of the injected faults."""
        if self._should_fail():
            raise _fault(path)
        return super().open_output_stream(path, metadata)

    def __eq__(self, other):
        return isinstance(other, FlakyWrites) and other.state == self.state

    def __ne__(self, other):
        return not self == other


def _fault(path: str) -> OSError:
    return OSError(f"AWS Error SLOW_DOWN during PutObject operation: injected fault for {path}")


def maybe_fail_write(path: str) -> None:
    """The same injected faults for writes that bypass the filesystem (salmap's single-PUT
    small objects on S3): raise the transient error while the job's budget of faults lasts."""
    spec = os.environ.get(ENV)
    if spec:
        n, state = spec.split(":", 1)
        if FlakyWrites(pafs.LocalFileSystem(), int(n), state)._should_fail():
            raise _fault(path)


def maybe_flaky(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs``, or ``fs`` whose writes fail as ``$SALMAP_INJECT_WRITE_FAULTS`` says (tests only)."""
    spec = os.environ.get(ENV)
    if not spec:
        return fs
    n, state = spec.split(":", 1)
    return pafs.PyFileSystem(FlakyWrites(fs, int(n), state))


def unanswered_port() -> tuple[int, list[socket.socket]]:
    """A loopback port whose SYNs go unanswered (its accept queue is full), like a firewalled
    host; returns the port and the sockets to close when done."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    held = [server]
    for _ in range(4):  # fill the accept queue; later SYNs are dropped
        conn = socket.socket()
        conn.setblocking(False)
        try:
            conn.connect(server.getsockname())
        except BlockingIOError:
            pass
        held.append(conn)
    time.sleep(0.2)
    return server.getsockname()[1], held
