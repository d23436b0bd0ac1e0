"""``salmap sanity CONFIG``: the model-parameter randomization test (Adebayo et al. 2018).

For every model and method of the config, on the first ``samples`` decodable images of the
dataset: cascading randomization block by block from the output down (each MBConv / residual /
transformer block is one step), Spearman rank correlation (ties averaged; of |map| and signed)
and SSIM between the intact model's maps and each step's maps, all compared at the model
input's resolution (protocol: :mod:`salmap.workers.metrics.randomization`). Written to
``<run.output>/<run.id>/sanity/sanity.parquet`` (the protocol of each model in its metadata,
key ``salmap.sanity.protocol``) plus one plot per (model, method).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from salmap.workers import methods as method_registry
from salmap.workers.metrics.randomization import (
    cascading_randomization,
    plot_randomization,
    protocol,
    steps_for,
)
from salmap.workers.models import load_model
from salmap.workers.unit_id import format_unit_id

from .config import SalmapConfig
from .decode import DecodeSpec, decode_row
from .plan import expand_shards
from .run import resolve_run_id
from .storage import Store


def sample_rows(cfg: SalmapConfig, spec: DecodeSpec, samples: int) -> list[dict]:
    """The first ``samples`` decodable samples of the dataset, read with the pipeline's shard
    reader (one streaming GET, keys checked, a damaged tar read up to the damage)."""
    from .decode import unpack
    from .shard_reader import read_shard

    out: list[dict] = []
    for shard in expand_shards(cfg.input.shards, cfg.storage):
        for chunk in read_shard(shard, cfg.storage, chunk=8,
                                max_member_bytes=cfg.input.max_member_bytes):
            for r in chunk:
                if r["shard_end"]:
                    continue
                row = decode_row(unpack(r), spec)
                if row["status"] == "ok":
                    out.append(row)
                    if len(out) >= samples:
                        return out
    return out


def run_sanity(cfg: SalmapConfig, samples: int = 8, layers: str = "blocks") -> str:
    """Run the randomization test of each (model, method) and store its table and plots;
    returns the table's URL."""
    store = Store.open(f"{cfg.run.output.rstrip('/')}/{resolve_run_id(cfg)}/sanity", cfg.storage)
    records = []
    protocols: dict[str, dict] = {}
    for mcfg in cfg.models:
        loaded = load_model(mcfg.source, mcfg.weights, mcfg.target_layer, mcfg.input_size, mcfg.arch,
                            mcfg.params, mcfg.mean, mcfg.std, reshape=mcfg.reshape)
        p = loaded.preprocess
        spec = DecodeSpec(tuple(cfg.input.image_keys), cfg.input.label_key, cfg.input.boxes_key,
                          p.crop, p.resize, cfg.input.max_pixels)
        rows = sample_rows(cfg, spec, samples)
        if not rows:
            raise ValueError("no decodable sample found in input.shards")
        x = torch.from_numpy(np.stack([r["image"] for r in rows])).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
        with torch.no_grad():
            targets = loaded.model(x).argmax(1)
        protocols[mcfg.name] = protocol(layers, 0, steps_for(loaded.model, layers), x.shape[-2:])
        for meth in cfg.methods:
            params = dict(meth.params)
            if method_registry.get_class(meth.name).uses_target_layer:
                params.setdefault("target_layer", loaded.target_layer)
                if loaded.reshape is not None:
                    params.setdefault("reshape", loaded.reshape)

            def builder(model, name=meth.name, params=params):
                return method_registry.build(name, model, **params)

            results = cascading_randomization(loaded.model, builder, x, targets, seed=0, layers=layers)
            for step, r in enumerate(results):
                records.append({
                    "model": mcfg.name, "method": meth.name, "step": step, "layer": r.get("layer", "original"),
                    "spearman_mean": float(r.get("spearman_mean", float("nan"))),
                    "spearman_signed_mean": float(r.get("spearman_signed_mean", float("nan"))),
                    "ssim_mean": float(r.get("ssim_mean", float("nan"))),
                    "spearman": [float(v) for v in np.asarray(r.get("spearman", []), dtype=float).ravel()],
                    "samples": len(rows),
                })
            png = f"/tmp/salmap-sanity-{mcfg.name}-{meth.name}.png"
            plot_randomization(results, png, title=f"{mcfg.name} / {meth.name}")
            with open(png, "rb") as f:
                store.write_bytes(f"{format_unit_id(mcfg.name, meth.name)}.png", f.read())
    buf = io.BytesIO()
    table = pa.Table.from_pylist(records).replace_schema_metadata(
        {"salmap.sanity.protocol": json.dumps(protocols)})
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes("sanity.parquet", buf.getvalue())
    return store.url("sanity.parquet")
