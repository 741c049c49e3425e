"""What a guessing step keeps alive between the forward and the backward (deterministic, no timings).

Memory is measured in ``guess-optim bench`` (a fresh process per runner); here we check its cause: which of the
forward's activations the loss's autograd graph still reaches once the forward has returned. Backprop keeps every
layer's input; ``directional`` keeps none (its estimate is ``d · V``, ``V`` weight-sized); ``store="recompute"`` keeps
none for any method (the backward replays the forward); ``activation`` with the default store keeps each layer's
input (its estimate is ``δᵀ x``) but not a large guess (redrawn from the generator state).
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from guess_optim import attach
from guess_optim.step import REGENERATE_MIN_BYTES


def mlp(width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 3))


def _followed(obj) -> bool:
    """Containers, autograd nodes and the engine's own objects (its step, records, graphs); not modules, functions
    or anything else (which would reach the whole interpreter)."""
    if isinstance(obj, (dict, list, tuple, set, frozenset, torch.autograd.graph.Node)):
        return True
    module = getattr(type(obj), "__module__", "") or ""
    return module.startswith("guess_optim") and not isinstance(obj, nn.Module)


def storages_reached(root, records: list | None = None) -> set[int]:
    """The storages of every tensor reachable from ``root`` through the autograd graph and the objects its nodes
    hold (a custom Function's context, the engine's step and records); modules and parameters are not followed."""
    seen, found, stack = set(), set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, nn.Parameter):
                found.add(obj.untyped_storage().data_ptr())
                tangent = fwAD.unpack_dual(obj)[1]
                if tangent is not None:
                    found.add(tangent.untyped_storage().data_ptr())
            continue
        if not _followed(obj):
            continue
        if records is not None and type(obj).__name__ == "ActivationRecord":
            records.append(obj)
        if isinstance(obj, torch.autograd.graph.Node):
            stack.extend(fn for fn, _ in obj.next_functions if fn is not None)
            for name in dir(obj):  # saved tensors of built-in nodes
                if name.startswith("_saved_"):
                    try:
                        stack.append(getattr(obj, name))
                    except RuntimeError:  # freed or unpacked elsewhere
                        pass
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(gc.get_referents(obj))
    return found


def activations_kept(method: str | None, width: int = 16, **options) -> tuple[int, int]:
    """(hidden activations the loss still reaches after the forward, hidden activations in all)."""
    model = mlp(width)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ptrs: list[int] = []
    guesses.clear()

    held: list[torch.Tensor] = []  # held here, so that no freed storage is reused by a later tensor (same address)

    def remember(module, args, output):
        if module is not linears[0]:  # the hidden layers' inputs
            held.append(fwAD.unpack_dual(args[0])[0])
            ptrs.append(held[-1].untyped_storage().data_ptr())

    linears = [m for m in model if isinstance(m, nn.Linear)]
    with attach(model, method, seed=0, **options) if method else contextlib.nullcontext():
        # after attach: the hooks see the outputs as the engine leaves them (a guess point's tangent is its guess)
        handles = [m.register_forward_hook(remember) for m in linears]
        loss = F.cross_entropy(model(x), y)
        for h in handles:  # the forward's calls only (store="recompute" calls the layers again in backward)
            h.remove()
        records: list = []
        kept = storages_reached(loss.grad_fn, records)
        guesses[:] = [r.guess for r in records if r.guess is not None]
        loss.backward()  # the step completes
    ptrs = ptrs[-3:]  # the guessing forward's (a structured method's first step runs graph discovery before it)
    return len(set(ptrs) & kept), len(ptrs)


guesses: list[torch.Tensor] = []
"""The guesses the step's activation-space records keep (a regenerated one keeps the generator state instead)."""


def test_backprop_keeps_every_layer_input():
    """The control: the walk finds what autograd saves."""
    assert activations_kept(None) == (3, 3)


def test_activation_keeps_each_layer_input_but_not_a_large_guess():
    """``activation`` with the default store keeps the inputs its estimates read (as backprop does); a guess of at
    least ``REGENERATE_MIN_BYTES`` (a 32 x 2048 float32 layer output: 256 KiB) is drawn again in backward from the
    generator state, not kept."""
    assert REGENERATE_MIN_BYTES == 32 * 2048 * 4
    assert activations_kept("activation", width=2048) == (3, 3)
    assert [tuple(g.shape) for g in guesses] == [(32, 3)]  # the output layer's only (32 x 3: small)


def test_activation_keeps_a_small_guess():
    """A small layer's guess is kept (drawing it twice would cost more time than it saves memory)."""
    assert activations_kept("activation") == (3, 3)
    assert len(guesses) == 4  # every layer's, the output layer's too


@pytest.mark.parametrize("method", ["directional", "wt", "activation"])
def test_recompute_keeps_no_activation(method):
    assert activations_kept(method, store="recompute") == (0, 3)


def test_directional_keeps_no_activation():
    assert activations_kept("directional") == (0, 3)


class _Residual(nn.Module):
    """A residual block: its graph holds captured activations, so the recompute replay discovers it again."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.o = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(h + torch.tanh(self.b(h)))


@pytest.mark.parametrize("store", ["activations", "recompute"])
def test_no_reverse_graph_through_the_model_in_any_forward_of_a_step(store):
    """Every forward of a guessing step (the guessing forward, graph discovery, the recompute replay and its own
    discovery) runs with the trainable parameters frozen: a layer's output carries no reverse graph. The replay's
    discovery used to unfreeze them on exit (a nested freeze restored ``requires_grad=True``), so the rest of the
    replay built a reverse graph through the whole model (ViT-B/16 prompt tuning: 0.30x -> 1.18x backprop's peak)."""
    model = _Residual()
    seen = []
    model.b.register_forward_hook(lambda m, args, out: seen.append(fwAD.unpack_dual(out).primal.requires_grad))
    with attach(model, "wt", seed=0, store=store):
        F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    assert len(seen) == (4 if store == "recompute" else 2) and not any(seen)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is not None for p in model.parameters())
