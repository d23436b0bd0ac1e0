"""A shard's bytes as one buffered stream: one GET per S3 shard, whatever its size.

pyarrow's S3 input stream turns every ``read`` into a ranged GET, and the tar parser reads
10 KiB at a time: a 2.1 MB shard cost 206 GETs. Here an S3 shard is one ``GetObject`` whose
body is read as it arrives, in :data:`READ_BUFFER` pieces, so memory stays at one buffer
however large the shard. If the connection drops mid-body, the read resumes where it stopped
with a ranged GET of the same object version (``If-Match`` its ETag), at most
``storage.retries`` times; a healthy read is one GET. Local shards are read through pyarrow
with the same buffer.

A compressed shard (``.tar.gz``, ``.tar.zst``, ... by its name, as pyarrow detects) is
decompressed on the way, as before.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

READ_BUFFER = 8 << 20  # bytes per read from storage (the tar parser asks for 10 KiB at a time)


class ShardOpenError(OSError):
    """The shard cannot be opened at all (missing, access denied, bucket gone, no endpoint)."""


class _S3Body(io.RawIOBase):
    """The body of one GET, resumed with a ranged GET of the same version if it breaks."""

    def __init__(self, client: Any, bucket: str, key: str, resumes: int) -> None:
        super().__init__()
        self.client, self.bucket, self.key, self.resumes = client, bucket, key, resumes
        resp = client.get_object(Bucket=bucket, Key=key)
        self.size = int(resp["ContentLength"])
        self.etag = resp["ETag"]
        self.body = resp["Body"]
        self.pos = 0
        self.gets = 1

    def readable(self) -> bool:
        return True

    def _resume(self, err: BaseException) -> None:
        from .shard_reader import describe

        if self.gets > self.resumes:
            raise OSError(f"s3://{self.bucket}/{self.key}: the read broke at byte {self.pos} of "
                          f"{self.size} {self.gets} time(s): {describe(err)}") from err
        self.body.close()
        resp = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                      Range=f"bytes={self.pos}-", IfMatch=self.etag)
        self.body = resp["Body"]
        self.gets += 1

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        view = memoryview(buffer).cast("B")
        want = min(len(view), self.size - self.pos)
        while want > 0:
            try:
                data = self.body.read(want)
            except (BotoCoreError, HTTPError, OSError) as err:
                self._resume(err)
                continue
            if not data:  # the connection closed before the object's end
                self._resume(EOFError(f"body ended at byte {self.pos} of {self.size}"))
                continue
            n = len(data)
            view[:n] = data
            self.pos += n
            return n
        return 0

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def _codec(path: str) -> str | None:
    try:
        return pa.Codec.detect(path).name
    except (ValueError, TypeError):
        return None


def open_shard(url: str, storage: Any = None) -> tuple[Any, int | None]:
    """``(binary stream, size in bytes of the uncompressed tar or None)`` for a shard URL.

    Raises :class:`ShardOpenError` when nothing can be read (the reader's unreadable marker).
    """
    if url.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        from .storage import _storage_dict, s3_client

        bucket, _, key = url[len("s3://"):].partition("/")
        try:
            raw: Any = _S3Body(s3_client(storage), bucket, key,
                               int(_storage_dict(storage).get("retries") or 5))
        except (ClientError, BotoCoreError, OSError) as err:
            raise ShardOpenError(_open_error(err)) from err
        size = raw.size
        stream: Any = io.BufferedReader(raw, READ_BUFFER)
    else:
        from .storage import open_filesystem

        fs, path = open_filesystem(url, storage)
        try:
            size = fs.get_file_info(path).size
            stream = fs.open_input_stream(path, compression=None, buffer_size=READ_BUFFER)
        except OSError as err:
            raise ShardOpenError(_open_error(err)) from err
    codec = _codec(url)
    if codec is not None:
        if not isinstance(stream, pa.NativeFile):
            stream = pa.PythonFile(stream, mode="r")
        stream, size = pa.CompressedInputStream(stream, codec), None
    return stream, size


def _open_error(err: BaseException) -> str:
    from .shard_reader import describe
    from .storage import s3_error_code

    code = s3_error_code(err)
    return f"{describe(err)} ({code})" if code and code not in str(err) else describe(err)
