"""Local folders and S3-compatible object stores behind one small interface (pyarrow filesystems).

Credentials come only from the environment or the standard AWS chain; nothing here ever
writes them anywhere.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 5.0
SINGLE_PUT_MAX = 16 * 2**20  # larger objects go through the filesystem's multipart upload


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


def write_temp_local(path: str, data: bytes) -> str:
    """``data`` in a new temp file beside ``path``, flushed to disk; returns its name. The
    first half of every atomic local write: the caller renames or links it into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic_local(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (temp file + rename): a reader sees the old
    content or the new, never a part."""
    os.replace(write_temp_local(path, data), path)


def create_exclusive_local(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists, content and existence in one step (a temp
    file hard-linked to the name). Without hard links (some FUSE mounts): ``O_EXCL``, then the
    content; a reader may then see it empty for a moment, which the run lock takes as held."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = write_temp_local(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # a filesystem without hard links: O_EXCL, then the content
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
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
        """The store at ``uri`` (local path or ``s3://``) with the config's storage options."""
        fs, root = open_filesystem(uri, storage)
        return cls(fs=fs, root=root, uri=uri.rstrip("/"), storage=storage)

    @property
    def is_s3(self) -> bool:
        """Whether the store is in an S3 bucket."""
        return self.uri.startswith("s3://")

    @property
    def is_local_disk(self) -> bool:
        """A plain local folder: writes use temp file + rename; other stores go through fs."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, key: str) -> str:
        """``key``'s path in the store's filesystem."""
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str) -> str:
        """``key``'s URL, as shown to a user."""
        return f"{self.uri}/{key}" if key else self.uri

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (retried on transient errors)."""
        info = with_retries(lambda: self.fs.get_file_info(self.path(key)), f"stat {key}")
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, key: str, size: int | None = None) -> bytes:
        """The object's bytes. ``size`` (from a listing) sizes the read buffer: a stream's
        read-all otherwise allocates 256 KiB per call, which adds up over parallel reads of
        small objects. On S3: one GET (a filesystem stream would HEAD the object first)."""
        if self.is_s3:
            return self._s3_get(key)

        def read() -> bytes:
            with self.fs.open_input_stream(self.path(key)) as f:
                if size is None:
                    return f.read()
                chunks = []
                while chunk := f.read(max(size, 1024)):
                    chunks.append(chunk)
                return b"".join(chunks)

        return with_retries(read, f"read {key}")

    def read_json(self, key: str, size: int | None = None) -> Any:
        """``key`` parsed as JSON."""
        return json.loads(self.read_bytes(key, size).decode("utf-8"))

    def read_json_if_exists(self, key: str) -> Any:
        """The object's JSON, or None when it does not exist: one request, not a HEAD first."""
        try:
            data = self.read_bytes(key)
        except FileNotFoundError:
            return None
        return json.loads(data.decode("utf-8"))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole. On S3 one PUT (atomic; a filesystem stream would make it a
        three-request multipart upload; above ``SINGLE_PUT_MAX``, multipart); locally: temp file + rename."""
        path = self.path(key)
        if self.is_s3 and len(data) <= SINGLE_PUT_MAX:
            self._s3_put(key, data)
            return
        if not self.is_local_disk:
            def put() -> None:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)

            with_retries(put, f"write {key}")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic_local(path, data)

    # -- small objects on S3: one boto3 request each, retried by botocore's policy
    # (storage.retries, standard mode) and, for injected faults, by with_retries
    def _s3_call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as err:
            code = s3_error_code(err)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            if code in PRECONDITION_CODES:
                raise
            message = err.response.get("Error", {}).get("Message") or code
            raise StorageError(f"cannot {what} {self.url(key)}: {code}: {message}") from err
        except BotoCoreError as err:
            raise StorageError(f"cannot {what} {self.url(key)}: {type(err).__name__}: "
                               f"{err}") from err

    def _s3_get(self, key: str) -> bytes:
        bucket, _, k = self.path(key).partition("/")

        def get() -> bytes:
            return s3_client(self.storage).get_object(Bucket=bucket, Key=k)["Body"].read()

        return self._s3_call("read", key, get)

    def _s3_put(self, key: str, data: bytes, **cond: str) -> None:
        from .faults import maybe_fail_write

        bucket, _, k = self.path(key).partition("/")

        def put() -> None:
            maybe_fail_write(self.path(key))
            s3_client(self.storage).put_object(Bucket=bucket, Key=k, Body=data, **cond)

        with_retries(lambda: self._s3_call("write", key, put), f"write {key}",
                     attempts=_attempts(self.storage))

    def write_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as JSON (stable key order) at ``key``, whole."""
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def _infos(self, prefix: str, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(prefix), recursive=recursive, allow_not_found=True)
        return with_retries(lambda: self.fs.get_file_info(sel), f"list {prefix}")

    def list(self, prefix: str, recursive: bool = True) -> list[str]:
        """Relative keys of files under ``prefix`` (empty when it does not exist)."""
        return sorted(self.list_sizes(prefix, recursive))

    def list_sizes(self, prefix: str, recursive: bool = True) -> dict[str, int]:
        """Relative key -> size of the files under ``prefix``, from one listing, in key order."""
        n = len(self.root) + 1
        files = sorted((i.path[n:], i.size) for i in self._infos(prefix, recursive)
                       if i.type == pafs.FileType.File)
        return dict(files)

    def list_dirs(self, prefix: str) -> list[str]:
        """The folders directly under ``prefix``, sorted."""
        n = len(self.root) + 1
        return sorted(i.path[n:] for i in self._infos(prefix, recursive=False)
                      if i.type == pafs.FileType.Directory)

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is fine."""
        try:
            with_retries(lambda: self.fs.delete_file(self.path(key)), f"delete {key}")
        except FileNotFoundError:
            pass

    def delete_dir(self, prefix: str) -> None:
        """Delete the folder ``prefix`` and everything in it; a missing one is fine."""
        info = self.fs.get_file_info(self.path(prefix))
        if info.type == pafs.FileType.NotFound:
            return
        if not self.is_local_disk:
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
        fails if the name exists), so nobody ever sees the object without its content. S3: one
        conditional PUT (``If-None-Match: *``). Other filesystems (the in-memory test store)
        have no conditional create: a plain write there.
        """
        if self.is_s3:
            from botocore.exceptions import ClientError

            try:
                self._s3_put(key, data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if s3_error_code(err) in PRECONDITION_CODES:
                    return False
                raise
        if self.is_local_disk:
            from .faults import maybe_fail_write

            def create() -> bool:
                maybe_fail_write(self.path(key))
                return create_exclusive_local(self.path(key), data)

            return with_retries(create, f"create {key}", attempts=_attempts(self.storage))
        self.write_bytes(key, data)
        return True


def _attempts(storage: Any) -> int:
    return max(1, int(_storage_dict(storage).get("retries") or 5))


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


# -- the start-up probe -------------------------------------------------------------------------
class StorageCheckError(StorageError):
    """The store cannot be used as configured; found by :func:`check_storage` before any work.

    ``transient``: the endpoint did not answer (down, unreachable, hung), which may pass by
    itself; otherwise (credentials, permissions, missing bucket) a person must fix something.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


PROBE_ATTEMPTS = 3  # the start-up probe's attempts per request (a dead endpoint fails in ~20 s)
_DENIED = ("AccessDenied", "AllAccessDisabled", "403", "Forbidden")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed")
_CREDENTIALS_HINT = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an "
                     "instance/pod role) on the driver and on every node")


def _has_credentials() -> bool:
    import botocore.session

    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile file and the like: let the probe say
        return True


def _probe_client(storage: Any, signed: bool):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    s = _storage_dict(storage)
    config = Config(
        connect_timeout=float(s.get("connect_timeout_s") or DEFAULT_CONNECT_TIMEOUT_S),
        read_timeout=float(s.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S),
        retries={"max_attempts": min(PROBE_ATTEMPTS, int(s.get("retries") or 5)),
                 "mode": "standard"},
        **({} if signed else {"signature_version": UNSIGNED}),
    )
    # a fresh session: credentials as the environment holds them now, not as first resolved
    return boto3.session.Session().client("s3", endpoint_url=s.get("endpoint") or None,
                                          region_name=s.get("region") or None, config=config)


def _explain_probe_failure(err: Exception, url: str, key: str, endpoint: str, storage: Any,
                           signed: bool, writing: bool) -> StorageCheckError:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    s = _storage_dict(storage)
    where = f"{url} ({key}) at {endpoint}"
    if isinstance(err, ConnectTimeoutError):
        return StorageCheckError(
            f"cannot connect to {endpoint} for {url} ({key}): no answer within storage."
            f"connect_timeout_s={s.get('connect_timeout_s') or DEFAULT_CONNECT_TIMEOUT_S:g} s, "
            f"{PROBE_ATTEMPTS} attempts; is the endpoint down or unreachable from here, or is "
            "storage.endpoint wrong?", transient=True)
    if isinstance(err, EndpointConnectionError):
        return StorageCheckError(
            f"cannot connect to {endpoint} for {url} ({key}): {err}; is the endpoint down or "
            "unreachable from here, or is storage.endpoint wrong?", transient=True)
    if isinstance(err, ReadTimeoutError):
        return StorageCheckError(
            f"{endpoint} accepted the connection for {url} ({key}) but sent nothing within "
            f"storage.request_timeout_s={s.get('request_timeout_s') or DEFAULT_REQUEST_TIMEOUT_S:g}"
            f" s, {PROBE_ATTEMPTS} attempts; is it overloaded, or not an S3 endpoint?",
            transient=True)
    if isinstance(err, NoCredentialsError):
        return StorageCheckError(f"no S3 credentials found for {where}; set {_CREDENTIALS_HINT}")
    if isinstance(err, ClientError):
        code = s3_error_code(err)
        message = err.response.get("Error", {}).get("Message") or code
        if code in ("NoSuchBucket", "404", "NotFound"):
            bucket = url[len("s3://"):].split("/", 1)[0]
            return StorageCheckError(f"bucket {bucket!r} does not exist at {endpoint} ({key}="
                                     f"{url}); create it, or fix {key} or storage.endpoint")
        if code in _BAD_CREDENTIALS:
            return StorageCheckError(f"{endpoint} rejected the S3 credentials for {url} ({key}): "
                                     f"{code}: {message}; check {_CREDENTIALS_HINT}")
        if code in _DENIED:
            if not signed:
                return StorageCheckError(f"access denied to {where} and no S3 credentials were "
                                         f"found; set {_CREDENTIALS_HINT}")
            need = ("s3:ListBucket, s3:PutObject and s3:DeleteObject" if writing
                    else "s3:ListBucket and s3:GetObject")
            return StorageCheckError(f"access denied to {where} ({code}: {message}): the "
                                     f"credentials lack permission; grant {need} there")
        return StorageCheckError(f"{where} failed the start-up check: {code}: {message}")
    return StorageCheckError(f"{where} failed the start-up check: {type(err).__name__}: {err}")


def check_storage(uri: str, storage: Any = None, *, write: bool = False,
                  key: str = "run.output") -> None:
    """Probe where a run reads (``write=False``) or writes (``write=True``) once, before any
    work, and turn a failure into a :class:`StorageCheckError` that names the endpoint, the
    bucket and the likely fix: endpoint down or unreachable, no credentials, rejected
    credentials, access denied, missing bucket. ``key`` is the config key ``uri`` came from.

    S3: list the prefix (one key) and, for ``write``, put and delete a small probe object.
    Local: for ``write``, create the folder and a probe file in it.
    """
    if not uri.startswith("s3://"):
        if write:
            path = os.path.abspath(uri)
            probe = os.path.join(path, f".salmap-probe-{uuid.uuid4().hex[:8]}")
            try:
                os.makedirs(path, exist_ok=True)
                with open(probe, "wb"):
                    pass
                os.unlink(probe)
            except OSError as err:
                raise StorageCheckError(f"cannot write to {path} ({key}): "
                                        f"{err.strerror or err}; fix {key} or the folder's "
                                        "permissions") from None
        return
    s = _storage_dict(storage)
    endpoint = s.get("endpoint") or f"AWS S3 ({s.get('region') or 'default region'})"
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    signed = _has_credentials()  # without: reads are tried anonymously (public buckets)
    if write and not signed:
        raise StorageCheckError(f"no S3 credentials found for {url} ({key}) at {endpoint}; "
                                f"set {_CREDENTIALS_HINT}")
    client = _probe_client(storage, signed=signed)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        if write:
            probe = f"{prefix}/_salmap_probe-{uuid.uuid4().hex[:12]}".lstrip("/")
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        raise _explain_probe_failure(err, url, key, endpoint, storage, signed, write) from None


def s3_prefix_of_pattern(pattern: str) -> str:
    """``s3://bucket/dir`` of a shard pattern (the folder before any glob or brace)."""
    head = re.split(r"[*?\[{]", pattern, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if "/" in head[len("s3://"):] else head


def check_job_storage(cfg: Any) -> None:
    """:func:`check_storage` for a job: its output (write) and each S3 input folder (read)."""
    check_storage(cfg.run.output, cfg.storage, write=True, key="run.output")
    seen = set()
    for pattern in cfg.input.shards:
        if str(pattern).startswith("s3://"):
            folder = s3_prefix_of_pattern(str(pattern))
            if folder not in seen:
                seen.add(folder)
                check_storage(folder, cfg.storage, write=False, key="input.shards")
