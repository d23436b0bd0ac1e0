"""A filesystem that counts the requests made through it, by kind: how the control-plane
benchmark and tests measure storage requests per commit (on S3 each is an HTTP request)."""

from __future__ import annotations

from collections import Counter

import pyarrow.fs as pafs


class CountingHandler(pafs.FileSystemHandler):
    """Delegates to ``inner``; ``counts`` holds the number of calls per kind."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner
        self.counts: Counter[str] = Counter()

    def _n(self, kind: str) -> None:
        self.counts[kind] += 1

    def get_type_name(self):
        return "counting+" + self.inner.type_name

    def get_file_info(self, paths):
        self._n("stat")
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._n("list")
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._n("mkdir")
        return self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._n("delete")
        return self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._n("delete")
        return self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self._n("delete")
        return self.inner.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self._n("delete")
        return self.inner.delete_file(path)

    def move(self, src, dest):
        self._n("move")
        return self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self._n("copy")
        return self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        self._n("get")
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        self._n("get")
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._n("put")
        # object-store semantics: a PUT needs no parent "directory" (not counted)
        self.inner.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._n("put")
        return self.inner.open_append_stream(path, metadata=metadata)

    def normalize_path(self, path):
        return self.inner.normalize_path(path)


def counting_memory_store(uri: str = "mem://runs/run"):
    """A :class:`pipeline.storage.Store` over an in-memory filesystem, and its counter."""
    from .storage import Store

    handler = CountingHandler(pafs._MockFileSystem())
    fs = pafs.PyFileSystem(handler)
    root = uri.split("://", 1)[1]
    return Store(fs=fs, root=root, uri=uri), handler.counts
