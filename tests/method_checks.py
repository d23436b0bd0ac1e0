"""The model state an attribution method must leave as found, for the methods' test files.

``before = snapshot(model, x)``, run the method (also into an error), then
``assert_restored(model, before, x)``. Without ``x`` the model's output is not compared.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules import module as _module

# every hook dict an nn.Module (torch 2.x) keeps; hooks are compared by handle id, not count
MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called", "_global_forward_pre_hooks",
    "_global_backward_hooks", "_global_backward_pre_hooks",
)
KEYS = ("training", "modules", "inplace", "requires_grad", "parameters", "buffers", "hooks",
        "global_hooks", "tensor_hooks")


def hooks(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """(module name, hook dict, handle ids) for every non-empty module hook dict."""
    return [(n, d, tuple(getattr(m, d)))
            for n, m in model.named_modules() for d in MODULE_HOOK_DICTS if getattr(m, d, None)]


def tensor_hooks(model: nn.Module) -> list[tuple[str, tuple, tuple]]:
    """Hooks registered on the parameters themselves (``register_hook`` and the like)."""
    return [(n, tuple(p._backward_hooks or ()), tuple(p._post_accumulate_grad_hooks or ()))
            for n, p in model.named_parameters()]


def snapshot(model: nn.Module, x: torch.Tensor | None = None) -> dict:
    """Everything a method could change: train/eval mode of every module, module identities
    and types, in-place flags, parameter and buffer identities, ``requires_grad``, ``.grad``,
    the state dict, all module, global and parameter hooks and, given ``x``, the no-grad output
    of an eval-mode copy (the model itself is not touched)."""
    snap = {
        "training": [(n, m.training) for n, m in model.named_modules()],
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "parameters": [(n, id(p)) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": hooks(model),
        "global_hooks": [(d, tuple(getattr(_module, d))) for d in GLOBAL_HOOK_DICTS],
        "tensor_hooks": tensor_hooks(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    if x is not None:
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            snap["out"] = probe(x)
    return snap


def assert_restored(model: nn.Module, before: dict, x: torch.Tensor | None = None) -> None:
    """Assert ``model`` is as ``snapshot`` found it: every ``.grad`` that was None (all of them,
    for a model from :func:`mixed_state` without ``leftover_grads``) is still None and a grad
    that was set is bit-identical; the state dict has the same keys, dtypes and values."""
    after = snapshot(model, x)
    for key in KEYS:
        assert after[key] == before[key], key
    for i, (g0, g1) in enumerate(zip(before["grads"], after["grads"], strict=True)):
        if g0 is None:
            assert g1 is None, f"parameter {i} got a .grad"
        else:
            assert g1 is not None and g1.dtype == g0.dtype and torch.equal(g1, g0), \
                f"parameter {i}: its .grad changed"
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype and torch.equal(after["state"][k], v), k
    if x is not None:
        assert after["out"].dtype == before["out"].dtype
        assert torch.equal(after["out"], before["out"])


def mixed_state(model: nn.Module, leftover_grads: bool = False) -> nn.Module:
    """A private copy in train mode with a third of the parameters frozen, to see it restored
    exactly; no ``.grad`` anywhere, or with ``leftover_grads`` two parameters holding a ``.grad``
    from a (pretend) training step."""
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)
        p.grad = None
    if leftover_grads:
        for p in (params[1], params[-1]):
            p.grad = torch.full_like(p, 0.25)
    return model
