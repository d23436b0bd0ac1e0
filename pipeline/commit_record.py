"""A wave's commit record: the one writer (:func:`encode_record`) and the one reader
(:func:`decode_record`, validated) of ``_commits/<unit>/<wave>.g<generation>.json``, and the
one place its key is built (:func:`commit_key`) and parsed (:func:`parse_commit_key`).

A record is a JSON object; the fields below are checked on every load, and any other field
(aggregates other parts of salmap add) is kept as it is. A damaged record is never read
silently: :class:`DamagedRecord` names the record, what is wrong and the way out.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
    "generation": (int,),
}
WAY_OUT = ("move the record away to have `salmap run` redo its wave, or restore it from a "
           "copy; `salmap verify` checks the whole run")


class DamagedRecord(ValueError):
    """A commit record that cannot be trusted (unreadable, wrong fields, inconsistent)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"commit record {where} is damaged: {problem}; {WAY_OUT}")
        self.where, self.problem = where, problem


def encode_record(record: dict) -> bytes:
    """The record's bytes, as every writer stores them (stable key order)."""
    return json.dumps(record, indent=2, sort_keys=True, default=str).encode("utf-8")


def unit_data_prefix(unit_id: str) -> str:
    model, _, method = unit_id.partition("__")
    return f"data/{model}/{method}"


def decode_record(data: bytes, key: str, where: str | None = None) -> dict:
    """Parse and validate the record stored at ``key`` (``_commits/<unit>/<wave>.json``);
    ``where`` names it in errors (its URL)."""
    where = where or key
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedRecord(where, f"not valid JSON ({err}; {len(data)} bytes: truncated?)") \
            from None
    validate_record(record, key, where)
    return record


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
