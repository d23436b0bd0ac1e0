"""Models from your own code: factory arguments (``params``) and the input normalisation
(``mean``, ``std``), from the config through the driver's planning to the model actor."""

from __future__ import annotations

import json

import pytest
import torch
from salmap.pipeline.config import ConfigError, load_config
from salmap.workers.models import load_model
from salmap.workers.preprocessing import preprocess_of

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _config(tmp_path, **model) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({
        "input": {"shards": [str(tmp_path / "s-000000.tar")]},
        "models": [{"name": "tiny", "source": "conftest:TinyNet", "weights": "none",
                    "input_size": 16, **model}],
        "methods": [{"name": "gradcam"}], "resources": {"gpus_per_actor": 0}}))
    return str(path)


def test_factory_arguments_and_normalisation_reach_the_model_actor(tmp_path):
    from salmap.pipeline.plan import Wave, units_of
    from salmap.pipeline.run import unit_execution
    from salmap.pipeline.storage import Store
    from salmap.workers.actor import Explainer

    cfg = load_config(_config(tmp_path, params={"num_classes": 7}, mean=MEAN, std=STD))
    (unit,) = units_of(cfg)
    ex = unit_execution(cfg, unit, [Wave([str(tmp_path / "s-000000.tar")])],
                        Store.open(str(tmp_path / "runs")))
    spec = ex.actor_spec
    assert spec.model["params"] == {"num_classes": 7}
    actor = Explainer(spec)
    assert actor.loaded.model.fc.out_features == 7
    assert torch.allclose(actor.mean.flatten(), torch.tensor(MEAN))
    assert torch.allclose(actor.std.flatten(), torch.tensor(STD))
    # the driver plans with the same preprocessing the actor builds, without the model
    assert preprocess_of("conftest:TinyNet", "none", 16, MEAN, STD) == actor.loaded.preprocess
    assert load_model("torchvision:resnet18", "none", mean=MEAN).preprocess.std == (0.229, 0.224, 0.225)


def test_params_and_normalisation_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\].params: only a package.module:callable"):
        load_config(_config(tmp_path, source="torchvision:resnet18", params={"num_classes": 7}))
    with pytest.raises(ConfigError, match=r"models\[0\].mean: three numbers"):
        load_config(_config(tmp_path, mean=[0.5, 0.5]))
    with pytest.raises(ConfigError, match=r"models\[0\].std: three numbers \(R, G, B\), all > 0"):
        load_config(_config(tmp_path, std=[0.2, 0.0, 0.2]))
