"""Sample keys are data, never paths: the check every reader and writer applies.

A WebDataset key comes from a tar member's name, which whoever made the shard chose. The
shard reader refuses a key that could leave a folder once joined to it (a ``..`` segment, an
absolute or drive path, a backslash, an empty segment), that holds a control character or NUL,
or that is longer than :data:`MAX_KEY_BYTES`; that sample becomes an error row naming the
member. Every writer that turns a key into a path goes through :func:`join_inside`, which
applies the same check to each part and refuses what would leave its folder, so rows written
before the reader checked keys cannot escape either.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

# S3 keys are at most 1024 bytes; a sample key leaves room for the export's prefixes
MAX_KEY_BYTES = 512
MAX_PATH_BYTES = 1024  # a part of a path a writer joins (S3's limit for a whole key)
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UnsafePath(ValueError):
    """A key that would leave its folder, or is not a usable name (the message says why)."""


def key_problem(key: str, max_bytes: int = MAX_KEY_BYTES) -> str | None:
    """Why ``key`` is not a safe relative name (``a/b/c``) of at most ``max_bytes``, or None
    when it is."""
    if not key:
        return "the key is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "the key is not valid UTF-8"
    if size > max_bytes:
        return f"the key is longer than {max_bytes} bytes"
    if m := _CONTROL.search(key):
        return f"the key holds a control character ({m.group(0)!r})"
    if "\\" in key:
        return "the key holds a backslash (a path separator on Windows)"
    if key.startswith("/"):
        return "the key is an absolute path"
    if _DRIVE.match(key):
        return "the key starts with a drive letter"
    segments = key.split("/")
    if ".." in segments:
        return "the key has a '..' segment (it would leave the folder it is written to)"
    if "" in segments:
        return "the key has an empty path segment ('//' or a trailing '/')"
    return None


def shown_key(key: str) -> str:
    """``key`` as it can be stored and printed: escaped like Python's ``ascii`` (control
    characters, NUL and undecodable bytes visible), cut to :data:`MAX_KEY_BYTES` with a hash
    of the whole so distinct keys stay distinct."""
    text = ascii(key)[1:-1]
    if len(text) > MAX_KEY_BYTES:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        text = f"{text[:MAX_KEY_BYTES - 16]}...{digest}"
    return text


def check_key(key: str, what: str = "key", max_bytes: int = MAX_KEY_BYTES) -> str:
    """``key`` unchanged when safe, else :class:`UnsafePath` naming it."""
    problem = key_problem(key, max_bytes)
    if problem:
        raise UnsafePath(f"{what} '{shown_key(key)}': {problem}")
    return key


def join_inside(folder: str, *parts: str) -> str:
    """``folder/part/...`` as a relative key that stays inside ``folder``; raises
    :class:`UnsafePath` for a part that is not a safe relative name."""
    for part in parts:
        check_key(part, "path part", MAX_PATH_BYTES)
    joined = posixpath.join(folder, *parts) if folder else posixpath.join(*parts)
    norm = posixpath.normpath(joined)
    base = posixpath.normpath(folder) if folder else ""
    if base and base != "." and not (norm == base or norm.startswith(base + "/")):
        raise UnsafePath(f"{joined[:200]!r} leaves the folder {folder!r}")
    return joined
