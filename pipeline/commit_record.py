"""A wave's commit record: its type (:class:`CommitRecord`), the one writer
(:func:`encode_record`) and the one reader (:func:`decode_record`, validated) of
``_commits/<unit>/<wave>.g<generation>.json``, and the one place its key is built
(:func:`commit_key`) and parsed (:func:`parse_commit_key`).

A record is stored as a JSON object; the fields below are checked on every load, and any
other field (what other parts of salmap add) is kept as it is, in :attr:`CommitRecord.extra`.
A damaged record is never read silently: :class:`DamagedRecord` names the record, what is
wrong and the way out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from salmap.workers.unit_id import data_prefix

COMMITS = "_commits"
# a generation's adoption list (pipeline.ledger): not a record, hence no ``.json`` suffix
GENERATIONS = f"{COMMITS}/_generations"
_RECORD_NAME = re.compile(r"^(?P<wave>.+?)(?:\.g(?P<gen>[0-9]+))?\.json$")


def commit_key(unit_id: str, wave_id: str, generation: int = 0) -> str:
    """The key of a wave's record written by the driver of ``generation`` (0: a ledger
    outside a locked run, e.g. a test or a bench: ``<wave>.json``)."""
    suffix = f".g{generation}" if generation else ""
    return f"{COMMITS}/{unit_id}/{wave_id}{suffix}.json"


def parse_commit_key(key: str) -> tuple[str, str, int] | None:
    """(unit id, wave id, generation) of a record's key; None for anything else."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != COMMITS or parts[1].startswith("_"):
        return None
    m = _RECORD_NAME.match(parts[2])
    if m is None:
        return None
    return parts[1], m["wave"], int(m["gen"] or 0)


def generation_key(generation: int) -> str:
    return f"{GENERATIONS}/g{generation:010d}"


def parse_generation_key(key: str) -> int | None:
    folder, _, name = key.rpartition("/")
    if folder != GENERATIONS or not name.startswith("g") or not name[1:].isdigit():
        return None
    return int(name[1:])

# field -> the JSON types it may have
REQUIRED: dict[str, tuple[type, ...]] = {
    "unit": (str,), "wave": (str,), "shards": (list,), "files": (list,),
    "rows": (int,), "errors": (int,), "samples": (int,),
}
OPTIONAL: dict[str, tuple[type, ...]] = {
    "per_shard": (dict,), "shard_identity": (dict,), "unreadable": (dict,),
    "config_hash": (str, type(None)), "elapsed_s": (int, float), "committed_at": (int, float),
    "generation": (int,), "aggregate": (dict,),
}


@dataclass(eq=True)
class CommitRecord(Mapping):
    """One wave's commit: what :class:`salmap.pipeline.tracker.WaveTracker` hands out, what the
    ledger writes and every reader gets back. Code reads its attributes; it is also a
    read-only mapping of its stored fields (``record["files"]``), for tools and tests that
    look at records as the JSON they are stored as."""

    unit: str
    wave: str
    shards: list[str]
    files: list[str]
    rows: int
    errors: int
    samples: int
    config_hash: str | None = None
    # shard name -> size, mtime_ns, samples (its identity when committed)
    shard_identity: dict[str, dict] = field(default_factory=dict)
    # shard name -> why it could not be opened (such shards are not committed)
    unreadable: dict[str, str] = field(default_factory=dict)
    # shard name -> samples, rows, errors, and ``failure`` when committed incomplete
    per_shard: dict[str, dict] = field(default_factory=dict)
    elapsed_s: float = 0.0  # since the unit's previous commit
    committed_at: float | None = None
    generation: int = 0  # the writing driver's generation (pipeline.ledger); 0: none
    aggregate: dict | None = None  # pipeline.aggregate of the wave's rows, packed; None: none
    extra: dict[str, Any] = field(default_factory=dict)  # other fields, kept as they are

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CommitRecord:
        """A record from its stored fields (not validated: :func:`decode_record` does that)."""
        if isinstance(data, CommitRecord):
            return data
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for name in ("shard_identity", "unreadable", "per_shard"):
            if known.get(name) is None:
                known.pop(name, None)
        if known.get("elapsed_s") is None:
            known.pop("elapsed_s", None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The stored fields: the extra ones, then the known ones (``generation`` only when
        set, ``aggregate`` and ``committed_at`` only when there is one)."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if (f.name == "generation" and not value) or (
                    f.name in ("aggregate", "committed_at") and value is None):
                continue
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> CommitRecord:
        """A copy with some fields changed."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    @property
    def failures(self) -> dict[str, str]:
        """Shards committed incomplete: name -> why."""
        return {s: info["failure"] for s, info in self.per_shard.items() if info.get("failure")}

    # -- the read-only mapping of the stored fields ---------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


WAY_OUT = ("move the record away to have `salmap run` redo its wave, or restore it from a "
           "copy; `salmap verify` checks the whole run")


class DamagedRecord(ValueError):
    """A commit record that cannot be trusted (unreadable, wrong fields, inconsistent)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"commit record {where} is damaged: {problem}; {WAY_OUT}")
        self.where, self.problem = where, problem


def encode_record(record: CommitRecord | Mapping[str, Any]) -> bytes:
    """The record's bytes, as every writer stores them (stable key order)."""
    data = CommitRecord.from_dict(record).to_dict()
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8")


def unit_data_prefix(unit_id: str) -> str:
    """The folder of a unit's data files (the one parse of a unit id: workers/unit_id.py)."""
    return data_prefix(unit_id)


def decode_record(data: bytes, key: str, where: str | None = None) -> CommitRecord:
    """Parse and validate the record stored at ``key`` (``_commits/<unit>/<wave>.g<N>.json``);
    ``where`` names it in errors (its URL)."""
    where = where or key
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedRecord(where, f"not valid JSON ({err}; {len(data)} bytes: truncated?)") \
            from None
    validate_record(record, key, where)
    return CommitRecord.from_dict(record)


def validate_record(record: Any, key: str, where: str | None = None) -> None:
    """Schema and consistency: the fields and their types; unit and wave as the key names
    them; shards and files each listed once; files under the wave's folder of this run;
    ``rows``/``samples``/``errors`` equal to the per-shard counts."""
    where = where or key
    if not isinstance(record, dict):
        raise DamagedRecord(where, f"expected a JSON object, found {type(record).__name__}")
    for name in REQUIRED:
        if name not in record:
            raise DamagedRecord(where, f"field {name!r} is missing")
    for name, types in {**REQUIRED, **OPTIONAL}.items():
        value = record.get(name)
        if name in record and (not isinstance(value, types) or
                               (isinstance(value, bool) and bool not in types)):
            raise DamagedRecord(where, f"field {name!r} is {type(value).__name__}, expected "
                                       f"{' or '.join(t.__name__ for t in types)}")
    parsed = parse_commit_key(key)
    if parsed is not None:
        unit_id, wave_id, generation = parsed
        if record["unit"] != unit_id or record["wave"] != wave_id:
            raise DamagedRecord(where, f"it names unit {record['unit']!r} wave "
                                       f"{record['wave']!r}, not {unit_id!r} {wave_id!r}")
        if record.get("generation", 0) != generation:
            raise DamagedRecord(where, f"it names generation {record.get('generation', 0)}, "
                                       f"its key {generation}")
    for name in ("shards", "files"):
        items = record[name]
        if not all(isinstance(x, str) and x for x in items):
            raise DamagedRecord(where, f"{name!r} holds something other than names")
        dup = sorted({x for x in items if items.count(x) > 1}) if len(set(items)) != len(items) \
            else []
        if dup:
            raise DamagedRecord(where, f"{name!r} lists {dup[0]} twice")
    folder = f"{unit_data_prefix(record['unit'])}/{record['wave']}/"
    for f in record["files"]:
        if not f.startswith(folder) or ".." in f.split("/"):
            raise DamagedRecord(where, f"file {f} is not under the wave's folder {folder}")
    for name in ("rows", "errors", "samples"):
        if record[name] < 0:
            raise DamagedRecord(where, f"{name!r} is negative")
    per_shard = record.get("per_shard") or {}
    if not set(per_shard) <= set(record["shards"]):
        extra = sorted(set(per_shard) - set(record["shards"]))[0]
        raise DamagedRecord(where, f"'per_shard' names shard {extra}, which 'shards' does not")
    if per_shard and set(per_shard) == set(record["shards"]):  # complete: the totals add up
        for name in ("rows", "errors", "samples"):
            try:
                total = sum(int(info[name]) for info in per_shard.values())
            except (KeyError, TypeError, ValueError):
                raise DamagedRecord(where, f"'per_shard' lacks {name!r} counts") from None
            if total != record[name]:
                raise DamagedRecord(where, f"{name!r} is {record[name]} but its shards hold "
                                           f"{total}")
    if record["files"] == [] and record["rows"] > 0:
        raise DamagedRecord(where, f"it counts {record['rows']} rows but lists no file")
