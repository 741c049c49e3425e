"""Helpers of the tests that compare averaged unbiased estimates with backprop's gradient, per parameter (float64).

The reference is computed independently: plain autograd on a deep copy of the model, never through the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from guess_optim import attach, handle_of

# an averaged estimate of N guesses has a relative error of order sqrt(n / N) (n: the guessed dimensions per example);
# the tests pick N so that these hold with a wide margin, and print the numbers when they do not
COSINE = 0.97
RATIO = (0.93, 1.07)


def backprop(model: nn.Module, run: Callable[[nn.Module], torch.Tensor], inputs: dict | None = None) -> dict:
    """``{name: gradient}`` of every trainable parameter (and of each tensor in ``inputs``), by plain autograd
    (``torch.autograd.grad``: ``p.grad`` untouched) on ``model`` with nothing attached; a parameter the loss does not
    reach is ``None``."""
    assert handle_of(model) is None
    ref = model
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    extra = list((inputs or {}).items())
    leaves = [t for _, t in named] + [t for _, t in extra]
    grads = torch.autograd.grad(run(ref), leaves, allow_unused=True)
    return dict(zip([n for n, _ in named] + [n for n, _ in extra], grads, strict=True))


def averaged(model: nn.Module, run: Callable[[nn.Module], torch.Tensor], *, method: str = "activation",
             guesses: int = 20000, per_step: int = 2000, seed: int = 0, inputs: dict | None = None,
             **options) -> dict:
    """The average of ``guesses`` estimates (``per_step`` per backward, ``num_guesses=per_step``), ``{name: tensor}``;
    ``None`` for a parameter that got no estimate."""
    steps = math.ceil(guesses / per_step)
    for p in model.parameters():
        p.grad = None
    for t in (inputs or {}).values():
        t.grad = None
    with attach(model, method, seed=seed, num_guesses=per_step, **options) as handle:
        for _ in range(steps):
            run(model).backward()
        assert handle.skipped_steps == 0
    out = {n: (None if p.grad is None else p.grad / steps) for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: (None if t.grad is None else t.grad / steps) for n, t in (inputs or {}).items()})
    return out


def compare(estimate: dict, reference: dict, *, cosine: float = COSINE, ratio: tuple = RATIO) -> dict:
    """Per parameter: cosine and projection ratio ``<ĝ, g> / |g|²`` of the averaged estimate to backprop's.

    Raises:
        AssertionError: a parameter with a gradient but no estimate, or outside the bounds (the message lists all).
    """
    rows, bad = {}, []
    for name, g in reference.items():
        e = estimate.get(name)
        if g is None or float(g.norm()) == 0.0:
            if e is not None and float(e.norm()) > 1e-12:
                bad.append(f"{name}: backprop gives no gradient, the estimate is {float(e.norm()):.3g}")
            continue
        if e is None:
            bad.append(f"{name}: no estimate (p.grad is None), backprop's norm {float(g.norm()):.3g}")
            continue
        g, e = g.double().flatten(), e.double().flatten()
        cos = float(e @ g / (e.norm() * g.norm()))
        proj = float(e @ g / (g @ g))
        rows[name] = (cos, proj)
        if cos < cosine or not ratio[0] <= proj <= ratio[1]:
            bad.append(f"{name}: cosine {cos:.4f}, projection ratio {proj:.4f}")
    assert not bad, "averaged estimate vs backprop:\n  " + "\n  ".join(bad)
    return rows
