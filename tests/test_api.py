"""The Python API: explain in-memory images with the pipeline's own actor and post stage (no
Ray), and run a job from a dict then read it back as pandas with maps as arrays."""

from __future__ import annotations

import functools
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, write_shard
from PIL import Image
from salmap.pipeline import api


def test_explain_tensors_gives_the_methods_maps_and_the_metrics(tiny_model):
    from salmap.workers.methods import build
    from salmap.workers.metrics import compute_model_metrics, compute_post_metrics

    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    ex = api.Explainer(tiny_model, "integrated_gradients", params={"steps": 8},
                       metrics=[{"deletion_auc": {"steps": 4}}, "gini"], device="cpu",
                       batch_size=2)  # two actor calls: 2 + 1 images
    df = ex.explain(x)
    assert list(df["sample_id"]) == ["0", "1", "2"] and set(df["status"]) == {"ok"}
    targets = torch.tensor(df["target"].tolist())
    assert targets.tolist() == tiny_model(x).argmax(1).tolist()  # targets: predicted
    want = build("integrated_gradients", tiny_model, steps=8)(x, targets)
    got = np.stack(df["saliency"])
    assert got.shape == (3, 32, 32) and np.allclose(got, want.numpy(), atol=1e-6)
    deletion = compute_model_metrics(["deletion_auc"], lambda t: tiny_model(t), x, want, targets,
                                     {"deletion_auc": {"steps": 4}})["deletion_auc"]
    assert np.allclose(df["deletion_auc"], deletion.numpy(), atol=1e-5)
    gini = [compute_post_metrics(["gini"], m, None, saliency_input=m)["gini"] for m in want.numpy()]
    assert np.allclose(df["gini"], gini, atol=1e-5)
    assert df["saliency_min"].min() < 0  # IG is signed: its PNG is centred at zero


def test_explain_photos_arrays_and_files_maps_back_to_their_pixels(tiny_model, photos, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes(3, size=(90, 60)))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    images = [Image.fromarray(photos["chelsea"]), photos["coffee"], tmp_path / "cat.jpg",
              str(tmp_path / "broken.jpg")]
    ex = api.Explainer(tiny_model, "gradcam", metrics=["pseudo_box", "gini"], input_size=32,
                       device="cpu")
    df = ex.explain(images, boxes=[[[20, 0, 420, 300]], None, None, None])
    assert list(df["status"]) == ["ok", "ok", "ok", "error"]
    assert "not a readable image" in df["error"][3] and df["image_file"][3] == "broken.jpg"
    assert df["image_file"][2] == "cat.jpg"
    sizes = [(h, w) for h, w in zip(df["orig_height"][:3], df["orig_width"][:3])]
    assert sizes == [(300, 451), (400, 600), (60, 90)]
    for i, (h, w) in enumerate(sizes):
        png = Image.open(io.BytesIO(df["saliency_png"][i]))
        # the photo's frame at the 16 x 16 map's resolution (run.saliency_png: native)
        assert png.size[0] <= w and png.size[1] <= h and png.size[0] > 16 and png.size[1] > 16
        assert png.size[0] / png.size[1] == pytest.approx(w / h, rel=0.1)
        box = df["pseudo_box"][i]
        assert 0 <= box["x0"] < box["x1"] <= w and 0 <= box["y0"] < box["y1"] <= h
        assert df["saliency"][i].shape == (16, 16)  # TinyNet's layer4 grid at 32 px
    assert df["saliency"][3] is None
    # the crop a run would take: short side resized to 37 (32 * 256 / 224), centre 32 x 32
    from salmap.pipeline.decode import crop_geometry
    from salmap.pipeline.post import crop_box

    geo = crop_geometry(300, 451, 37, 32)
    want = crop_box({"orig_h": 300, "orig_w": 451, "resized_h": geo["resized_h"],
                     "resized_w": geo["resized_w"], "crop_top": geo["crop_top"],
                     "crop_left": geo["crop_left"], "crop_h": 32, "crop_w": 32})
    assert df["crop_box"][0] == pytest.approx(want) and want["x0"] > 90  # a real crop


def test_explain_a_dataloader_with_labels_or_given_targets(tiny_model):
    data = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16), torch.tensor([4, 3, 2, 1, 0]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    df = api.Explainer(tiny_model, "gradient", targets="label", device="cpu").explain(loader)
    assert list(df["sample_id"]) == ["0", "1", "2", "3", "4"]  # numbered across batches
    assert list(df["target"]) == [4, 3, 2, 1, 0] == list(df["label"])
    dicts = [{"image": x, "label": y} for x, y in loader]
    df = api.Explainer(tiny_model, "gradient", targets="topk:2", device="cpu").explain(dicts)
    assert len(df) == 10 and list(df["label"]) == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    x = torch.randn(2, 3, 16, 16)
    df = api.Explainer(tiny_model, "gradient", device="cpu").explain(
        x, targets=[1, 2], labels=[0, 0], ids=["a", "b"])
    assert list(df["target"]) == [1, 2] and list(df["label"]) == [0, 0]
    assert list(df["sample_id"]) == ["a", "b"] and set(df["target_source"]) == {"given"}
    with pytest.raises(ValueError, match="square"):
        api.Explainer(tiny_model, "gradient", device="cpu").explain(torch.randn(1, 3, 16, 20))


@pytest.mark.slow
def test_run_a_dict_config_then_read_it_with_maps(tmp_path, ray_cluster, monkeypatch):
    """One real run from a dict: Integrated Gradients long enough for progress lines to move
    inside the one batch, then the rows back with each map as an [h, w] array."""
    from salmap.pipeline import run as run_module
    from salmap.pipeline.progress import ProgressLine

    monkeypatch.setattr(run_module, "ProgressLine", functools.partial(ProgressLine, interval=0.3))
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "a-000000.tar",
                [{"__key__": f"img{i}", "jpg": jpeg_bytes(i), "cls": str(i).encode()}
                 for i in range(2)])
    config = json.loads(json.dumps({
        "run": {"id": "api", "output": str(tmp_path / "runs"), "report": False},
        "ray": {"address": ray_cluster},
        "input": {"shards": [str(tmp_path / "shards" / "a-000000.tar")]},
        "models": [{"name": "r18", "source": "torchvision:resnet18", "weights": "none",
                    "input_size": 64}],
        "methods": [{"name": "integrated_gradients",
                     "params": {"steps": 160, "inner_batch_size": 4}}],
        "metrics": ["gini"],
        "resources": {"batch_size": 4, "actors_per_unit": 1, "cpus_per_actor": 1},
    }))
    lines: list[str] = []
    result = api.run(config, out=lines.append)
    assert result.exit_code == 0, lines
    # the unit's aggregate, merged by the ledger from the commit record (no row re-read), for
    # the summaries and the report: both samples' rows, every one of them in its sample
    (agg,) = result.aggregates.values()
    assert list(result.aggregates) == ["r18__integrated_gradients"]
    assert agg["rows"] == 2 and agg["complete"] and len(agg["sample"]["rows"]) == 2
    committed = next(i for i, ln in enumerate(lines) if "committed wave" in ln)
    inside = [int(m.group(1)) for ln in lines[:committed]
              if (m := re.match(r"salmap: r18__integrated_gradients: \d+/2 samples \((\d+)%\)", ln))]
    assert any(0 < v < 100 for v in inside), lines  # moved before the batch was written
    df = api.read(result.output, maps=True)
    assert len(df) == 2 and all(m.shape == (64, 64) for m in df["saliency"])
    assert np.array_equal(np.stack(df["saliency"]), api.maps(result.output, "integrated_gradients"))
