"""Reading one WebDataset shard: samples as raw bytes, then a marker row that says how the
shard ended.

Ray Data's ``read_webdataset`` fails a whole read task on a truncated tar (losing the samples
before the cut) and takes one filesystem for all paths. This reader runs inside a Ray Data
task per shard and never loses what it could read:

* a member is grouped into a sample by the WebDataset rule: the key is the member's path up
  to the first dot of its file name, the rest is the suffix; a sample's members are contiguous;
* a shard whose tar is truncated or corrupt keeps every sample read before the damage; the
  sample being read when the damage was found becomes an error row; the marker carries the
  root cause (``tarfile.ReadError: unexpected end of data``) and the shard is reported failed;
* a shard that cannot be opened at all (missing, access denied, not found on S3) yields only
  a marker whose ``unreadable`` flag tells the driver not to commit it;
* a sample whose key is not a safe relative name (``..`` segments, absolute or drive paths,
  control characters, over :data:`salmap.pipeline.safe_path.MAX_KEY_BYTES`) is an error row naming
  the member: keys are data and are never trusted as paths;
* a member larger than ``max_member_bytes`` (``input.max_member_bytes``, default
  :data:`MAX_MEMBER_BYTES`) makes its sample an error row naming the member, its size and the
  limit; its bytes are skipped, never read into memory, and the rest of the shard is read;
* a tar that ends without its end-of-archive block (cut at a member boundary, which Python's
  tarfile reads as a clean end) is reported truncated like one cut inside a member;
* an I/O error in the middle of a shard (after the resumes of :mod:`salmap.pipeline.shard_stream`)
  raises: the unit's execution fails and the driver retries the uncommitted work.

The bytes come through :func:`salmap.pipeline.shard_stream.open_shard`: one streaming GET per S3
shard, read in 8 MiB pieces, however large the shard. The tar iteration is the standard
library's; the webdataset package's iterator was not used (README, Design: it loses the
sample being read when a tar is damaged and splits a repeated key into two samples).

Every output row is ``__key__``, ``__url__``, ``members`` (a pickled ``{suffix: bytes}``),
``__error__`` and the marker fields ``shard_end`` / ``shard_samples`` / ``unreadable``.
"""

from __future__ import annotations

import pickle
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from .safe_path import key_problem, shown_key

# key = the member path up to the first dot of its file name; suffix = the rest (the rule
# Ray's read_webdataset and the webdataset package use)
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")


MAX_MEMBER_BYTES = 256 * 2**20  # input.max_member_bytes' default: one member, read into memory


class ShardDataError(ValueError):
    """The shard's bytes are not a well-formed WebDataset tar from some point on."""


def split_member(name: str) -> tuple[str, str] | None:
    """``'dir/a.b.jpg'`` -> ``('dir/a', 'b.jpg')``; None for a member without a suffix."""
    m = _KEY_SUFFIX.match(name)
    return (m.group(1), m.group(2)) if m else None


def describe(err: BaseException) -> str:
    """``module.Type: message`` for an exception, e.g. ``tarfile.ReadError: unexpected end of
    data``."""
    from .errors import type_name

    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type_name(err)}: {msg}" if msg else type_name(err)


def _refused(name: str, key: str, problem: str) -> str:
    return (f"sample key refused: tar member '{shown_key(name)}' gives the key '{shown_key(key)}', "
            f"and {problem}; rename the member (keys are names, never paths)")


def _ends_early(tar: tarfile.TarFile, size: int | None) -> bool:
    """True when an uncompressed tar stopped where no end-of-archive block was: Python's
    tarfile takes a file cut at a member boundary (or inside a header) as a clean end."""
    comptype = getattr(tar.fileobj, "comptype", "tar")
    return size is not None and comptype == "tar" and tar.offset + tarfile.BLOCKSIZE > size


def _too_large(name: str, size: int, limit: int) -> str:
    return (f"tar member '{shown_key(name)}' holds {size} bytes, more than the limit of {limit} "
            "bytes per member (input.max_member_bytes); it was skipped unread. Raise the limit "
            "if such members are expected")


def iter_samples(stream: Any, size: int | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "members": {suffix: bytes}}`` of a tar stream, in order; a sample
    whose key is not a safe name, or with a member over ``max_member_bytes``, has
    ``"__error__"`` (naming the member) and no members.

    ``size``: the stream's length in bytes, to tell a tar cut at a member boundary from a
    complete one. Raises :class:`ShardDataError` (with the samples so far already yielded)
    when the tar is damaged; the exception's ``partial`` attribute holds the key of the sample
    being read.
    """
    current: dict[str, Any] | None = None
    finished: set[str] = set()
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except tarfile.TarError as err:
        raise ShardDataError(describe(err)) from err
    try:
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise: memory grows per member
            if not info.isreg():
                continue
            parts = split_member(info.name)
            if parts is None:
                continue
            key, suffix = parts
            if current is not None and key != current["__key__"]:
                finished.add(current["__key__"])
                yield current
                current = None
            if current is None:
                if key in finished:
                    err = ShardDataError(
                        f"members of sample '{shown_key(key)}' are not contiguous in the tar (it "
                        "appears again after other samples); repack the shard sorted by name "
                        "(tar --sort=name, or salmap shards)")
                    err.partial = None  # type: ignore[attr-defined]
                    raise err
                current = {"__key__": key, "members": {}}
                problem = key_problem(key)
                if problem:
                    current["__error__"] = _refused(info.name, key, problem)
            if "__error__" in current:
                continue  # a refused sample's bytes are never read
            if info.size > max_member_bytes:  # the stream skips its bytes on the next header
                current["__error__"] = _too_large(info.name, info.size, max_member_bytes)
                current["members"] = {}
                continue
            f = tar.extractfile(info)
            current["members"][suffix] = f.read() if f is not None else b""
        if _ends_early(tar, size):
            raise tarfile.ReadError("unexpected end of data: the tar ends without its "
                                    "end-of-archive block")
    except (tarfile.TarError, EOFError, ShardDataError) as err:
        if isinstance(err, ShardDataError):
            err.partial = current["__key__"] if current else None  # type: ignore[attr-defined]
            raise
        wrapped = ShardDataError(describe(err))
        wrapped.partial = current["__key__"] if current else None  # type: ignore[attr-defined]
        raise wrapped from err
    if current is not None:
        yield current


def _row(url: str, key: str, members: dict[str, bytes] | None, error: str = "") -> dict[str, Any]:
    if key_problem(key):  # a refused key is stored escaped (it may not even be valid UTF-8)
        key = shown_key(key)
    return {"__key__": key, "__url__": url, "members": pickle.dumps(members or {}),
            "__error__": error, "shard_end": False, "shard_samples": -1, "unreadable": False}


def _marker(url: str, samples: int, error: str = "", unreadable: bool = False) -> dict[str, Any]:
    return {"__key__": "", "__url__": url, "members": b"", "__error__": error, "shard_end": True,
            "shard_samples": samples, "unreadable": unreadable}


def read_shard(url: str, storage: Any = None, chunk: int = 64,
               max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[list[dict[str, Any]]]:
    """Lists of up to ``chunk`` rows for one shard, the last one ending with its marker
    (``max_member_bytes``: :func:`iter_samples`)."""
    from .shard_stream import ShardOpenError, open_shard

    try:
        stream, size = open_shard(url, storage)
    except ShardOpenError as err:  # missing, access denied, bucket gone: nothing read, nothing lost
        yield [_marker(url, 0, f"cannot open the shard: {err}", unreadable=True)]
        return
    rows: list[dict[str, Any]] = []
    n = 0
    with stream:
        try:
            for sample in iter_samples(stream, size, max_member_bytes):
                rows.append(_row(url, sample["__key__"], sample["members"],
                                 sample.get("__error__", "")))
                n += 1
                if len(rows) >= chunk:
                    yield rows
                    rows = []
        except ShardDataError as err:
            reason = str(err)
            partial = getattr(err, "partial", None)
            if partial is not None:
                rows.append(_row(url, partial, None, error=(
                    f"the shard's tar is damaged inside this sample ({reason}); the samples "
                    "before it were read")))
                n += 1
            if n == 0 and "empty file" in reason.lower():
                reason = f"the shard is empty (0 bytes): {reason}"
            rows.append(_marker(url, n, f"shard truncated or corrupt after {n} sample(s): "
                                        f"{reason}"))
            yield rows
            return
    rows.append(_marker(url, n))
    yield rows
