"""Transformers and modern backbones: ViT, Swin, MaxViT, ConvNeXt, RegNet, DenseNet,
EfficientNet V2.

* CAM target layers whose output is tokens ``[B, T, K]`` or channels-last ``[B, u, v, K]``
  are laid out on the patch grid the right way round (checked cell by cell on models whose
  head reads one known cell), and each family gets a default layer and maps on its grid;
* rule-based methods are refused, naming the method, the architecture and the methods that
  do run: at config time from the model's name (nothing built), and when bound to a built
  model (``package.module:callable``), never inside a batch;
* the family table in ``salmap.workers.methods.compat`` agrees with what torchvision's models contain
  and with the README;
* end to end (slow): ``torchvision:vit_b_16`` and ``swin_t`` at ``weights: none`` on demo
  photos through the Ray pipeline, with metrics on the patch-grid maps.
Gradient-method parity with Captum on these families lives in test_parity_peers.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from conftest import jpeg_bytes, randomize_bn
from family_models import PX, TINY, tiny_vit
from method_checks import assert_restored, mixed_state, snapshot
from PIL import Image
from salmap.pipeline.config import ConfigError, load_config
from salmap.workers.methods import MethodError, build, compat, names
from salmap.workers.methods.layers import default_target_layer_name
from salmap.workers.models import ModelError, load_model
from torch import nn

CAMS = ["gradcam", "gradcam_pp", "layercam", "scorecam"]
RULE_BASED = ["guided_backprop", "rectgrad", "nobias_rectgrad", "tsgb", "dmbp"]
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


# -- layouts: the grid the right way round ------------------------------------------------------
class TokenNet(nn.Module):
    """8 px patches -> ``[prefix tokens, patch tokens row by row]`` -> ``mix`` (a linear layer
    on the tokens: the target) -> a head reading only the patch token of ``cell``."""

    def __init__(self, prefix: int, cell: tuple[int, int], seq_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 6, 8, stride=8)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, 6))
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.prefix, self.cell, self.seq_first = prefix, cell, seq_first

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """What ``mix`` computes for the patch tokens, as ``[B, K, u, v]``, written directly."""
        return self.mix(self.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        b, _, _, w = t.shape
        tokens = torch.cat([self.prefix_tokens.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
        if self.seq_first:
            tokens = self.mix(tokens.transpose(0, 1)).transpose(0, 1)
        else:
            tokens = self.mix(tokens)
        i, j = self.cell
        return self.head(tokens[:, self.prefix + i * w + j])


class ChannelsLastNet(nn.Module):
    """8 px patches, channels-last ``[B, u, v, K]`` through ``norm`` (the target), a head
    reading only ``cell`` (Swin's layout)."""

    def __init__(self, cell: tuple[int, int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 5, 8, stride=8)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)
        self.cell = cell

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.cell
        return self.head(self.norm(self.embed(x).permute(0, 2, 3, 1))[:, i, j])


def assert_on_cell(model: nn.Module, reshape: str | None, size: tuple[int, int]) -> None:
    """Activations equal the model's own grid; the gradient is nonzero at ``cell`` only."""
    x = torch.randn(2, 3, *size)
    method = build("gradcam", model.eval(), target_layer="mix" if hasattr(model, "mix") else "norm",
                   reshape=reshape)
    acts, grads = method.activations_and_gradients(x, torch.tensor([0, 2]))
    with torch.no_grad():
        torch.testing.assert_close(acts, model.grid(x))
    u, v = size[0] // 8, size[1] // 8
    assert grads.shape == (2, acts.shape[1], u, v)
    energy = grads.abs().sum(1)
    i, j = model.cell
    assert (energy[:, i, j] > 0).all()
    energy[:, i, j] = 0
    assert (energy == 0).all(), "gradient off the head's cell: the grid is laid out wrongly"


@pytest.mark.parametrize("size", [(16, 24), (24, 16), (24, 24)])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("reshape", [None, "tokens"])
def test_tokens_are_laid_out_row_by_row_after_the_prefix_tokens(size, prefix, reshape):
    cell = (size[0] // 8 - 1, size[1] // 8 - 2)  # off the diagonal: a transposed grid fails
    assert_on_cell(TokenNet(prefix, cell), reshape, size)


def test_sequence_first_tokens():
    assert_on_cell(TokenNet(1, (0, 2), seq_first=True), "tokens", (16, 24))


@pytest.mark.parametrize("size", [(16, 24), (24, 16), (24, 24)])
@pytest.mark.parametrize("reshape", [None, "nhwc"])
def test_channels_last_maps_are_permuted(size, reshape):
    assert_on_cell(ChannelsLastNet((size[0] // 8 - 1, 0)), reshape, size)


@pytest.mark.parametrize(("model", "layer", "reshape", "match"), [
    (TokenNet(1, (0, 0)), "mix", "nchw", r"'mix'.*\(2, 7, 6\).*reshape: tokens"),
    (TokenNet(1, (0, 0)), "embed", "tokens", r"'embed'.*\(2, 6, 2, 3\).*'tokens' needs"),
    (TokenNet(1, (0, 0)), "head", None, r"'head'.*\(2, 3\)"),
])
def test_a_layout_that_does_not_fit_is_a_clear_error(model, layer, reshape, match):
    with pytest.raises(MethodError, match=match):
        build("layercam", model.eval(), target_layer=layer, reshape=reshape)(
            torch.randn(2, 3, 16, 24), [0, 1])


def test_unknown_reshape_values_are_refused_early():
    with pytest.raises(MethodError, match="reshape must be one of auto, nchw, nhwc, tokens"):
        build("gradcam", tiny_vit(), reshape="nwhc")
    with pytest.raises(ModelError, match="reshape"):
        load_model("family_models:tiny_vit", reshape="token")


# -- families: default layers and maps on their grid --------------------------------------------
DEFAULTS_224 = {  # full-size torchvision architectures (built on the meta device: names only)
    "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
    "vit_h_14": "encoder.layers.encoder_layer_31.ln_1",
    "swin_t": "norm", "swin_v2_b": "norm",
    "maxvit_t": "blocks.3",
    "convnext_tiny": "features.7", "convnext_large": "features.7",
    "densenet121": "features",
    "efficientnet_v2_s": "features.7", "efficientnet_v2_l": "features.8",
}


@pytest.mark.parametrize("arch", list(DEFAULTS_224))
def test_default_target_layer_of_each_family(arch):
    with torch.device("meta"):
        model = tvm.get_model(arch, weights=None)
    assert default_target_layer_name(model) == DEFAULTS_224[arch]


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", CAMS)
def test_cams_on_transformer_families_give_maps_on_the_grid(name, method):
    """Random weights, 32 px: the default layer, maps on its grid, a batch equals its samples
    one by one, the target changes the map, and the model is left as found."""
    builder, layer, grid = TINY[name]
    model = builder()
    assert default_target_layer_name(model) == layer
    torch.manual_seed(3)
    x = torch.randn(3, 3, PX, PX)
    with torch.no_grad():
        targets = model(x).argmax(1)
    model = mixed_state(model)
    before = snapshot(model, x)
    cam = build(method, model, target_layer=None, inner_batch_size=64)
    maps = cam(x, targets)
    assert maps.shape == (3, *grid)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert (maps.flatten(1).amax(1) > 0).all()
    singles = torch.cat([cam(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(maps, singles, rtol=1e-4, atol=1e-5 * float(maps.abs().max()))
    other = (targets + 1) % 10
    assert not torch.allclose(cam(x, other), maps)
    assert_restored(model, before, x)


MODEL_AGNOSTIC = {"gradient": {}, "gradient_x_input": {}, "smoothgrad": {"nsamples": 2},
                  "integrated_gradients": {"steps": 3},
                  "hdm": {"steps": 4, "stages": 1, "benchmark_sizes": (2,), "auxiliary_sizes": (4,)}}


@pytest.mark.parametrize("name", list(TINY))
def test_input_space_methods_run_on_every_transformer_family(name):
    """Parity with Captum is checked on ViT, Swin and ConvNeXt (test_parity_peers.py); here
    every family, HDM included, gives finite input-sized maps that depend on the target."""
    model = TINY[name][0]()
    torch.manual_seed(4)
    x = torch.randn(2, 3, PX, PX)
    for method, params in MODEL_AGNOSTIC.items():
        run = build(method, model, **params)
        maps = run(x, [1, 2])
        assert maps.shape == (2, PX, PX) and torch.isfinite(maps).all(), method
        assert (maps.flatten(1).std(1) > 0).all(), method
        if method != "hdm":  # HDM's default loss keeps all the logits: not class-specific
            other = run(x, [3, 4])
            assert (other - maps).abs().max() > 1e-3 * maps.abs().max(), method


CNN_FAMILIES = {  # torchvision name -> (default layer, grid at 64 px)
    "regnet_x_400mf": ("trunk_output", (2, 2)),
    "regnet_y_400mf": ("trunk_output", (2, 2)),
    "densenet121": ("features", (2, 2)),
    "efficientnet_v2_s": ("features.7", (2, 2)),
    "convnext_tiny": ("features.7", (2, 2)),
}


@pytest.mark.parametrize("arch", list(CNN_FAMILIES))
def test_gradcam_on_modern_cnn_families_matches_captum(arch):
    """The default layer of each family gives Captum's LayerGradCam map there (random weights,
    BN statistics randomised so that the logits depend on the input)."""
    from captum.attr import LayerGradCam

    layer, grid = CNN_FAMILIES[arch]
    torch.manual_seed(0)
    model = randomize_bn(tvm.get_model(arch, weights=None, num_classes=10)).eval()
    model.requires_grad_(False)
    assert default_target_layer_name(model) == layer
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        targets = model(x).argmax(1)
    ours = build("gradcam", model)(x, targets)
    assert ours.shape == (2, *grid) and (ours.flatten(1).amax(1) > 0).all()
    module = dict(model.named_modules())[layer]
    theirs = LayerGradCam(model, module).attribute(x, target=targets, relu_attributions=True)
    torch.testing.assert_close(ours, theirs.detach()[:, 0], rtol=1e-4, atol=1e-6)


# -- rule-based methods: refused at config time, by name -----------------------------------------
def _job(tmp_path, source: str, methods: list[str], **model) -> str:
    cfg = {"run": {"output": str(tmp_path)}, "input": {"shards": ["x.tar"]},
           "models": [{"name": "m", "source": source, "weights": "none", **model}],
           "methods": [{"name": m} for m in methods]}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


REFUSED = [(arch, m) for arch in ("vit_b_16", "swin_t", "maxvit_t", "convnext_tiny")
           for m in RULE_BASED] + [
    ("efficientnet_v2_s", "guided_backprop"), ("efficientnet_b0", "rectgrad"),
    ("regnet_y_400mf", "tsgb"), ("mobilenet_v3_small", "dmbp"), ("squeezenet1_1", "tsgb")]


@pytest.mark.parametrize(("arch", "method"), REFUSED)
def test_rule_based_methods_are_a_config_error_naming_the_alternatives(tmp_path, monkeypatch,
                                                                       arch, method):
    def no_building(*_a, **_k):
        raise AssertionError("a config check built a model")

    monkeypatch.setattr(tvm, "get_model", no_building)
    with pytest.raises(ConfigError) as err:
        load_config(_job(tmp_path, f"torchvision:{arch}", ["gradcam", method]))
    msg = str(err.value)
    assert f"methods[1] {method!r}" in msg and arch in msg and compat.family_of(arch).name in msg
    alternatives = msg.split("methods that run on it: ")[1].split(", ")
    assert {"gradient", "integrated_gradients", "gradcam", "scorecam", "hdm"} <= set(alternatives)
    assert method not in alternatives


@pytest.mark.parametrize(("source", "methods", "extra"), [
    ("torchvision:vit_b_16", ["gradcam", "gradcam_pp", "layercam", "scorecam", "gradient",
                              "gradient_x_input", "smoothgrad", "integrated_gradients", "hdm"], {}),
    ("torchvision:vit_b_16", ["gradcam"], {"input_size": 224}),
    ("torchvision:swin_t", ["gradcam"], {"input_size": 64}),
    ("torchvision:efficientnet_b0", ["dmbp"], {}),
    ("torchvision:regnet_x_400mf", RULE_BASED, {}),
    ("efficientnet_lite0", RULE_BASED, {}),
    ("family_models:tiny_vit", RULE_BASED, {}),  # known only once built: the actor refuses
])
def test_what_runs_is_accepted(tmp_path, source, methods, extra):
    load_config(_job(tmp_path, source, methods, **extra))


def test_file_models_are_judged_by_their_arch(tmp_path):
    with pytest.raises(ConfigError, match="tsgb.*swin_t"):
        load_config(_job(tmp_path, "file:w.pt", ["tsgb"], arch="swin_t"))


@pytest.mark.parametrize(("arch", "size", "weights"), [("vit_b_16", 96, "none"),
                                                        ("maxvit_t", 256, "none"),
                                                        ("vit_h_14", 224, "DEFAULT")])
def test_fixed_size_transformers_refuse_another_input_size(tmp_path, arch, size, weights):
    job = _job(tmp_path, f"torchvision:{arch}", ["gradcam"], input_size=size, weights=weights)
    native = 518 if arch == "vit_h_14" else 224  # vit_h_14's SWAG weights are built for 518
    with pytest.raises(ConfigError, match=rf"input_size: {arch} .* {native} px .* not {size}"):
        load_config(job)


def test_bad_reshape_in_the_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\].reshape: .*nhcw"):
        load_config(_job(tmp_path, "torchvision:resnet18", ["gradcam"], reshape="nhcw"))


def test_the_cli_exits_2_with_the_message(tmp_path, capsys):
    from salmap.pipeline.cli import main

    assert main(["run", _job(tmp_path, "torchvision:vit_b_16", ["tsgb"])]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "tsgb" in err and "vit_b_16 (ViT)" in err and "layercam" in err


# -- rule-based methods on a built model: refused when bound, never inside a batch ---------------
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", RULE_BASED)
def test_binding_a_rule_based_method_to_a_built_transformer_fails(name, method):
    model = TINY[name][0]()
    with pytest.raises(MethodError) as err:
        build(method, model)
    msg = str(err.value)
    assert msg.startswith(f"{method} has no rule for") and type(model).__name__ in msg
    assert "methods that run on it: gradient," in msg and "(found " in msg


def test_the_actor_refuses_at_its_start_and_runs_cams_on_the_grid(tmp_path):
    """A ``package.module:callable`` ViT: TSGB fails in the constructor; Grad-CAM's rows carry
    4x4 maps (the actor's map shape is the method's grid, not the tokens' [T, K])."""
    from salmap.pipeline.decode import DecodeSpec, decode_batch
    from salmap.workers.actor import ActorSpec, Explainer

    model = {"name": "vit", "source": "family_models:tiny_vit", "weights": "none",
             "input_size": PX}
    with pytest.raises(ValueError, match="tsgb has no rule for .*VisionTransformer"):
        Explainer(ActorSpec(model=model, method="tsgb", device="cpu"))
    rows = [{"__key__": f"k{i}", "__url__": "s.tar", "jpg": jpeg_bytes(i)} for i in range(2)]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", PX, 37, 10**8))
    explainer = Explainer(ActorSpec(model=model, method="gradcam", device="cpu"))
    assert explainer.map_shape == (4, 4)
    out = explainer(batch)
    assert list(out["status"]) == ["ok", "ok"] and out["saliency"].shape == (2, 4, 4)
    # the model's reshape reaches the method: a wrong one fails at the start too
    with pytest.raises(MethodError, match="reshape 'nchw'"):
        Explainer(ActorSpec(model={**model, "reshape": "nchw"}, method="gradcam", device="cpu"))


# -- the family table agrees with torchvision and with the README --------------------------------
def test_every_torchvision_classifier_belongs_to_one_family():
    for arch in tvm.list_models(module=tvm):
        matches = [f.name for f in compat.FAMILIES if arch.startswith(f.prefixes)]
        assert len(matches) == 1, (arch, matches)


SMALLEST = ("regnet_x_400mf", "regnet_y_400mf", "efficientnet_v2_s", "vit_b_32")


def _representatives() -> list[str]:
    """One torchvision model per family prefix (a small one: RegNet builds for real)."""
    archs = sorted(tvm.list_models(module=tvm), key=lambda a: (a not in SMALLEST, a))
    return [next(a for a in archs if a.startswith(p))
            for f in compat.FAMILIES for p in f.prefixes if any(a.startswith(p) for a in archs)]


@pytest.mark.parametrize("arch", _representatives())
def test_family_features_are_what_the_models_contain(arch):
    """What the config check decides from the name is what the built-model check finds."""
    try:
        with torch.device("meta"):
            model = tvm.get_model(arch, weights=None)
    except NotImplementedError:  # RegNet's constructor reads tensor values
        model = tvm.get_model(arch, weights=None)
    assert set(compat.model_features(model)) == set(compat.family_of(arch).features)


def test_efficientnet_lite0_has_no_feature_the_rules_lack(lite0):
    assert compat.model_features(lite0.model) == {}
    assert compat.family_of("efficientnet_lite0").features == frozenset()


def _readme_family_rows() -> dict[str, list[str]]:
    section = README[README.index("### Which method runs on which family"):]
    section = section[:section.index("\n## ")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    header = rows[0]
    assert header[2] == "gradient methods, `hdm`" and header[3].startswith("CAM methods")
    return {cells[0]: cells for cells in rows[1:]}


README_GROUPS = {  # column -> the methods it speaks for
    2: ["gradient", "gradient_x_input", "smoothgrad", "integrated_gradients", "hdm"],
    3: ["gradcam", "gradcam_pp", "layercam", "scorecam"],
    4: ["guided_backprop", "rectgrad", "nobias_rectgrad"],
    5: ["tsgb"],
    6: ["dmbp"],
}


def test_readme_family_table_says_what_the_check_does():
    rows = _readme_family_rows()
    assert set(rows) == {f.name for f in compat.FAMILIES}
    assert {m for group in README_GROUPS.values() for m in group} == set(names())
    for family in compat.FAMILIES:
        cells = rows[family.name]
        for p in family.prefixes:
            assert p.rstrip("_") in cells[1], (family.name, p)
        runs = set(compat.runs_on(family.features))
        for col, methods in README_GROUPS.items():
            said = cells[col].split(":")[0].split(",")[0]
            assert said in ("yes", "no"), (family.name, cells[col])
            for m in methods:
                assert (m in runs) == (said == "yes"), (family.name, m, cells[col])


# -- weights: none on ViT ---------------------------------------------------------------------
def test_random_vit_has_a_drawn_head_so_maps_are_not_zero(monkeypatch):
    """``weights: none`` through load_model, on a small instance of torchvision's ViT class
    (its constructor zero-initialises the head, as for vit_b_16)."""
    from torchvision.models.vision_transformer import VisionTransformer

    def small_vit(arch, weights=None):
        return VisionTransformer(image_size=PX, patch_size=8, num_layers=1, num_heads=2,
                                 hidden_dim=16, mlp_dim=32)

    monkeypatch.setattr(tvm, "get_model", small_vit)
    assert not small_vit("vit_b_16").heads.head.weight.any()  # torchvision's own init
    a = load_model("torchvision:vit_b_16", "none", input_size=PX)
    b = load_model("torchvision:vit_b_16", "none", input_size=PX)
    head = a.model.heads.head.weight
    assert 0.01 < head.std() < 0.03
    torch.testing.assert_close(head, b.model.heads.head.weight)  # seeded: same on every actor
    x = torch.randn(2, 3, PX, PX)
    with torch.no_grad():
        targets = a.model(x).argmax(1)
    maps = build("gradcam", a.model, target_layer=a.target_layer)(x, targets)
    assert maps.shape == (2, 4, 4) and (maps.flatten(1).std(1) > 0).all()


# -- end to end (slow) ---------------------------------------------------------------------------
def _demo_job(tmp_path, ray_cluster, arch: str, methods: list[dict], metrics: list,
              photos: list[str], run_id: str, targets: str = "label") -> str:
    from salmap.pipeline.api import run
    from salmap.pipeline.demo_data import write_demo_shards
    from salmap.pipeline.run import EXIT_OK

    shards = write_demo_shards(str(tmp_path / "photos"), per_shard=len(photos), names=photos)
    cfg = {
        "run": {"id": run_id, "output": str(tmp_path / "out"), "report": False},
        "input": {"shards": shards},
        "models": [{"name": arch, "source": f"torchvision:{arch}", "weights": "none"}],
        "methods": methods, "targets": targets, "metrics": metrics,
        "resources": {"batch_size": 2, "actors_per_unit": 1, "cpus_per_actor": 1,
                      "units_in_parallel": 2},
    }
    result = run(cfg, [f"ray.address={ray_cluster}"], verbose=True, out=lambda *a: None)
    assert result.exit_code == EXIT_OK
    return str(tmp_path / "out" / run_id)


def _maps(run: str, unit: str) -> tuple[np.ndarray, object]:
    from salmap.pipeline.read import read_run

    table = read_run(run, unit=unit).to_table()
    df = table.drop(["saliency"]).to_pandas()
    bad = df[df.status != "ok"]
    assert bad.empty, bad[["key", "error"]].to_string()
    maps = table.column("saliency").combine_chunks().to_numpy_ndarray().astype(np.float64)
    return maps, df


@pytest.mark.slow
def test_vit_b_16_job_end_to_end(tmp_path, ray_cluster):
    """Targets: the photos' labels, which have boxes, so the box metrics score the 14x14 maps
    mapped back to original pixels."""
    photos = ["chelsea", "astronaut"]
    run = _demo_job(tmp_path, ray_cluster, "vit_b_16",
                    [{"name": "gradcam"}, {"name": "gradient"}],
                    ["average_drop", "pointing_game", "box_iou", "pseudo_mask", "gini"], photos,
                    "vit")
    cam, df = _maps(run, "vit_b_16__gradcam")
    assert cam.shape == (2, 14, 14) and (cam.reshape(2, -1).std(1) > 0).all()
    grad, gdf = _maps(run, "vit_b_16__gradient")
    assert grad.shape == (2, 224, 224) and (grad.reshape(2, -1).std(1) > 0).all()
    for frame in (df, gdf):  # metrics on the patch grid as on a full-size map
        assert frame.average_drop.between(0, 100).all() and frame.gini.between(0, 1).all()
        assert frame.box_iou.between(0, 1).all() and frame.pointing_hit.notna().all()
        for png, h, w in zip(frame.pseudo_mask_png, frame.orig_height, frame.orig_width):
            mask = np.asarray(Image.open(io.BytesIO(png)))  # in original pixels
            assert mask.shape == (h, w) and 0 < mask.mean() < 1
    assert sorted(df.key) == sorted(photos)


@pytest.mark.slow
def test_swin_t_job_end_to_end(tmp_path, ray_cluster):
    run = _demo_job(tmp_path, ray_cluster, "swin_t",
                    [{"name": "layercam"},
                     {"name": "integrated_gradients", "params": {"steps": 2}}],
                    ["gini"], ["chelsea", "rocket"], "swin", targets="predicted")
    cam, _ = _maps(run, "swin_t__layercam")
    assert cam.shape == (2, 7, 7) and (cam.reshape(2, -1).std(1) > 0).all()
    ig, _ = _maps(run, "swin_t__integrated_gradients")
    assert ig.shape == (2, 224, 224) and (ig.reshape(2, -1).std(1) > 0).all()

