"""The model metrics' batching (workers/metrics/jobs.py): chunks of at most ``max_batch``
images per forward across groups, the right score per job, progress as a fraction, and the
default score."""

from __future__ import annotations

import pytest
import torch
from salmap.workers.metrics.jobs import SCORES, JobGroup, run_groups, score_index
from salmap.workers.metrics.registry import MetricError


def groups_of(sizes: list[int], batch: int) -> list[JobGroup]:
    """Group g's job j renders an image whose pixels all equal 100 g + j (its own identity)."""
    out = []
    for g, n in enumerate(sizes):
        samples = torch.arange(n) % batch

        def render(idx: torch.Tensor, g: int = g) -> torch.Tensor:
            return (100.0 * g + idx.float()).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()

        out.append(JobGroup(("g", g), samples, render))
    return out


class Recording(torch.nn.Module):
    """Logits [v, -v, 0] from the image's value v, recording each forward's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        v = x.mean(dim=(1, 2, 3)) / 1000.0
        return torch.stack([v, -v, torch.zeros_like(v)], dim=1)


@pytest.mark.parametrize("max_batch", [1, 3, 4, 64])
def test_chunks_hold_at_most_max_batch_images_and_fill_them(max_batch):
    sizes, batch = [5, 0, 3, 2], 2
    model, targets = Recording(), torch.tensor([0, 1])
    fractions: list[float] = []
    out = run_groups(groups_of(sizes, batch), model, targets, max_batch, fractions.append)
    total = sum(sizes)
    # every forward but the last is full: chunks span groups
    expected = [min(max_batch, total - s) for s in range(0, total, max_batch)]
    assert model.sizes == expected
    # progress: the fraction of jobs scored after each forward, ending at 1
    assert fractions == pytest.approx([min(total, s + max_batch) / total
                                       for s in range(0, total, max_batch)])
    # each job got its own image's score for its sample's target
    for g, n in enumerate(sizes):
        scores = out[("g", g)]
        assert scores.shape == (n, 2) and scores.dtype == torch.float32
        for j in range(n):
            v = (100.0 * g + j) / 1000.0
            logits = torch.tensor([v, -v, 0.0])
            t = int(targets[j % batch])
            assert scores[j, 1] == pytest.approx(float(logits[t]), abs=1e-6)
            assert scores[j, 0] == pytest.approx(float(torch.softmax(logits, 0)[t]), abs=1e-6)


def test_a_max_batch_below_one_means_one_image_per_forward():
    model = Recording()
    run_groups(groups_of([3], 1), model, torch.tensor([0]), 0)
    assert model.sizes == [1, 1, 1]


def test_groups_with_one_key_run_once():
    model = Recording()
    first, second = groups_of([3], 1)[0], groups_of([3], 1)[0]
    out = run_groups([first, second], model, torch.tensor([2]), 8)
    assert model.sizes == [3] and list(out) == [("g", 0)]


def test_the_default_score_is_the_softmax_probability():
    assert score_index({}) == SCORES["softmax"] == 0
    assert score_index({"score": "logit"}) == 1
    with pytest.raises(MetricError, match="score must be one of softmax, logit"):
        score_index({"score": "prob"})
