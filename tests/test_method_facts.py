"""Each method class carries its facts (name by decorator, cost formula, what it cannot
explain, defaults) and each model metric its planner and forward count; cost.py, compat.py
and the metric engine only read them."""

import pytest
from salmap.workers.methods import REGISTRY, get_class, names
from salmap.workers.methods.compat import FEATURES
from salmap.workers.methods.registry import register
from salmap.workers.metrics import METRICS
from salmap.workers.metrics.engine import PLANNERS


def test_every_method_carries_its_facts():
    assert names()[:3] == ["gradient", "gradient_x_input", "smoothgrad"]
    assert list(REGISTRY) == names()
    for name in names():
        cls = get_class(name)
        assert cls.name == name, "the decorator names the class"
        assert callable(cls.work_per_image), f"{name} has no cost formula"
        assert cls.work_per_image({**cls.defaults(), "channels": 8}) > 0
        assert cls.no_rule <= set(FEATURES), f"{name} names an unknown feature"
        assert bool(cls.no_rule) == bool(cls.no_rule_why), f"{name}: say why it has no rule"
    assert get_class("tsgb").no_rule > get_class("guided_backprop").no_rule
    assert not get_class("gradcam").no_rule
    assert get_class("smoothgrad").defaults()["nsamples"] > 1


def test_a_name_is_registered_once():
    gradcam = get_class("gradcam")
    with pytest.raises(ValueError, match="taken"):
        register("gradcam")(type("Other", (), {}))
    assert get_class("gradcam") is gradcam


def test_every_model_metric_has_a_planner_and_a_forward_count():
    model = sorted(n for n, s in METRICS.items() if s.kind == "model")
    assert sorted(PLANNERS) == model
    for name in model:
        spec = METRICS[name]
        assert spec.forwards is not None and spec.forwards(dict(spec.defaults)) >= 1, name
