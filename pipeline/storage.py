"""Local folders and S3-compatible object stores behind one small interface (pyarrow filesystems).

Credentials come only from the environment or the standard AWS chain; nothing here ever
writes them anywhere.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 5.0


class StorageError(RuntimeError):
    """A storage operation failed after retries."""


def _storage_dict(storage: Any) -> dict:
    if storage is None:
        return {}
    if isinstance(storage, dict):
        return storage
    keys = ("endpoint", "region", "retries", "connect_timeout_s", "request_timeout_s")
    return {k: getattr(storage, k) for k in keys if hasattr(storage, k)}


def s3_filesystem(storage: Any, max_attempts: int | None = None) -> pafs.S3FileSystem:
    """An S3FileSystem for AWS or any S3-compatible endpoint (``storage.endpoint``).

    ``connect_timeout_s`` bounds each TCP connect; ``request_timeout_s`` abandons a request
    when no byte has moved for that long (a stall, not a total: large uploads are fine).
    """
    s = _storage_dict(storage)
    kwargs: dict[str, Any] = {}
    endpoint = s.get("endpoint")
    if endpoint:
        scheme = "https"
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = scheme
    if s.get("region"):
        kwargs["region"] = s["region"]
    attempts = int(s.get("retries") or 5)
    if max_attempts is not None:
        attempts = min(attempts, max_attempts)
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    kwargs["connect_timeout"] = float(s.get("connect_timeout_s") or DEFAULT_CONNECT_TIMEOUT_S)
    kwargs["request_timeout"] = float(s.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S)
    return pafs.S3FileSystem(**kwargs)


def open_filesystem(uri: str, storage: Any = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or an ``s3://bucket/key`` URL."""
    from .faults import maybe_flaky

    if uri.startswith("s3://"):
        return maybe_flaky(s3_filesystem(storage)), uri[len("s3://"):].rstrip("/")
    return maybe_flaky(pafs.LocalFileSystem()), os.path.abspath(uri)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn`` until it succeeds, backing off exponentially with jitter on OSError."""
    for i in range(attempts):
        try:
            return fn()
        except OSError as err:
            if isinstance(err, FileNotFoundError) or i == attempts - 1:
                raise
            time.sleep(base_delay * (2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def create_exclusive_local(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists, content and existence in one step."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@dataclass
class Store:
    """A run's folder on a filesystem: read/write small objects by relative key."""

    fs: pafs.FileSystem
    root: str
    uri: str
    storage: Any = None

    @classmethod
    def open(cls, uri: str, storage: Any = None) -> Store:
        fs, root = open_filesystem(uri, storage)
        return cls(fs=fs, root=root, uri=uri.rstrip("/"), storage=storage)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def exists(self, key: str) -> bool:
        info = with_retries(lambda: self.fs.get_file_info(self.path(key)), f"stat {key}")
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()

        return with_retries(read, f"read {key}")

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole. On S3 one PUT is atomic; locally: temp file + rename."""
        path = self.path(key)
        if self.is_s3:
            def put() -> None:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)

            with_retries(put, f"write {key}")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def list(self, prefix: str, recursive: bool = True) -> list[str]:
        """Relative keys of files under ``prefix`` (empty when it does not exist)."""
        sel = pafs.FileSelector(self.path(prefix), recursive=recursive, allow_not_found=True)
        infos = with_retries(lambda: self.fs.get_file_info(sel), f"list {prefix}")
        n = len(self.root) + 1
        return sorted(i.path[n:] for i in infos if i.type == pafs.FileType.File)

    def list_dirs(self, prefix: str) -> list[str]:
        sel = pafs.FileSelector(self.path(prefix), recursive=False, allow_not_found=True)
        infos = with_retries(lambda: self.fs.get_file_info(sel), f"list {prefix}")
        n = len(self.root) + 1
        return sorted(i.path[n:] for i in infos if i.type == pafs.FileType.Directory)

    def delete(self, key: str) -> None:
        try:
            with_retries(lambda: self.fs.delete_file(self.path(key)), f"delete {key}")
        except FileNotFoundError:
            pass

    def delete_dir(self, prefix: str) -> None:
        info = self.fs.get_file_info(self.path(prefix))
        if info.type == pafs.FileType.NotFound:
            return
        if self.is_s3:
            for key in self.list(prefix):
                self.delete(key)
            try:
                self.fs.delete_dir(self.path(prefix))
            except OSError:
                pass
        else:
            self.fs.delete_dir(self.path(prefix))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist; True when this call created it.

        Local: the content goes to a temp file that is then hard-linked to the name (the link
        fails if the name exists), so nobody ever sees the object without its content. S3: a conditional PUT (``If-None-Match: *``) through boto3
        when it is installed; otherwise write-then-read-back (best effort, documented).
        """
        path = self.path(key)
        if not self.is_s3:
            return create_exclusive_local(path, data)
        try:
            import boto3  # noqa: F401
        except ImportError:
            if self.exists(key):
                return False
            self.write_bytes(key, data)
            return self.read_bytes(key) == data
        return self._s3_conditional_put(path, data)

    def _s3_conditional_put(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            s3_client(self.storage).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            if s3_error_code(err) in PRECONDITION_CODES:
                return False
            raise


# what S3 and S3-compatible stores answer when a conditional request loses
PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def s3_error_code(err: Exception) -> str:
    """The error code of a botocore ``ClientError`` ("" for anything else)."""
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def s3_client(storage: Any = None):
    """A boto3 S3 client for ``storage`` (endpoint, region, retries, timeouts; credentials from
    the environment), one per process and settings (boto3 clients are thread-safe)."""
    s = _storage_dict(storage)
    return _s3_client(s.get("endpoint") or None, s.get("region") or None,
                      int(s.get("retries") or 5),
                      float(s.get("connect_timeout_s") or DEFAULT_CONNECT_TIMEOUT_S),
                      float(s.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S))


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, retries: int, connect_timeout: float,
               read_timeout: float):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": retries, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)
