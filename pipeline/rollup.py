"""Per-unit aggregates (:mod:`salmap.pipeline.aggregate`) of a run's committed rows, read from its
commit records in bounded memory: records are read a chunk at a time and folded into one
aggregate per unit, never all kept. A record without an aggregate (written before records
carried one) is replaced by the aggregate of its files, read a batch at a time."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.dataset as pads

from . import aggregate as agg_mod
from .commit_record import CommitRecord, decode_record
from .ledger import Ledger, list_records, parse_commit_key
from .storage import Store

READ_CHUNK = 64  # commit records read (in parallel) and folded at a time
# a unit with at most this many rows whose records' samples do not hold every row is
# aggregated again from its rows (bounded work), so small runs get exact figures and a full
# gallery even when their waves are larger than the records' samples
REFOLD_ROWS = 100_000
BATCH_ROWS = 8192  # rows per batch when a record's files are aggregated from the rows


def files_aggregate(store: Store, files: Iterable[str], keep: int = agg_mod.UNIT_SAMPLE
                    ) -> dict[str, Any]:
    """The aggregate of the rows in ``files``, computed from the rows a batch at a time (the
    exact path, and the fallback for records without an aggregate)."""
    out = agg_mod.empty()
    for f in files:
        ds = pads.dataset(store.path(f), filesystem=store.fs, format="parquet")
        cols = [c for c in ds.schema.names if c not in ("saliency", "saliency_png",
                                                       "label_map_png", "crop_box")]
        for batch in ds.to_batches(columns=cols, batch_size=BATCH_ROWS):
            import pyarrow as pa

            out = agg_mod.merge(out, agg_mod.of_table(pa.Table.from_batches([batch]), f, keep),
                                keep)
    return out


def record_aggregate(store: Store, record: CommitRecord) -> dict[str, Any]:
    """A commit record's aggregate (from its files where it carries none)."""
    if record.aggregate is not None:
        return agg_mod.unpack(record.aggregate)
    return files_aggregate(store, record.files, agg_mod.WAVE_SAMPLE)


def from_commits(store: Store, commits: dict[str, dict[str, CommitRecord]]) -> dict[str, dict]:
    """unit id -> aggregate, from commit records already in memory (in wave order)."""
    return {uid: agg_mod.merge_all(record_aggregate(store, rec) for _, rec in sorted(waves.items()))
            for uid, waves in sorted(commits.items())}


def unit_aggregates(store: Store, units: Iterable[str] | None = None, threads: int = 16
                    ) -> dict[str, dict]:
    """unit id -> aggregate of its committed rows: one listing of ``_commits/``, then the
    records read :data:`READ_CHUNK` at a time and folded (in wave order), none kept."""
    wanted = None if units is None else set(units)
    index = list_records(store)
    sizes = index.sizes
    keys = sorted(k for uid, waves in index.keys.items() if wanted is None or uid in wanted
                  for k in waves.values())
    out: dict[str, dict] = {}
    files: dict[str, list[str] | None] = {}  # while a unit is small enough to refold

    def read(key: str) -> tuple[dict, list[str]]:
        rec = decode_record(store.read_bytes(key, sizes[key]), key, store.url(key))
        return record_aggregate(store, rec), list(rec.files)

    with ThreadPoolExecutor(max(1, min(threads, len(keys) or 1))) as pool:
        for start in range(0, len(keys), READ_CHUNK):
            chunk = keys[start:start + READ_CHUNK]
            for key, (a, fs) in zip(chunk, pool.map(read, chunk)):
                uid = parse_commit_key(key)[0]  # type: ignore[index]
                out[uid] = agg_mod.merge(out.get(uid), a)
                kept = files.setdefault(uid, [])
                files[uid] = kept + fs if kept is not None and out[uid]["rows"] <= REFOLD_ROWS \
                    else None
    for uid, a in out.items():
        if not a["complete"] and files.get(uid) is not None:
            out[uid] = files_aggregate(store, files[uid])
    return out


def committed_file_lists(store: Store, threads: int = 16
                         ) -> dict[str, dict[str, CommitRecord]]:
    """unit id -> wave id -> commit record without its aggregate and shard detail: what readers
    and exports need of the records (their files), read a chunk at a time, the rest let go."""
    index = list_records(store)
    sizes = index.sizes
    keys = sorted(sizes)
    out: dict[str, dict[str, dict]] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(keys) or 1))) as pool:
        for start in range(0, len(keys), READ_CHUNK):
            chunk = keys[start:start + READ_CHUNK]
            for rec in pool.map(lambda k: decode_record(store.read_bytes(k, sizes[k]), k,
                                                        store.url(k)), chunk):
                out.setdefault(rec.unit, {})[rec.wave] = rec.replace(
                    aggregate=None, per_shard={}, shard_identity={}, extra={})
    return out


def ledger_aggregates(store: Store, ledger: Ledger) -> dict[str, dict]:
    """unit id -> aggregate: the ledger's, merged as the run committed; units whose records
    could not be merged as they came (one without an aggregate, a withdrawn wave), and small
    units whose sample lost rows (:data:`REFOLD_ROWS`), are folded again from their records."""
    out = {uid: t.aggregate or agg_mod.empty() for uid, t in ledger.totals.items()
           if t.aggregated and t.waves > 0}
    stale = [uid for uid, t in ledger.totals.items() if t.waves > 0 and (
        not t.aggregated or (t.rows <= REFOLD_ROWS and not (t.aggregate or {}).get("complete", True)))]
    if stale:
        out.update(unit_aggregates(store, stale))
    return dict(sorted(out.items()))
