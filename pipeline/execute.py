"""One unit's work as ONE streaming Ray Data execution, committed wave by wave as it goes.

    shards (one item each) -> read (CPU tasks, pipeline.shard_reader)
      -> decode (CPU tasks) -> Explainer actors (one pool for the whole unit: the model loads,
      and compiles, once) -> post + write (CPU tasks: one Parquet file per batch and wave)
      -> the driver, which receives a small record per file and per shard end and commits each
      wave as soon as all its shards are in (pipeline.tracker).

A crash loses at most the waves in flight; a resumed run redoes only uncommitted waves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .accounting import UnitAccounting, pool_class_name
from .decode import SHARD_END, DecodeSpec, decode_batch
from .plan import Unit, Wave
from .storage import Store
from .tracker import WaveTracker

log = logging.getLogger("salmap")

# CPU asks of the stages around the actors. Read and write mostly wait on I/O; keeping them
# small matters on small nodes: Ray places a task on one node, so a 1-CPU task cannot start
# on two 1-CPU nodes that each hold a 0.5-CPU actor, and the execution waits forever.
IO_TASK_CPUS = 0.25
DECODE_TASK_CPUS = 0.5
READ_CHUNK = 64  # samples per block the reader yields
READ_GROUP_BYTES = 64 * 2**20  # shards read by one task: up to this many bytes (or one shard)
POST_BATCH = 128  # rows per post + write task: at most one Parquet file per wave each


# -- stage callables (plain function objects: they run as stateless CPU tasks) -------------
class _ReadShards:
    def __init__(self, storage: Any, max_member_bytes: int | None = None) -> None:
        from .shard_reader import MAX_MEMBER_BYTES

        self.storage = storage
        self.max_member_bytes = max_member_bytes or MAX_MEMBER_BYTES

    def __call__(self, batch: dict[str, np.ndarray]):
        import pandas as pd

        from .shard_reader import read_shard

        for group in batch["shards"]:
            for url in json.loads(str(group)):
                for rows in read_shard(url, self.storage, chunk=READ_CHUNK,
                                       max_member_bytes=self.max_member_bytes):
                    yield pd.DataFrame(rows)


def read_groups(waves: list[Wave], identity: dict[str, dict] | None = None,
                target_bytes: int = READ_GROUP_BYTES) -> list[list[str]]:
    """The shards of each wave in groups read by one task each: consecutive shards until the
    group holds ``target_bytes`` (sizes from the listing). Big shards get a task each; a wave
    of tiny shards is one task, not one per shard (a Ray task costs tens of ms to schedule)."""
    from .decode import shard_name

    identity = identity or {}
    groups: list[list[str]] = []
    for w in waves:
        group: list[str] = []
        size = 0
        for s in w.shards:
            n = identity.get(shard_name(s), {}).get("size")
            group.append(s)
            size += target_bytes if n is None else int(n)
            if size >= target_bytes:
                groups.append(group)
                group, size = [], 0
        if group:
            groups.append(group)
    return groups


class _Decode:
    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    def __call__(self, df):  # pandas block from _ReadShards
        return decode_batch(df.to_dict("records"), self.spec)


def decode_stage(ex: UnitExecution) -> Any:
    """The decode stage's callable: decode on the CPU, or with ``resources.decode_device``
    only the headers and annotations (:mod:`salmap.pipeline.device_decode`)."""
    if ex.device_decode:
        from .device_decode import DeferredDecode

        return DeferredDecode(ex.decode)
    return _Decode(ex.decode)


@dataclass
class WriteSpec:
    """What the post + write stage needs: where, which metrics, the file metadata."""

    store_uri: str
    storage: Any
    data_prefix: str
    wave_of: dict[str, str]  # shard name -> wave id
    post_metrics: dict[str, dict]
    curves: bool
    metadata: dict[str, str]
    map_dtype: str = "float16"
    png: str = "native"  # run.saliency_png
    unit_id: str = ""
    extra: dict = field(default_factory=dict)
    labels: dict | None = None  # pseudo_labels options (pipeline.config.pseudo_label_options)


def part_name(unit_id: str, keys: list[tuple[str, int]]) -> str:
    """A file name that is a function of the rows it holds: a retried task rewrites the same
    file instead of leaving a second copy of its rows next to it."""
    h = hashlib.sha1(unit_id.encode())
    for sample_id, target in sorted(keys):
        h.update(f"\n{sample_id}\t{target}".encode())
    return f"part-{h.hexdigest()[:20]}.parquet"


class _PostWrite:
    """Actor rows -> Parquet files (one per wave in the batch) -> one record per file and per
    shard-end marker for the driver."""

    def __init__(self, spec: WriteSpec) -> None:
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = post_write(batch, self.spec)
        return {c: np.array([r[c] for r in out], dtype=object) for c in RECORD_COLUMNS}


def post_write(batch: dict[str, np.ndarray], spec: WriteSpec) -> list[dict[str, Any]]:
    """One unit's actor rows -> its Parquet files (one per wave in the batch) -> the records
    for the driver: one per file and per shard-end marker (the first carries the actors)."""
    from .aggregate import of_table
    from .post import post_batch

    store = Store.open(spec.store_uri, spec.storage)
    out: list[dict[str, Any]] = []
    by_wave: dict[str, list[int]] = {}
    for i, status in enumerate(batch["status"]):
        shard = str(batch["shard"][i])
        if status == SHARD_END:
            out.append({"kind": "end", "wave": spec.wave_of.get(shard, ""), "path": "",
                        "shard": shard, "samples": int(batch["shard_samples"][i]),
                        "error": str(batch["shard_error"][i]),
                        "unreadable": str(batch["error"][i]) == "unreadable", "keys": "",
                        "aggregate": ""})
        else:
            by_wave.setdefault(spec.wave_of.get(shard, ""), []).append(i)
    for wave_id, rows in by_wave.items():
        table = post_batch(batch, spec.post_metrics, spec.curves,
                           {**spec.metadata, "salmap.wave": wave_id}, spec.map_dtype, rows,
                           spec.labels, spec.png)
        keys = list(zip(table.column("sample_id").to_pylist(),
                        table.column("shard").to_pylist(),
                        [-1 if t is None else t for t in table.column("target").to_pylist()],
                        table.column("status").to_pylist()))
        key = f"{spec.data_prefix}/{wave_id}/{part_name(spec.unit_id, [(k[0], k[2]) for k in keys])}"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd",
                       use_dictionary=dictionary_columns(table.schema))
        data = sink.getvalue().to_pybytes()
        store.write_bytes(key, data)  # retried with backoff inside
        out.append({"kind": "file", "wave": wave_id, "path": key, "shard": "", "samples": 0,
                    "error": "", "unreadable": False, "keys": json.dumps(keys),
                    "aggregate": json.dumps(of_table(table, key))})
    for r in out:
        r["actors"] = ""
    if out:
        out[0]["actors"] = actor_entries(batch)
    return out


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: all but the maps and PNGs (hashing every value
    of a map only to give up on the dictionary cost half of the Parquet encoding)."""
    return [f.name for f in schema if f.name != "saliency" and not f.name.endswith("_png")]


RECORD_COLUMNS = ("kind", "wave", "path", "shard", "samples", "error", "unreadable", "keys",
                  "actors", "aggregate")


def actor_entries(batch: dict[str, np.ndarray]) -> str:
    """JSON list of the actor batches in ``batch`` (:data:`salmap.pipeline.accounting.Entry`), with
    the samples each explained here (shard-end markers do not count)."""
    if "actor_id" not in batch or not len(batch["actor_id"]):
        return ""
    groups: dict[tuple, set[str]] = {}
    for i, actor in enumerate(batch["actor_id"]):
        key = (str(actor), str(batch["actor_device"][i]), int(batch["actor_start_ms"][i]),
               int(batch["batch_end_ms"][i]), int(batch["batch_ms"][i]))
        samples = groups.setdefault(key, set())
        if batch["status"][i] != SHARD_END:
            samples.add(str(batch["sample_id"][i]))
    return json.dumps([[*k, len(v)] for k, v in groups.items()])


def explainer_class(label_maps: bool) -> type:
    """The actor class: :class:`salmap.workers.actor.Explainer`, or with label maps a subclass that
    packs each sample's maps onto one of its rows (:func:`salmap.workers.metrics.label_maps.
    attach_sample_maps`): the post stage's batches may split a sample's rows, one actor call
    never does."""
    from salmap.workers.actor import Explainer

    if not label_maps:
        return Explainer
    from salmap.workers.metrics.label_maps import attach_sample_maps

    class SampleMapsExplainer(Explainer):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return attach_sample_maps(super().__call__(batch))

    return SampleMapsExplainer


# -- the driver side -------------------------------------------------------------------------
@dataclass
class UnitExecution:
    """Everything one unit's execution needs, built by :mod:`salmap.pipeline.run`."""

    unit: Unit
    waves: list[Wave]
    decode: DecodeSpec
    actor_spec: Any  # workers.actor.ActorSpec
    write: WriteSpec
    batch_size: int
    actors: int | tuple[int, int]  # fixed size, or (min, max) for an autoscaling pool
    actor_resources: dict[str, float]
    max_tasks_in_flight_per_actor: int = 2
    decode_batch_size: int = 32
    storage: Any = None
    identity: dict[str, dict] | None = None  # shard name -> size etc., to group small shards
    device_decode: bool = False  # JPEGs decoded by the actors (resources.decode_device)
    max_member_bytes: int | None = None  # input.max_member_bytes (None: the reader's default)


def read_and_decode(ex: UnitExecution):
    """The read and decode stages of ``ex``'s waves (shared by a group's units)."""
    import ray.data

    groups = read_groups(ex.waves, ex.identity)
    ds = ray.data.from_items([{"shards": json.dumps(g)} for g in groups],
                             override_num_blocks=len(groups))
    ds = ds.map_batches(_ReadShards(ex.storage, ex.max_member_bytes), batch_size=1, batch_format="numpy",
                        num_cpus=IO_TASK_CPUS)
    return ds.map_batches(decode_stage(ex), batch_format="pandas",
                          batch_size=ex.decode_batch_size, num_cpus=DECODE_TASK_CPUS)


def actor_pool(ex: UnitExecution):
    """``ex``'s actor pool: fixed size, or (min, max) autoscaling."""
    from ray.data import ActorPoolStrategy

    if isinstance(ex.actors, tuple):
        lo, hi = ex.actors
        return ActorPoolStrategy(min_size=lo, max_size=hi,
                                 max_tasks_in_flight_per_actor=ex.max_tasks_in_flight_per_actor)
    return ActorPoolStrategy(size=ex.actors,
                             max_tasks_in_flight_per_actor=ex.max_tasks_in_flight_per_actor)


def build_dataset(ex: UnitExecution):
    """The unit's Ray Data pipeline, ending in one small record per file and shard end."""
    ds = read_and_decode(ex)
    pool = actor_pool(ex)
    actor = explainer_class(bool((ex.write.labels or {}).get("label_maps")))
    # a subclass per unit: its actors carry the unit's name in Ray's actor table (accounting)
    udf = type(pool_class_name(ex.unit.id), (actor,), {})
    ds = ds.map_batches(udf, fn_constructor_args=(ex.actor_spec,), batch_size=ex.batch_size,
                        batch_format="numpy", compute=pool, **ex.actor_resources)
    return ds.map_batches(_PostWrite(ex.write), batch_format="numpy", batch_size=POST_BATCH,
                          num_cpus=IO_TASK_CPUS)


def run_unit(ex: UnitExecution, tracker: WaveTracker, on_commit: Callable[[dict], None],
             on_progress: Callable[[int], None] | None = None,
             accounting: UnitAccounting | None = None) -> None:
    """Stream the unit's execution; hand each complete wave's record to ``on_commit`` as soon
    as it is complete, and the actor batches to ``accounting``. Raises what the execution
    raised (committed waves stay committed)."""
    ds = build_dataset(ex)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["kind"])):
            take_record(batch, i, tracker, accounting)
        for record in tracker.ready():
            on_commit(record)
        if on_progress is not None:
            on_progress(tracker.samples_written)


def take_record(batch: dict[str, np.ndarray], i: int, tracker: WaveTracker,
                accounting: UnitAccounting | None) -> None:
    """Record ``i`` of a post + write batch (:data:`RECORD_COLUMNS`) into its unit's tracker
    and accounting: a written file with its rows' keys and aggregate, or a shard end. One
    place for a unit's own execution and a shared one, so both commit the same records."""
    text = str(batch["actors"][i]) if "actors" in batch else ""
    if text and accounting is not None:
        accounting.add(json.loads(text))
    if batch["kind"][i] == "file":
        keys = [tuple(k) for k in json.loads(str(batch["keys"][i]))]
        agg = str(batch["aggregate"][i]) if "aggregate" in batch else ""
        tracker.add_file(str(batch["path"][i]), keys, json.loads(agg) if agg else None)
    else:
        tracker.add_marker(str(batch["shard"][i]), int(batch["samples"][i]),
                           str(batch["error"][i]), bool(batch["unreadable"][i]))
