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

ENV = "SALMAP_INJECT_WRITE_FAULTS"


class FlakyWrites(pafs.FileSystemHandler):
    """Delegates to ``inner``; the first ``n`` output streams opened raise a transient error."""

    def __init__(self, inner: pafs.FileSystem, n: int, state: str) -> None:
        self.inner, self.n, self.state = inner, n, state

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

    def _maybe_fail(self, path: str) -> None:
        if self._should_fail():
            raise OSError(f"AWS Error SLOW_DOWN during PutObject operation: injected fault for {path}")

    # writes
    def open_output_stream(self, path, metadata):
        self._maybe_fail(path)
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.inner.open_append_stream(path, metadata=metadata)

    # everything else delegates
    def get_type_name(self):
        return "flaky+" + self.inner.type_name

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        return self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        return self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self.inner.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        return self.inner.delete_file(path)

    def move(self, src, dest):
        return self.inner.move(src, dest)

    def copy_file(self, src, dest):
        return self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self.inner.open_input_file(path)

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def __eq__(self, other):
        return isinstance(other, FlakyWrites) and other.state == self.state

    def __ne__(self, other):
        return not self == other


def maybe_flaky(fs: pafs.FileSystem) -> pafs.FileSystem:
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
