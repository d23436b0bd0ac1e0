"""Small instances of torchvision's transformer and modern-CNN classes, random weights, eval.

The same classes as ``vit_b_16``, ``swin_t``, ``maxvit_t`` and ``convnext_tiny`` (so every
architecture rule that looks at the class applies), at a width and depth that runs in
milliseconds on 32 px inputs. Also importable as ``package.module:callable`` model sources
(``family_models:tiny_vit``) when the tests folder is on the path.
"""

from __future__ import annotations

import torch
from torch import nn

PX = 32  # input size of every model here


def _seeded(build) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
        for m in model.modules():  # ViT's zero head would make every map 0
            if isinstance(m, nn.Linear) and not m.weight.detach().any():
                nn.init.normal_(m.weight, std=0.5)
    return model.eval()


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """ViT with 8 px patches: 1 class token + a 4x4 patch grid at 32 px."""
    from torchvision.models.vision_transformer import VisionTransformer

    return _seeded(lambda: VisionTransformer(
        image_size=PX, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=num_classes))


def tiny_swin(num_classes: int = 10) -> nn.Module:
    """Swin (v1), channels-last stages: a 4x4 final grid at 32 px."""
    from torchvision.models.swin_transformer import SwinTransformer

    return _seeded(lambda: SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
        num_classes=num_classes))


def tiny_swin_v2(num_classes: int = 10) -> nn.Module:
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    return _seeded(lambda: SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
        num_classes=num_classes, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2))


def tiny_convnext(num_classes: int = 10) -> nn.Module:
    """ConvNeXt: stem /4, one downsampling: a 4x4 final grid at 32 px."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return _seeded(lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                                    num_classes=num_classes))


def tiny_maxvit(num_classes: int = 10) -> nn.Module:
    """MaxViT: stem /2, two stages /2 each: a 4x4 final grid at 32 px."""
    from torchvision.models.maxvit import MaxVit

    return _seeded(lambda: MaxVit(
        input_size=(PX, PX), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=num_classes))


#: name -> (builder, default target layer, its map grid at 32 px)
TINY = {
    "vit": (tiny_vit, "encoder.layers.encoder_layer_1.ln_1", (4, 4)),
    "swin": (tiny_swin, "norm", (4, 4)),
    "swin_v2": (tiny_swin_v2, "norm", (4, 4)),
    "convnext": (tiny_convnext, "features.3", (4, 4)),
    "maxvit": (tiny_maxvit, "blocks.1", (4, 4)),
}
