"""Tie-aware Spearman against scipy, and the cascading model-parameter randomization check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from salmap.workers.metrics.randomization import (
    block_layers,
    cascading_randomization,
    module_layers,
    plot_randomization,
    spearman,
)
from scipy.stats import spearmanr


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(8, 300)).astype(float)
    a[a < 3] = 0  # about 50% exact zeros
    b = 0.5 * a + rng.integers(0, 4, size=(8, 300))
    b[:, ::3] = 0
    got = spearman(a, b)
    ref = [spearmanr(a[i], b[i]).statistic for i in range(8)]
    np.testing.assert_allclose(got, ref, atol=1e-10)
    x, y = rng.random(50), rng.random(50)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    got_t = spearman(torch.tensor(a.reshape(8, 20, 15)), torch.tensor(b.reshape(8, 20, 15)))
    np.testing.assert_allclose(got_t, ref, atol=1e-10)


def test_spearman_invariances_and_degenerate_rows():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 100))
    np.testing.assert_allclose(spearman(a, 3 * a + 1), 1.0)
    np.testing.assert_allclose(spearman(a, np.exp(a)), 1.0)
    np.testing.assert_allclose(spearman(a, -a), -1.0)
    const = np.stack([np.ones(100), a[1], a[2]])
    out = spearman(const, a)
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()
    with_nan = a.copy()
    with_nan[2, 5] = np.nan
    assert np.isnan(spearman(with_nan, a)[2])


def gradient_method(model):
    """|d logit_target / d input| summed over channels (a "should pass" control)."""

    def explain(x, t):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).gather(1, t.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(score, x)
        return g.abs().sum(1)

    return explain


def intensity_method(model):
    """Model-independent 'explanation' (a "should fail" control)."""
    return lambda x, t: x.abs().sum(1)


def test_cascading_randomization_changes_gradient_maps(tiny_model):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    res = cascading_randomization(tiny_model, gradient_method, x, t, seed=0)
    assert res[0]["layer"] == "original"
    np.testing.assert_allclose(res[0]["spearman"], 1.0)
    assert [r["layer"] for r in res[1:]] == module_layers(tiny_model)
    assert res[1]["layer"] == "fc"
    assert min(r["spearman_mean"] for r in res[1:]) < 0.5
    assert res[-1]["spearman_mean"] < res[0]["spearman_mean"] - 0.3
    assert res[-1]["ssim_mean"] < 0.9
    for k, v in tiny_model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_model_independent_explanation_stays_identical(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    res = cascading_randomization(tiny_model, intensity_method, x, torch.tensor([0, 1]),
                                  layers="blocks")
    for r in res:
        np.testing.assert_allclose(r["spearman"], 1.0)
        np.testing.assert_allclose(r["ssim"], 1.0)
        assert r["n_nan"] == 0


def test_cascading_bookkeeping_randomizes_exactly_the_top_k_layers(tiny_model):
    original = {n: [p.clone() for p in m.parameters(recurse=False)]
                for n, m in tiny_model.named_modules() if n}
    layers = ["fc", "layer4.0", "conv2", "bn1"]
    seen = []

    def recording_builder(model):
        changed = []
        for n, m in model.named_modules():
            if n in original and any(not torch.equal(p, q) for p, q in
                                     zip(m.parameters(recurse=False), original[n])):
                changed.append(n)
        seen.append(changed)
        return gradient_method(model)

    cascading_randomization(tiny_model, recording_builder, torch.randn(1, 3, 8, 8),
                            torch.tensor([0]), layers=layers)
    assert seen[0] == [] and seen[1] == []  # reference and "original" runs
    for k in range(1, len(layers) + 1):
        assert sorted(seen[k + 1]) == sorted(layers[:k])
    with pytest.raises(AttributeError, match="nope"):
        cascading_randomization(tiny_model, gradient_method, torch.randn(1, 3, 8, 8),
                                torch.tensor([0]), layers=["nope"])


def test_block_layers_of_resnet(resnet18):
    blocks = block_layers(resnet18)
    assert blocks[0] == "fc" and blocks[1] == "layer4.1" and blocks[-1] == "conv1"
    assert "relu" not in blocks and "avgpool" not in blocks


def test_plot_randomization_writes_png(tiny_model, tmp_path):
    res = cascading_randomization(tiny_model, gradient_method, torch.randn(2, 3, 8, 8),
                                  torch.tensor([0, 1]), layers="blocks")
    path = tmp_path / "mprt.png"
    plot_randomization(res, str(path), title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- block granularity on real architectures ----------------------------------------------
def _covers_every_parameter_once(model, steps):
    """Every parameter of the model falls in exactly one step."""
    from salmap.workers.metrics.randomization import _resolve

    owner: dict[int, str] = {}
    for step in steps:
        target = _resolve(model, step)
        params = [target] if isinstance(target, torch.nn.Parameter) else list(target.parameters())
        for p in params:
            assert id(p) not in owner, f"{step} and {owner.get(id(p))} share a parameter"
            owner[id(p)] = step
    assert set(owner) == {id(p) for p in model.parameters()}


def test_block_layers_of_efficientnet_lite0_are_its_mbconv_blocks(lite0):
    blocks = block_layers(lite0.model)
    assert blocks == ["_fc", "_bn1", "_conv_head", *[f"_blocks.{i}" for i in range(15, -1, -1)],
                      "_bn0", "_conv_stem"]
    _covers_every_parameter_once(lite0.model, blocks)


def test_block_layers_of_resnets_are_basic_and_bottleneck_blocks(resnet18):
    import torchvision

    blocks = block_layers(resnet18)
    assert blocks == ["fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1",
                      "layer2.0", "layer1.1", "layer1.0", "bn1", "conv1"]
    _covers_every_parameter_once(resnet18, blocks)
    r50 = torchvision.models.resnet50(weights=None)
    stages = [f"layer{s}.{b}" for s, n in ((4, 3), (3, 6), (2, 4), (1, 3)) for b in range(n)[::-1]]
    assert block_layers(r50) == ["fc", *stages, "bn1", "conv1"]


def test_block_layers_of_vit_b_16_are_its_encoder_layers():
    """ViT-B/16 (86M parameters, random weights): only the step list, no maps."""
    import torchvision

    vit = torchvision.models.vit_b_16(weights=None)
    blocks = block_layers(vit)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(11, -1, -1)]
    assert blocks == ["heads.head", "encoder.ln", *layers, "encoder.pos_embedding", "conv_proj",
                      "class_token"]
    _covers_every_parameter_once(vit, blocks)
    modules = module_layers(vit)
    assert "encoder" not in modules and "encoder.pos_embedding" in modules  # not all at once
    _covers_every_parameter_once(vit, modules)


def small_vit():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=3,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=5).eval()
    with torch.no_grad():  # move every parameter off its initial value, as training does
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit


def _changed(model, original):
    """Names of the parameters / buffers that differ from ``original``."""
    state = model.state_dict()
    return {k for k, v in original.items() if not torch.equal(state[k], v)}


@pytest.mark.parametrize("arch", ["lite0", "resnet18", "vit"])
def test_block_cascade_randomizes_one_block_more_per_step(arch, request):
    """After step k, exactly the parameters (and BatchNorm statistics) of the first k blocks
    differ from the trained model's."""
    model = {"lite0": lambda: request.getfixturevalue("lite0").model,
             "resnet18": lambda: request.getfixturevalue("resnet18"), "vit": small_vit}[arch]()
    size = 16 if arch == "vit" else 32
    blocks = block_layers(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def recording_builder(m):
        seen.append(_changed(m, original))
        return intensity_method(m)

    cascading_randomization(model, recording_builder, torch.randn(1, 3, size, size),
                            torch.tensor([0]), layers="blocks")
    assert seen[0] == set() and seen[1] == set()
    for k in range(1, len(blocks) + 1):
        expected = {key for key, v in original.items() if v.is_floating_point()
                    and any(key == b or key.startswith(b + ".") for b in blocks[:k])}
        assert seen[k + 1] == expected, blocks[k - 1]
    assert seen[-1] == {k for k, v in original.items() if v.is_floating_point()}


def gradcam_builder(target_layer):
    from salmap.workers import methods

    return lambda m: methods.build("gradcam", m, target_layer=target_layer)


@pytest.mark.parametrize("arch", ["lite0", "resnet18"])
def test_block_cascade_on_real_architectures(arch, request, photo_batch, lite0):
    """Gradient maps lose their similarity as blocks are randomised, on the pretrained
    EfficientNet-Lite0 (real photos) and a ResNet-18; the input-only control stays at 1."""
    model = lite0.model if arch == "lite0" else request.getfixturevalue("resnet18")
    x = torch.nn.functional.interpolate(photo_batch[:2], size=(96, 96), mode="bilinear",
                                        antialias=True)
    with torch.no_grad():
        t = model(x).argmax(1)
    res = cascading_randomization(model, gradient_method, x, t, layers="blocks")
    assert [r["layer"] for r in res] == ["original", *block_layers(model)]
    rho = [r["spearman_mean"] for r in res]
    assert rho[0] == pytest.approx(1.0)
    assert max(rho[1:]) < 0.6 and res[-1]["ssim_mean"] < 0.5
    if arch == "lite0":  # trained: similarity keeps falling as blocks go, down to about 0
        assert rho[-1] < 0.15 and rho[-1] < rho[1] - 0.2
    control = cascading_randomization(model, intensity_method, x, t, layers=["fc" if arch ==
                                      "resnet18" else "_fc", block_layers(model)[5]])
    for r in control:
        np.testing.assert_allclose(r["spearman"], 1.0)


# -- the comparison itself -----------------------------------------------------------------
def low_res_method(maps_by_call):
    """A 'method' that returns pre-set [B, 3, 3] maps, one set per call."""
    calls = iter(maps_by_call)
    return lambda model: (lambda x, t: next(calls))


def test_maps_are_compared_at_the_input_resolution(tiny_model):
    """A 3x3 map and its perturbation rank-correlate differently at 3x3 than at the 24x24
    input (bilinear upsampling interpolates new values between the cells)."""
    a = torch.tensor([[[0.0, 1.0, 0.2], [0.5, 3.0, 0.1], [0.9, 0.3, 2.0]]])
    b = torch.tensor([[[0.3, 0.8, 0.0], [1.0, 2.5, 0.6], [0.1, 0.2, 2.2]]])
    x = torch.randn(1, 3, 24, 24)
    res = cascading_randomization(tiny_model, low_res_method([a, a, b]), x, torch.tensor([0]),
                                  layers=["fc"])
    up = torch.nn.functional.interpolate(torch.stack([a, b]), size=(24, 24), mode="bilinear",
                                         align_corners=False)[:, 0].numpy()
    assert res[1]["spearman"][0] == pytest.approx(spearmanr(up[0].ravel(), up[1].ravel())[0],
                                                  abs=1e-9)
    native = spearmanr(a.ravel(), b.ravel())[0]
    assert abs(res[1]["spearman"][0] - native) > 0.05
    from skimage.metrics import structural_similarity

    ref = structural_similarity(up[0] / up[0].max(), up[1] / up[1].max(), data_range=1.0,
                                win_size=7)
    assert res[1]["ssim"][0] == pytest.approx(ref, abs=1e-6)


def test_spearman_is_of_absolute_maps_and_the_signed_one_is_kept_apart(tiny_model):
    m = torch.randn(2, 8, 8)
    res = cascading_randomization(tiny_model, low_res_method([m, m, -m]), torch.randn(2, 3, 8, 8),
                                  torch.tensor([0, 1]), layers=["fc"])
    np.testing.assert_allclose(res[1]["spearman"], 1.0)
    np.testing.assert_allclose(res[1]["spearman_signed"], -1.0)
    np.testing.assert_allclose(res[1]["ssim"], 1.0)  # SSIM of |map| / max|map| too


def test_ssim_is_skimage_on_absolute_max_normalised_maps_with_a_7px_window():
    from salmap.workers.metrics.randomization import ssim
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    b[5:12, 5:12] += 2 * a[5:12, 5:12]
    ref = structural_similarity(np.abs(a) / np.abs(a).max(), np.abs(b) / np.abs(b).max(),
                                data_range=1.0, win_size=7)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-12)
    assert ssim(a, -a) == pytest.approx(1.0)
    assert ssim(np.ones((5, 5)), np.ones((5, 5))) == pytest.approx(1.0)  # window shrinks to 5
    assert np.isnan(ssim(np.ones((2, 9)), np.ones((2, 9))))


def test_each_step_gets_its_own_random_stream_and_batchnorm_statistics_are_reset():
    from salmap.workers.metrics.randomization import randomize_layer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6),
                                torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)).eval()
    model[2].running_mean.fill_(0.7)
    model[2].running_var.fill_(3.0)
    model[2].weight.data.fill_(2.0)
    state = []
    cascading_randomization(model, lambda m: state.append(copy.deepcopy(m)) or
                            (lambda x, t: x[:, :1, :, :].abs().sum(1)),
                            torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), seed=5,
                            layers=["3", "2", "1", "0"])
    done = state[-1]
    assert not torch.equal(done[0].weight, done[1].weight)  # same shape, distinct draws
    assert torch.equal(done[2].running_mean, torch.zeros(6))
    assert torch.equal(done[2].running_var, torch.ones(6))
    assert torch.equal(done[2].weight, torch.ones(6))
    # the same (seed, step) gives the same draw; another seed does not
    twin = copy.deepcopy(model)
    randomize_layer(twin[1], 5, 2)
    assert torch.equal(twin[1].weight, done[1].weight)
    randomize_layer(twin[1], 6, 2)
    assert not torch.equal(twin[1].weight, done[1].weight)
    before = torch.get_rng_state()
    randomize_layer(twin[0], 1, 0)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched


def test_a_bare_parameter_step_draws_from_its_own_spread():
    from salmap.workers.metrics.randomization import randomize_layer

    vit = small_vit()
    pos = vit.encoder.pos_embedding
    before = pos.detach().clone()
    randomize_layer(pos, 0, 3)
    after = pos.detach()
    assert float(after.std()) == pytest.approx(float(before.std()), rel=0.25)
    assert abs(float(after.mean())) < 4 * float(before.std()) / np.sqrt(pos.numel())
    assert abs(np.corrcoef(before.ravel(), after.ravel())[0, 1]) < 0.3


def test_salmap_sanity_cascades_blocks_and_stores_its_protocol(tmp_path, make_shards):
    import json

    import pyarrow.parquet as pq
    from conftest import small_config
    from salmap.pipeline.config import load_config
    from salmap.pipeline.sanity import run_sanity

    job = tmp_path / "job.yaml"
    job.write_text(small_config(make_shards(n_shards=1, per_shard=2), str(tmp_path / "out"),
                                methods=[{"name": "gradient"}],
                                models=[{"name": "r18", "source": "torchvision:resnet18",
                                         "weights": "none", "input_size": 64}]))
    run_sanity(load_config(str(job), []), samples=2)
    table = pq.read_table(tmp_path / "out" / "t" / "sanity" / "sanity.parquet")
    blocks = ["fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0",
              "layer1.1", "layer1.0", "bn1", "conv1"]
    assert table.column("layer").to_pylist() == ["original", *blocks]
    assert table.column("samples").to_pylist() == [2] * 12
    signed = table.column("spearman_signed_mean").to_pylist()
    assert signed[0] == pytest.approx(1.0) and signed[-1] < 0.9
    proto = json.loads(table.schema.metadata[b"salmap.sanity.protocol"])["r18"]
    assert proto["steps"] == blocks and proto["granularity"] == "blocks"
    assert "64x64" in proto["compare_at"]


# -- details the mutation runs asked for ---------------------------------------------------
def test_spearman_runs_in_double_precision_and_stays_within_minus_one_and_one():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 4000)).astype(np.float32)
    b = (a + rng.normal(size=a.shape)).astype(np.float32)
    for i in range(3):
        ref = spearmanr(a[i].astype(np.float64), b[i].astype(np.float64)).statistic
        assert spearman(a[i], b[i]) == pytest.approx(ref, rel=1e-13, abs=1e-15)
    for n in range(2, 120):
        x = rng.normal(size=n)
        assert -1.0 <= spearman(x, -x) <= -1.0 + 1e-15 and 1.0 - 1e-15 <= spearman(x, x) <= 1.0
    assert spearman([1.0, 2.0], [1.0, 2.0]) == pytest.approx(1.0, abs=1e-15)
    assert spearman([1.0, 2.0], [2.0, 1.0]) == pytest.approx(-1.0, abs=1e-15)
    rows = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
    out = spearman(rows, np.array([[1.0, 2.0, 3.0]] * 2))
    assert np.isnan(spearman(np.array([[1.0, 2.0, 3.0]] * 2), rows)[0])
    assert np.isnan(out[0]) and out[1] == pytest.approx(1.0)  # one NaN value makes its row NaN, not the others


def test_ssim_reads_nan_as_zero_and_handles_flat_and_3px_maps():
    from salmap.workers.metrics.randomization import ssim

    rng = np.random.default_rng(2)
    a = rng.normal(size=(9, 9))
    with_nan, with_zero = a.copy(), a.copy()
    with_nan[4, 4], with_zero[4, 4] = np.nan, 0.0
    assert ssim(with_nan, with_zero) == pytest.approx(1.0)
    assert ssim(np.zeros((8, 8)), np.zeros((8, 8))) == pytest.approx(1.0)  # no 0 / 0
    assert np.isfinite(ssim(rng.normal(size=(3, 3)), rng.normal(size=(3, 3))))  # a 3x3 window


def test_steps_include_norm_layers_without_affine_and_skip_stateless_ones():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(4, affine=False), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    assert module_layers(model) == ["4", "2", "0"]

    class Normalize(torch.nn.Module):  # constants in buffers, nothing to re-initialise
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            return x - self.mean

    stateless = torch.nn.Sequential(Normalize(), torch.nn.Conv2d(3, 4, 3),
                                    torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert module_layers(stateless) == ["4", "1"]

    class Wrapper(torch.nn.Module):  # its own parameter, and a child with parameters
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.inner = torch.nn.Linear(4, 4)

    assert module_layers(torch.nn.Sequential(Wrapper())) == ["0.inner", "0.scale"]


def test_two_blocks_of_one_class_are_blocks():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Block(), Block(), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    assert block_layers(model) == ["4", "2", "1", "0"]


def test_the_stream_of_step_k_is_seed_times_1000003_plus_k():
    """Stored as (seed, step names): the draws are reproducible from the protocol alone."""
    from salmap.workers.metrics.randomization import randomize_layer

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 64))
            self.inner = torch.nn.Linear(4, 4)

    layer = Wrapper()
    spread = float(layer.scale.detach().std())
    randomize_layer(layer, 5, 2)
    inner = torch.nn.Linear(4, 4)
    torch.manual_seed(5 * 1_000_003 + 2)
    scale = torch.empty(64).normal_(0.0, spread)  # the wrapper's own parameter first
    inner.reset_parameters()  # then the child's reset_parameters, from the same stream
    assert torch.equal(layer.scale.detach(), scale)
    assert torch.equal(layer.inner.weight.detach(), inner.weight.detach())


def test_bare_parameters_of_one_two_or_constant_values_get_sane_draws():
    from salmap.workers.metrics.randomization import randomize_layer

    one = torch.nn.Parameter(torch.tensor([0.3]))
    randomize_layer(one, 0, 0)
    assert torch.isfinite(one).all()  # std of one value is no number: N(0, 1) instead
    two = torch.nn.Parameter(torch.tensor([0.001, 0.002]))
    randomize_layer(two, 0, 0)
    assert float(two.detach().abs().max()) < 0.01  # N(0, their std = 7e-4)
    flat = torch.nn.Parameter(torch.ones(4096))  # a constant: N(0, 1)
    randomize_layer(flat, 0, 0)
    assert float(flat.detach().std()) == pytest.approx(1.0, rel=0.05)


def test_entries_average_over_finite_samples_and_count_the_nans():
    from salmap.workers.metrics.randomization import _entry

    rng = np.random.default_rng(4)
    ref = rng.normal(size=(3, 8, 8))
    maps = ref + 0.5 * rng.normal(size=ref.shape)
    ref[1], ref[2] = 1.0, 2.0  # constant maps: no rank correlation
    e = _entry("x", ref, maps)
    assert e["n_nan"] == 2 and np.isnan(e["spearman"][1]) and np.isnan(e["spearman"][2])
    assert e["spearman_mean"] == pytest.approx(e["spearman"][0])
    assert e["ssim_mean"] == pytest.approx(float(np.mean(e["ssim"])))


def test_protocol_granularity_default_seed_and_maps_that_need_grad(tiny_model):
    from salmap.workers.metrics.randomization import protocol

    assert protocol(None, 0, ["a"], (8, 8))["granularity"] == "modules"
    assert protocol("blocks", 0, ["a"], (8, 8))["granularity"] == "blocks"
    assert protocol(["a"], 0, ["a"], (8, 8))["granularity"] == "explicit"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])

    def builder(m):  # maps that still carry the graph, as an unwary method might return
        return lambda images, targets: m(images)[:, :1, None].expand(-1, 4, 4) * images[:, 0, :4, :4]

    assert cascading_randomization(tiny_model, builder, x, t, layers=["fc"])[-1]["n_nan"] == 0

    from salmap.workers.methods import build

    def gradient(m):
        return build("gradient", m)

    default = cascading_randomization(tiny_model, gradient, x, t, layers=["fc", "conv2"])
    assert default == cascading_randomization(tiny_model, gradient, x, t, layers=["fc", "conv2"],
                                              seed=0)
    assert default != cascading_randomization(tiny_model, gradient, x, t, layers=["fc", "conv2"],
                                              seed=1)
