"""The actor retries only what can succeed: out of memory splits a batch, other errors do not."""

from __future__ import annotations

import pytest
import torch
from conftest import jpeg_bytes
from salmap.pipeline.decode import DecodeSpec, decode_batch
from salmap.workers.actor import ActorSpec, Explainer


@pytest.fixture
def explainer_and_batch():
    rows = [{"__key__": f"k{i}", "__url__": "s.tar", "jpg": jpeg_bytes(i)} for i in range(5)]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    explainer = Explainer(ActorSpec(model={"name": "r18", "source": "torchvision:resnet18",
                                           "weights": "none", "input_size": 32}, method="gradient"))
    return explainer, batch


def test_a_deterministic_error_fails_the_batch_once(explainer_and_batch, monkeypatch):
    explainer, batch = explainer_and_batch
    calls: list[int] = []

    def attribute(images, targets):
        calls.append(images.shape[0])
        raise ValueError("target layer returned\nno gradient")

    monkeypatch.setattr(explainer.method, "attribute", attribute)
    out = explainer(batch)
    assert calls == [5]  # not 2n-1 = 9 calls that fail the same way
    assert sorted(out["sample_id"]) == [f"s/k{i}" for i in range(5)]
    assert set(out["status"]) == {"error"}
    assert set(out["error"]) == {
        "gradient failed on a batch of 5 samples: ValueError: target layer returned no gradient"}


def test_out_of_memory_splits_then_a_deterministic_error_stops(explainer_and_batch, monkeypatch):
    explainer, batch = explainer_and_batch
    calls: list[int] = []

    def attribute(images, targets):
        calls.append(images.shape[0])
        if images.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        raise RuntimeError("index out of range")

    monkeypatch.setattr(explainer.method, "attribute", attribute)
    out = explainer(batch)
    assert calls == [5, 2, 3]
    assert list(out["status"]) == ["error"] * 5
    errors = sorted(out["error"])
    assert errors[:2] == ["gradient failed on a batch of 2 samples: RuntimeError: index out of range"] * 2
    assert errors[2:] == ["gradient failed on a batch of 3 samples: RuntimeError: index out of range"] * 3
