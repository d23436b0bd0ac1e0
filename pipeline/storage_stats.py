"""A filesystem that counts the requests made through it, by kind: how the control-plane
benchmark and tests measure storage requests per commit (on S3 each is an HTTP request)."""

from __future__ import annotations

from collections import Counter

import pyarrow.fs as pafs

from .delegating_fs import DelegatingHandler


class CountingHandler(DelegatingHandler):
    """Delegates to ``inner``; ``counts`` holds the number of calls per kind."""

    prefix = "counting"

    def __init__(self, inner: pafs.FileSystem) -> None:
        super().__init__(inner)
        self.counts: Counter[str] = Counter()

    def get_file_info(self, paths):
        self.counts["stat"] += 1
        return super().get_file_info(paths)

    def get_file_info_selector(self, selector):
        self.counts["list"] += 1
        return super().get_file_info_selector(selector)

    def create_dir(self, path, recursive):
        self.counts["mkdir"] += 1
        return super().create_dir(path, recursive)

    def delete_dir(self, path):
        self.counts["delete"] += 1
        return super().delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.counts["delete"] += 1
        return super().delete_dir_contents(path, missing_dir_ok)

    def delete_root_dir_contents(self):
        self.counts["delete"] += 1
        return super().delete_root_dir_contents()

    def delete_file(self, path):
        self.counts["delete"] += 1
        return super().delete_file(path)

    def move(self, src, dest):
        self.counts["move"] += 1
        return super().move(src, dest)

    def copy_file(self, src, dest):
        self.counts["copy"] += 1
        return super().copy_file(src, dest)

    def open_input_stream(self, path):
        self.counts["get"] += 1
        return super().open_input_stream(path)

    def open_input_file(self, path):
        self.counts["get"] += 1
        return super().open_input_file(path)

    def open_output_stream(self, path, metadata):
        self.counts["put"] += 1
        # object-store semantics: a PUT needs no parent "directory" (not counted)
        self.inner.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return super().open_output_stream(path, metadata)

    def open_append_stream(self, path, metadata):
        self.counts["put"] += 1
        return super().open_append_stream(path, metadata)


def counting_memory_store(uri: str = "mem://runs/run"):
    """A :class:`salmap.pipeline.storage.Store` over an in-memory filesystem, and its counter."""
    from .storage import Store

    handler = CountingHandler(pafs._MockFileSystem())
    fs = pafs.PyFileSystem(handler)
    root = uri.split("://", 1)[1]
    return Store(fs=fs, root=root, uri=uri), handler.counts
