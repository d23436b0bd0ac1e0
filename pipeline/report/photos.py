"""The original photos of the few gallery samples, read back from the run's input shards.

The output holds maps, not images, so the report re-reads the WebDataset tars named in the
run's config. Each needed shard is streamed once, through the pipeline's own buffered
shard stream (:func:`salmap.pipeline.shard_stream.open_shard`: one GET per S3 shard, not one
per 10 KiB tar read), and left as soon as its wanted keys are found. Anything unreachable (moved shards, no credentials) leaves the photo out, with the
reason, and the gallery shows the maps alone.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..decode import open_image, shard_name
from ..shard_stream import open_shard


@dataclass
class Photos:
    """(shard, key) -> image and its annotation text; ``problems`` says what could not be read."""

    images: dict[tuple[str, str], Image.Image] = field(default_factory=dict)
    boxes_json: dict[tuple[str, str], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def load_photos(wanted: set[tuple[str, str]], input_cfg: dict[str, Any], storage: Any) -> Photos:
    """Read the ``wanted`` (shard name, key) samples from the shards of ``input_cfg``."""
    out = Photos()
    if not wanted:
        return out
    try:
        from ..plan import expand_shards

        urls = {shard_name(u): u for u in expand_shards(list(input_cfg.get("shards") or []), storage)}
    except Exception as err:  # noqa: BLE001 - missing shards only cost the photos
        out.problems.append(f"input shards not reachable ({type(err).__name__}: {err})")
        return out
    image_keys = [k.lower() for k in input_cfg.get("image_keys") or ("jpg", "jpeg", "png", "webp")]
    boxes_key = str(input_cfg.get("boxes_key") or "json").lower()
    max_pixels = int(input_cfg.get("max_pixels") or 89_478_485)
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    for shard, keys in sorted(by_shard.items()):
        url = urls.get(shard)
        if url is None:
            out.problems.append(f"shard {shard!r} is not among the config's input shards")
            continue
        try:
            _read_shard(url, shard, keys, image_keys, boxes_key, max_pixels, storage, out)
        except Exception as err:  # noqa: BLE001
            out.problems.append(f"shard {url}: {type(err).__name__}: {err}")
    return out


def _read_shard(url: str, shard: str, keys: set[str], image_keys: list[str], boxes_key: str,
                max_pixels: int, storage: Any, out: Photos) -> None:
    stream, _ = open_shard(url, storage)
    finished: set[str] = set()  # a sample's files are contiguous in a shard: past it, it is done
    previous = None
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, ext = _split_member(member.name)
            if previous in keys and key != previous:
                finished.add(previous)
                if finished >= keys:
                    break
            previous = key
            if key not in keys or not member.isfile():
                continue
            if ext in image_keys and (shard, key) not in out.images:
                data = tar.extractfile(member).read()
                try:
                    out.images[(shard, key)] = open_image(data, max_pixels)
                except ValueError as err:
                    out.problems.append(f"{shard}/{key}: {err}")
            elif ext == boxes_key:
                out.boxes_json[(shard, key)] = tar.extractfile(member).read().decode("utf-8", "replace")
    for key in sorted(keys):
        if (shard, key) not in out.images and not any(p.startswith(f"{shard}/{key}:")
                                                      for p in out.problems):
            out.problems.append(f"{shard}/{key}: no image ({'/'.join(image_keys)}) in {url}")
