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
             noise: dict | None = None, **options) -> dict:
    """The average of ``guesses`` estimates (``per_step`` per backward, ``num_guesses=per_step``), ``{name: tensor}``;
    ``None`` for a parameter that got no estimate. With ``noise`` (a dict), it receives per parameter the estimated
    variance of that average, summed over elements (from the spread of the per-step estimates)."""
    steps = math.ceil(guesses / per_step)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    named.update(inputs or {})
    sums, squares = {}, {}
    with attach(model, method, seed=seed, num_guesses=per_step, **options) as handle:
        for _ in range(steps):
            for t in named.values():
                t.grad = None
            run(model).backward()
            for n, t in named.items():
                if t.grad is not None:
                    g = t.grad.detach().double()
                    sums[n] = g.clone() if n not in sums else sums[n] + g
                    squares[n] = squares.get(n, 0.0) + float(g.pow(2).sum())
        assert handle.skipped_steps == 0
    out = {n: (sums[n] / steps if n in sums else None) for n in named}
    if noise is not None:
        for n, m in out.items():
            if m is not None and steps > 1:
                noise[n] = max((squares[n] - steps * float(m.pow(2).sum())) / (steps * (steps - 1)), 1e-300)
    return out


def compare(estimate: dict, reference: dict, *, cosine: float = COSINE, ratio: tuple = RATIO,
            noise: dict | None = None, z_limit: float = 16.0, max_relative_noise: float = 0.35) -> dict:
    """Per parameter: cosine and projection ratio ``<ĝ, g> / |g|²`` of the averaged estimate to backprop's.

    With ``noise`` (from :func:`averaged`), the test is instead that the squared error of the average is within
    ``z_limit`` times its estimated variance (unbiased: about 1) — and that the noise is small enough for that to mean
    something (standard error at most ``max_relative_noise`` of the gradient's norm).

    Raises:
        AssertionError: a parameter with a gradient but no estimate, or outside the bounds (the message lists all).
    """
    rows, bad = {}, []
    for name, g in reference.items():
        e = estimate.get(name)
        if g is None or float(g.norm()) == 0.0:
            continue  # no gradient: an estimate there is zero-mean noise
        if e is None:
            bad.append(f"{name}: no estimate (p.grad is None), backprop's norm {float(g.norm()):.3g}")
            continue
        g, e = g.double().flatten(), e.double().flatten()
        cos = float(e @ g / (e.norm() * g.norm()))
        proj = float(e @ g / (g @ g))
        rows[name] = (cos, proj)
        if noise is not None:
            z = float((e - g).pow(2).sum()) / noise[name]
            relative = math.sqrt(noise[name]) / float(g.norm())
            if z > z_limit or relative > max_relative_noise:
                bad.append(f"{name}: error/noise z {z:.2f}, relative noise {relative:.3f} (cos {cos:.3f}, ratio "
                           f"{proj:.3f})")
        elif cos < cosine or not ratio[0] <= proj <= ratio[1]:
            bad.append(f"{name}: cosine {cos:.4f}, projection ratio {proj:.4f}")
    assert not bad, "averaged estimate vs backprop:\n  " + "\n  ".join(bad)
    return rows
