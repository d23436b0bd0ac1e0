"""The actor retries only what can succeed: out of memory splits a batch, other errors do not."""

from __future__ import annotations

import numpy as np
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


def test_stored_maps_round_as_numpy_does_even_at_the_edges_of_float16(explainer_and_batch,
                                                                       monkeypatch):
    """The actor converts the batch's maps to the stored dtype with torch (numpy's float16
    cast is a slow scalar path); the stored bits are numpy's, subnormals, overflow and ties
    included."""
    explainer, batch = explainer_and_batch
    side = explainer.map_shape[0]
    edges = torch.tensor([1e-8, -3e-8, 6.1e-5, 5.96e-8, 2.98e-8, 65504.0, 65519.0, 65520.0,
                          -7e4, 1.0009765625 / 2 + 1.0, 0.1, float("inf")])
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-9, 5, side * side).view(side, side)  # subnormal to overflow
    maps = torch.randn(5, side, side, generator=g) * scale
    maps[:, 0, :len(edges)] = edges
    monkeypatch.setattr(explainer.method, "attribute", lambda images, targets: maps[:len(images)])
    out = explainer(batch)
    expected = maps.numpy().astype(np.float16)
    assert out["saliency"].dtype == np.float16
    assert np.array_equal(out["saliency"].view(np.uint16), expected.view(np.uint16))
