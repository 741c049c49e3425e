"""Peers: gradient estimators that are not ``guess_optim`` methods, measured against the same backprop step.

A peer only *estimates* the gradient into ``p.grad``; the step is then taken by the same ``torch.optim.AdamW`` as
every other runner (:class:`~guess_optim.bench.runners.Runner`), so a peer's ratio to backprop measures its estimator,
not its optimizer.

* ``mezo``: :func:`mezo_step`, a MeZO-style SPSA estimate (Malladi et al. 2023, "Fine-Tuning Language Models with
  Just Forward Passes"): two forwards at ``θ ± εz``.
* ``torchzero-fg``: torchzero's ``ForwardGradient`` (Baydin et al. 2022, "Gradients without Backpropagation"): one
  forward with a JVP along a Gaussian ``V`` of every parameter's shape, estimate ``(∇L·V) V``. torchzero computes the
  estimate (``ForwardGradient.approximate``, with torchzero's defaults: one Gaussian sample, autograd JVP, the
  forward run with grad enabled as torchzero runs it); its ``Optimizer`` chain is not used, so neither is its
  ``pre_generate`` copy of ``V`` kept in the module state between steps: ``V`` is drawn inside ``approximate`` and
  freed with the step. torchzero is optional: the peer is :class:`Unavailable` when it is not installed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._rng import capture_rng, cuda_devices, replayed_rng

__all__ = ["PEERS", "Peer", "Unavailable", "mezo_step"]

Estimate = Callable[[], None]
"""Writes one gradient estimate into ``p.grad`` of the parameters it was made for."""


class Unavailable(RuntimeError):
    """A runner that cannot run here (an optional dependency is missing); reported as skipped, with this message."""


@dataclass(frozen=True)
class Peer:
    """A gradient estimator from outside ``guess_optim``.

    Attributes:
        name: the runner name (no ``@store`` suffix).
        summary: one line for help texts and reports.
        products: layer-sized matrix products per layer of one estimate (backprop: 3), for the floor.
        make: ``make(params, loss_fn, seed)`` returns the :data:`Estimate` of ``params``; ``loss_fn()`` computes the
            scalar loss of the batch at the current parameters. Raises :class:`Unavailable` when it cannot run here.
    """

    name: str
    summary: str
    products: int
    make: Callable[[Sequence[Tensor], Callable[[], Tensor], int], Estimate]


@torch.no_grad()
def mezo_step(params: Sequence[Tensor], loss_fn: Callable[[], Tensor], *, seed: int, eps: float = 1e-3) -> float:
    """One MeZO-style SPSA estimate (Malladi et al. 2023), written into ``p.grad``.

    Two forwards at ``θ + εz`` and ``θ - εz``, ``z ~ N(0, I)`` never stored: each pass regenerates it from a private
    generator seeded with ``seed`` (one parameter at a time, so the extra memory is one parameter's ``z``). The
    parameters are perturbed in place and restored by the opposite perturbation, as MeZO does; restoring by
    subtraction is exact only up to rounding (a few ulps in float32; tested), and in float16/bfloat16 it drifts by
    whole ulps of the low precision, so other dtypes are refused. The global RNG state is replayed for the second
    forward, so dropout draws the same masks in both. Then ``p.grad = g z`` with
    ``g = (L(θ + εz) - L(θ - εz)) / 2ε``, for any optimizer to step on.

    Args:
        params: the trainable parameters (float32 or float64), in a fixed order.
        loss_fn: computes the scalar loss of the batch at the current parameters.
        seed: seed of ``z`` (draw a new one per step).
        eps: perturbation scale ``ε``. (default: 1e-3)

    Returns:
        The projected gradient ``g``.

    Raises:
        ValueError: a parameter is not float32/float64, or ``eps`` is not a positive finite float.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps: {eps!r}; expected a positive finite float")
    for p in params:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"mezo_step supports float32/float64 parameters only, got {p.dtype}: restoring θ by subtracting εz "
                "is inexact in low precision"
            )
    if not params:
        return 0.0
    device = params[0].device

    def perturb(scale: float) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device), alpha=scale * eps)

    rng = capture_rng(cuda_devices(params))
    perturb(1.0)
    plus = float(loss_fn())
    perturb(-2.0)
    with replayed_rng(rng):  # the same dropout masks as the first forward
        minus = float(loss_fn())
    g = (plus - minus) / (2 * eps)
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in params:  # restore θ and write the estimate from the same z
        z = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        p.add_(z, alpha=eps)
        p.grad = z.mul_(g)
    return g


def _mezo(params: Sequence[Tensor], loss_fn: Callable[[], Tensor], seed: int) -> Estimate:
    device = params[0].device if params else torch.device("cpu")
    seeds = torch.Generator(device=device).manual_seed(seed)

    def estimate() -> None:
        step_seed = int(torch.randint(0, 2**62, (1,), generator=seeds, device=device))
        mezo_step(params, loss_fn, seed=step_seed)

    return estimate


def _torchzero() -> Any:
    """``import torchzero``, quietly (it imports ``torch.utils.cpp_extension``, which logs a warning without CUDA)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchzero
    except ImportError as err:
        raise Unavailable(f"torchzero is not installed (pip install torchzero; benchmark only): {err}") from err
    finally:
        log.setLevel(level)
    return torchzero


def _torchzero_forward_gradient(params: Sequence[Tensor], loss_fn: Callable[[], Tensor], seed: int) -> Estimate:
    tz = _torchzero()
    fg = tz.m.ForwardGradient(seed=seed)
    params = list(params)

    def closure(backward: bool = True) -> Tensor:
        if backward:  # ForwardGradient evaluates closure(False) only; a backward here would be backprop
            raise RuntimeError("torchzero's ForwardGradient asked for a backward pass")
        with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-AD formula
            return loss_fn()

    def estimate() -> None:
        grads, _, _ = fg.approximate(closure, params, None)
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    return estimate


PEERS: Mapping[str, Peer] = MappingProxyType({
    "mezo": Peer("mezo", "MeZO-style SPSA: two forwards at θ ± εz (Malladi et al. 2023)", 2, _mezo),
    "torchzero-fg": Peer("torchzero-fg", "torchzero's ForwardGradient: weight-space forward gradient by a JVP "
                         "(Baydin et al. 2022)", 3, _torchzero_forward_gradient),
})
"""Peer name → :class:`Peer`; every peer steps the same ``torch.optim.AdamW`` as the guessed methods."""
