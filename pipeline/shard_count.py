"""A unit's sample total for its progress line when the shards have no ``shards.json`` index
(WebDataset shards made by any other tool): counted from the tar headers, or estimated from
the listed shard sizes.

- Local shards: the exact count, from the tar headers alone (the reader seeks past each
  member's data, so a shard of large images costs a few milliseconds).
- ``s3://`` shards: one ranged read of the first :data:`PREFIX_BYTES` of the first uncounted
  shard gives samples per byte (exact for a shard that fits); the total is that ratio times the
  bytes listed for the shards (their sizes come from the run's listing), an estimate shown as
  ``~N``. Reading every header on S3 would take a request per member.

Samples are grouped by the WebDataset rule of :mod:`salmap.pipeline.shard_reader`. Counts are cached
per shard URL and size for the driver's life (every unit reads the same shards).
"""

from __future__ import annotations

import io
import tarfile
import threading
from typing import Any

from .shard_reader import split_member

PREFIX_BYTES = 4 << 20
_cache: dict[tuple[str, int | None], int] = {}
_prefixes: dict[tuple[str, str], tuple[bytes, int]] = {}  # the first 4 MiB of a remote shard
_lock = threading.Lock()


def _count(tar: tarfile.TarFile, limit: int | None = None) -> tuple[int, int]:
    """(samples, bytes) of the tar's complete samples; with ``limit`` (a prefix of that many
    bytes) the last sample seen may be cut, so it is left out and the bytes end where it starts."""
    samples, last, start_of_last, end = 0, None, 0, 0
    try:
        for info in tar:
            if not info.isfile():
                continue
            parts = split_member(info.name)
            if parts is None:
                continue
            if limit is not None and info.offset_data + info.size > limit:
                return (samples - 1, start_of_last) if parts[0] == last else (samples, info.offset)
            if parts[0] != last:
                samples, last, start_of_last = samples + 1, parts[0], info.offset
            end = info.offset_data + info.size
    except (tarfile.TarError, OSError, EOFError):  # a truncated prefix, or a damaged shard
        pass
    if limit is not None:  # the prefix ended: its last sample may have more members after it
        return max(samples - 1, 0), start_of_last
    return samples, end


def count_local(path: str) -> int:
    """The exact number of samples in a local tar."""
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return _count(tar)[0]


def _prefix(url: str, storage: Any) -> tuple[bytes, int]:
    from .storage import open_filesystem

    with _lock:
        if ("prefix", url) in _prefixes:  # one read per shard and driver, not one per unit
            return _prefixes[("prefix", url)]
    fs, path = open_filesystem(url, storage)
    with fs.open_input_file(path) as f:
        got = f.read_at(PREFIX_BYTES, 0), f.size()
    with _lock:
        _prefixes[("prefix", url)] = got
    return got


def unit_total(shards: list[str], index: dict[str, int], identity: dict[str, dict],
               storage: Any = None) -> tuple[int | None, bool]:
    """(total samples, estimated) for ``shards``: the index where it has them, else counted
    or estimated as the module says; (None, False) when that fails (the line then has no total)."""
    from .decode import shard_name

    known, unknown = 0, []
    for s in shards:
        name = shard_name(s)
        if name in index:
            known += int(index[name])
            continue
        size = identity.get(name, {}).get("size")
        with _lock:
            cached = _cache.get((s, size))
        if cached is not None:
            known += cached
        else:
            unknown.append((s, size))
    try:
        local = [(s, size) for s, size in unknown if not s.startswith("s3://")]
        for s, size in local:
            n = count_local(s)
            with _lock:
                _cache[(s, size)] = n
            known += n
        remote = [(s, size) for s, size in unknown if s.startswith("s3://")]
        if not remote:
            return known, False
        data, size = _prefix(remote[0][0], storage)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            samples, used = _count(tar, None if size <= len(data) else len(data))
        if size <= len(data):  # the whole shard: exact
            with _lock:
                _cache[remote[0]] = samples
            if len(remote) == 1:
                return known + samples, False
        if samples <= 0 or used <= 0:
            return None, False
        listed = [sz if sz is not None else size for _, sz in remote]
        return known + round(sum(listed) * samples / used), True
    except Exception:  # noqa: BLE001 - a total is a convenience: the line goes on without one
        return None, False
