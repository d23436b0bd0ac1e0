"""Planning on the driver: shard listing, units, waves, and what is already committed."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass, field

import braceexpand
import pyarrow.fs as pafs
from salmap.workers.unit_id import UnitId, format_unit_id

from .config import ConfigError, MethodSection, ModelSection, SalmapConfig, unit_hash
from .decode import shard_name
from .storage import open_filesystem


@dataclass(frozen=True)
class Unit:
    """One (model, method) pair: its own actor pool and its own Ray Data execution per wave."""

    model: ModelSection
    method: MethodSection
    config_hash: str

    @property
    def id(self) -> str:
        """The unit id, ``<model>__<method>`` (:mod:`salmap.workers.unit_id`)."""
        return format_unit_id(self.model.name, self.method.name)

    @property
    def data_prefix(self) -> str:
        """The folder of the unit's rows: ``data/<model>/<method>``."""
        return UnitId(self.model.name, self.method.name).data_prefix


@dataclass
class Wave:
    """A group of shards committed together; its id is a function of its shards only."""

    shards: list[str]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        names = "\n".join(sorted(shard_name(s) for s in self.shards))
        first = shard_name(sorted(self.shards)[0])
        self.id = f"{first}-{len(self.shards)}-{hashlib.sha1(names.encode()).hexdigest()[:8]}"


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_shards(patterns: list[str], storage: object = None, missing: list[str] | None = None,
                  identity: dict[str, dict] | None = None) -> list[str]:
    """Brace patterns, globs, directories, files and ``s3://`` URLs -> a sorted list of shards.

    A pattern that matches nothing is an error naming it. With ``missing`` given, a named
    shard file that does not exist is appended there instead (the run reports it as failed and
    does the rest), as long as some shard exists. With ``identity`` given, it is filled with
    each shard's ``{"size", "mtime_ns"}`` from the same listing (no extra requests).
    """
    out: list[str] = []
    infos: dict[str, pafs.FileInfo] = {}
    for pattern in patterns:
        if pattern.startswith("demo://"):
            from .demo_data import ensure_demo_shards

            demo = [os.path.abspath(p) for p in ensure_demo_shards()]
            out.extend(demo)
            infos.update(zip(demo, pafs.LocalFileSystem().get_file_info(demo)))
            continue
        for item in braceexpand.braceexpand(pattern):
            found_infos = _expand_one(item, storage)
            found = list(found_infos)
            infos.update(found_infos)
            if not found and missing is not None and not _has_glob(item) and item.endswith(".tar"):
                missing.append(item)
                continue
            if not found:
                raise ConfigError(f"input.shards: {item!r} matches no shard (no such file or no .tar inside)")
            out.extend(found)
    if not out and missing:
        raise ConfigError(f"input.shards: none of the shards exist (e.g. {missing[0]!r})")
    seen: dict[str, str] = {}
    unique = []
    for s in out:
        name = shard_name(s)
        if name in seen and seen[name] != s:
            raise ConfigError(
                f"input.shards: two shards share the name {name!r} ({seen[name]} and {s}); "
                "sample ids are <shard name>/<key>, so shard file names must be unique"
            )
        if name not in seen:
            seen[name] = s
            unique.append(s)
    if identity is not None:
        for s in unique:
            info = infos.get(s)
            if info is not None:
                identity[shard_name(s)] = file_identity(info)
    return sorted(unique, key=shard_name)


def file_identity(info: pafs.FileInfo) -> dict:
    """What tells a rewritten shard from the one that was committed: size and mtime."""
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _expand_one(item: str, storage: object) -> dict[str, pafs.FileInfo]:
    """The shards one pattern names: url -> its listing entry."""
    fs, path = open_filesystem(item, storage)
    prefix = "s3://" if item.startswith("s3://") else ""
    if _has_glob(path):
        base = path
        while _has_glob(base):
            base = os.path.dirname(base)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        return {prefix + i.path: i for i in fs.get_file_info(sel)
                if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)}
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {prefix + path: info}
    if info.type == pafs.FileType.Directory:
        sel = pafs.FileSelector(path, recursive=False)
        return {prefix + i.path: i for i in sorted(fs.get_file_info(sel), key=lambda i: i.path)
                if i.type == pafs.FileType.File and i.path.lower().endswith(".tar")}
    return {}


def units_of(cfg: SalmapConfig) -> list[Unit]:
    """One unit per (model, method) of the config, each with its config hash."""
    return [Unit(model=m, method=meth, config_hash=unit_hash(cfg, m, meth))
            for m in cfg.models for meth in cfg.methods]


def waves_of(shards: list[str], per_wave: int, max_samples: int | None = None,
             index: dict[str, int] | None = None) -> list[Wave]:
    """Consecutive groups of at most ``per_wave`` shards and, where the shard index gives
    sample counts, at most ``max_samples`` samples (a wave has at least one shard)."""
    ordered = sorted(shards, key=shard_name)
    index = index or {}
    waves, group, count = [], [], 0
    for s in ordered:
        n = index.get(shard_name(s), 0)
        if group and (len(group) >= per_wave or (max_samples and count + n > max_samples)):
            waves.append(Wave(group))
            group, count = [], 0
        group.append(s)
        count += n
    if group:
        waves.append(Wave(group))
    return waves


def load_shard_index(shards: list[str], storage: object = None) -> dict[str, int]:
    """Sample counts per shard from ``shards.json`` files beside the shards (written by
    ``salmap shards`` and the demo), for reconciliation and progress; {} where absent."""
    import json

    counts: dict[str, int] = {}
    folders = sorted({s.rsplit("/", 1)[0] for s in shards})
    for folder in folders:
        fs, path = open_filesystem(f"{folder}/shards.json", storage)
        try:
            with fs.open_input_stream(path) as f:
                index = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            continue
        samples = index.get("samples", {}) if isinstance(index, dict) else {}
        counts.update({str(k): int(v) for k, v in samples.items()})
    wanted = {shard_name(s) for s in shards}
    return {k: v for k, v in counts.items() if k in wanted}
