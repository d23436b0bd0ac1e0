"""The one declaration of the row columns drives the actor, the post stage and the schema."""

from __future__ import annotations

import numpy as np
from salmap.workers.columns import ACTOR_OUTPUT, COLUMNS, PASS_THROUGH, output_schema


def test_maps_are_stored_as_float16_or_exactly_as_float32():
    from salmap.pipeline.post import post_batch

    rng = np.random.default_rng(0)
    native = rng.normal(size=(1, 4, 4)).astype(np.float32) * 1e-3
    batch = {"sample_id": np.array(["s/0"], object), "shard": np.array(["s"], object),
             "key": np.array(["0"], object), "image_file": np.array(["0.jpg"], object),
             "model": np.array(["m"], object), "method": np.array(["g"], object),
             "target": np.array([1]), "target_source": np.array(["predicted"], object),
             "label": np.array([-1]), "pred": np.array([1]),
             "pred_prob": np.array([0.5], np.float32), "target_logit": np.array([1.0], np.float32),
             "target_prob": np.array([0.5], np.float32), "orig_height": np.array([8]),
             "orig_width": np.array([8]), "resized_h": np.array([8]), "resized_w": np.array([8]),
             "crop_top": np.array([0]), "crop_left": np.array([0]), "crop_h": np.array([8]),
             "crop_w": np.array([8]), "boxes_json": np.array([""], object),
             "status": np.array(["ok"], object), "error": np.array([""], object),
             "elapsed_ms": np.array([1.0], np.float32), "saliency": native}
    for dtype, exact in (("float16", False), ("float32", True)):
        table = post_batch(batch, {}, False, map_dtype=dtype)
        stored = table.column("saliency").combine_chunks().to_numpy_ndarray()[0]
        assert stored.dtype == np.dtype(dtype)
        assert np.array_equal(stored, native[0]) == exact
        np.testing.assert_allclose(stored, native[0], rtol=1e-3)



def test_every_written_column_is_in_the_schema_and_filled_by_its_stage():
    schema = output_schema(7, 7, curves=True)
    written = [c.name for c in COLUMNS if c.written]
    assert schema.names == written  # declaration order, curves included on request
    assert "deletion_curve" not in output_schema(7, 7).names
    # what the actor hands on: every pass-through column, its own and the model metrics'
    from salmap.workers.actor import ActorSpec, Explainer

    explainer = Explainer(ActorSpec(model={"name": "r", "source": "torchvision:resnet18",
                                           "weights": "none", "input_size": 32},
                                    method="gradient"))
    out = explainer._to_columns([])
    assert set(ACTOR_OUTPUT) <= set(out) and set(PASS_THROUGH) <= set(out)
