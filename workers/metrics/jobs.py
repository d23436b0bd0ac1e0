"""Batched forward passes for the model metrics: every perturbed image of every sample and
every metric becomes one *job*; jobs run in chunks of at most ``max_batch`` images per
forward, across samples, steps and metrics alike.

A metric plans its work as :class:`JobGroup` s (which sample each job belongs to, and how to
render the images of a set of jobs on demand, so that only one chunk of perturbed images
exists at a time) plus a ``finish`` function that turns the group scores into output columns.
Groups with equal keys are run once (e.g. the clean image, shared by deletion, insertion and
average drop; the masked image, shared by average drop and confidence increase).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .registry import MetricError

CLEAN = "clean"
SCORES = {"softmax": 0, "logit": 1}


@dataclass
class JobGroup:
    """Jobs of one kind: ``samples[j]`` is the sample of job j (its target is the explained
    class); ``render(idx)`` returns the model inputs of jobs ``idx`` (a LongTensor)."""

    key: Hashable
    samples: Tensor
    render: Callable[[Tensor], Tensor]

    def __len__(self) -> int:
        return int(self.samples.numel())


@dataclass
class Plan:
    """A metric's jobs and how to turn their scores (key -> [J, 2] prob/logit) into columns."""

    groups: list[JobGroup]
    finish: Callable[[dict[Hashable, Tensor]], dict[str, Any]]


@dataclass
class Context:
    """Inputs shared by every metric of one call, with a cache for derived tensors (ranks,
    substrates) so that metrics asking for the same thing compute it once."""

    images: Tensor  # [B, 3, H, W] model input
    saliency: Tensor  # [B, H, W] float32, upsampled to the input size, finite
    targets: Tensor  # [B] int64
    mean: Tensor  # [1, 3, 1, 1]
    std: Tensor  # [1, 3, 1, 1]
    _cache: dict[Hashable, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """The number of samples."""
        return int(self.images.shape[0])

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value under ``key``, made once by ``make``."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def clean_group(self) -> JobGroup:
        """The unmodified images, one job per sample (shared by every metric that needs Y)."""
        images = self.images
        return JobGroup(CLEAN, torch.arange(self.batch, device=images.device), lambda j: images[j])


Planner = Callable[[Context, dict[str, Any]], Plan]
#: model metric name -> its planner, filled by :func:`planner` where each planner is defined
PLANNERS: dict[str, Planner] = {}


def planner(name: str) -> Callable[[Planner], Planner]:
    """Register the decorated function as the planner of the model metric ``name`` (the
    metric's spec, with its defaults and columns, is in :mod:`.registry`)."""

    def decorate(fn: Planner) -> Planner:
        if PLANNERS.get(name, fn) is not fn:
            raise ValueError(f"metric {name!r} has a planner already")
        PLANNERS[name] = fn
        return fn

    return decorate


def score_index(params: dict[str, Any]) -> int:
    """The score column a metric reads (0: softmax probability, 1: logit); MetricError for another
    name."""
    score = params.get("score", "softmax")
    if score not in SCORES:
        raise MetricError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return SCORES[score]


def run_groups(
    groups: list[JobGroup],
    forward: Callable[[Tensor], Tensor],
    targets: Tensor,
    max_batch: int,
    progress: Callable[[float], None] | None = None,
) -> dict[Hashable, Tensor]:
    """Score every job: key -> float32 Tensor[J, 2] (softmax probability, logit of the sample's
    target; the softmax in float32 whatever the model returns), with at most ``max_batch``
    images per forward; a chunk may span several groups. ``progress`` is told the fraction of
    the jobs scored after each forward."""
    unique: dict[Hashable, JobGroup] = {}
    for g in groups:
        unique.setdefault(g.key, g)
    todo = [g for g in unique.values() if len(g)]
    out = {key: torch.empty(len(g), 2, dtype=torch.float32, device=targets.device)
           for key, g in unique.items()}
    total = sum(len(g) for g in todo)
    step = max(1, int(max_batch))
    offsets, acc = [], 0
    for g in todo:
        offsets.append(acc)
        acc += len(g)
    with torch.inference_mode():
        for start in range(0, total, step):
            stop = min(total, start + step)
            parts, where = [], []
            for g, off in zip(todo, offsets):
                lo, hi = max(start, off), min(stop, off + len(g))
                if lo < hi:
                    idx = torch.arange(lo - off, hi - off, device=targets.device)
                    parts.append(g.render(idx))
                    where.append((g, idx))
            logits = forward(torch.cat(parts) if len(parts) > 1 else parts[0]).float()
            tgt = torch.cat([targets[g.samples[idx]] for g, idx in where]).view(-1, 1)
            prob = torch.softmax(logits, dim=1).gather(1, tgt)
            logit = logits.gather(1, tgt)
            both = torch.cat([prob, logit], dim=1)
            row = 0
            for g, idx in where:
                out[g.key][idx] = both[row:row + len(idx)]
                row += len(idx)
            if progress is not None:
                progress(stop / total)
    return out
