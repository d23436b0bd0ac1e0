"""A pyarrow filesystem handler that passes every call to an inner filesystem: the base of the
handlers that change one thing about a filesystem (inject faults, count requests)."""

from __future__ import annotations

import pyarrow.fs as pafs


class DelegatingHandler(pafs.FileSystemHandler):
    """Every :class:`pyarrow.fs.FileSystemHandler` call, delegated to ``inner``."""

    prefix = "delegating"

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner

    def get_type_name(self):
        return f"{self.prefix}+{self.inner.type_name}"

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

    def open_output_stream(self, path, metadata):
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.inner.open_append_stream(path, metadata=metadata)

    def normalize_path(self, path):
        return self.inner.normalize_path(path)
