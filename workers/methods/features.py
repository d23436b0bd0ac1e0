"""The model features some methods have no backward rule for: the words a method class uses
to declare what it cannot explain (``Method.no_rule``), and compat uses to find them in a
model or an architecture name. Its own module so a method file can name them without
importing compat (which reads the method classes)."""

from __future__ import annotations

SMOOTH = "smooth activations (GELU, SiLU, sigmoid)"
HARD = "hardswish / hardsigmoid"
LAYER_NORM = "LayerNorm"
ATTENTION = "attention"
CONV_HEAD = "a convolutional classifier (no nn.Linear)"
FEATURES = (SMOOTH, HARD, LAYER_NORM, ATTENTION, CONV_HEAD)

#: what the ReLU-only rules of the modified-backpropagation methods do not cover
RELU_NETS_ONLY = frozenset({SMOOTH, HARD, LAYER_NORM, ATTENTION})
