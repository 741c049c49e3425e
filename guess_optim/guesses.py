"""The guesses of "How to Guess a Gradient": one pure function per method.

Every function here takes tensors (and a private :class:`torch.Generator`) and returns a guess tensor; none of them
knows about modules, hooks or autograd state. The estimators (:mod:`guess_optim.estimators`, one class each) call
them; the engine decides where a guess is injected and turns the measured directional derivative into an estimate.
``METHODS`` (the registry) and ``get_method`` are importable from here too.

Notation (paper §2.1), for one example ``b`` and a guess point ``i`` with output (pre-activation)
``s_i`` of shape ``[N, *S]`` (``N`` rows: the batch, repeated ``num_guesses`` times):

* ``activation``: ``u_b ~ N(0, I)``, unbiased: ``E[(g·u) u] = g``.
* ``mixing``: ``u_b = J_b^T Σ_{b'} α_{b b'} x_{i+1, b'}``, ``α ~ N(0, 1)``; ``J`` the Jacobian of the element-wise ops
  from ``s_i`` to the next module's input ``x_{i+1}`` (for ReLU: the activation mask). Biased:
  ``E[u u^T] ∝ J^T Cov(x_{i+1}) J``.
* ``wt``: ``u_b = J_b^T W_{i+1}^T ε_b``, ``ε ~ N(0, I)`` (the VJP of ``ε`` through the next module). Biased:
  ``E[u u^T] = J^T W^T W J``.
* ``downstream`` (``l`` layers): the VJP of ``ε ~ N(0, I)`` from the post-activation ``l`` modules downstream back to
  ``s_i`` (``l = 1``: ``J^T W_{i+1}^T (m_{i+1} ⊙ ε)``). Biased.
* ``self-sharpening``: ``downstream`` with ``ε ~ U[0, 1)`` (or ``U(-1, 1)``) and the exact head gradient (A.4).
* ``directional``: weight-space ``V ~ N(0, I)`` of each parameter's shape, shared by the batch. Unbiased.

Every activation-space guess is rescaled per example (per row) to norm ``sqrt(n)``, ``n = prod(S)`` (the paper's
"we normalize the overall guess"); every weight-space guess per parameter tensor to norm ``sqrt(numel)``. Rescaling
an isotropic guess to a fixed norm keeps it exactly unbiased (``E[u u^T] = I`` on the sphere of radius ``sqrt(n)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Pullback",
    "directional_guess",
    "downstream_guess",
    "isotropic_guess",
    "mixing_guess",
    "normalize_rows",
    "random_cotangent",
    "wt_guess",
    "zero_padding",
]

Pullback = Callable[[Iterable[Tensor]], Tensor]
"""Maps cotangents of the targets (one per target, each of its target's shape, in the targets' order) to a tensor of
the guess point's output shape: the vector-Jacobian product through the ops between the guess point and the targets.
The cotangents may come as a lazy iterable, drawn one at a time: a pullback that consumes them in order keeps only one
alive (a prompt token's next modules are every layer's projections)."""

Distribution = Literal["normal", "uniform", "symmetric-uniform"]


def normalize_rows(u: Tensor, eps: float = 1e-30, *, inplace: bool = False) -> Tensor:
    """Rescale each row ``u[r]`` to norm ``sqrt(n)``, ``n = u[r].numel()``; an all-zero row stays zero.

    Args:
        u: guesses, shape ``[N, *S]`` (``N`` examples, any trailing shape).
        eps: floor of the norm, so an all-zero row (e.g. a dead ReLU layer) is left at zero rather than NaN.
        inplace: scale ``u`` itself (contiguous ``u`` only; for fresh draws, saving a pass and an allocation).

    Returns:
        Tensor of the same shape and dtype.
    """
    flat = u.reshape(u.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    scale = math.sqrt(flat.shape[1]) / norms.clamp_min(eps)
    if inplace and u.is_contiguous():
        flat.mul_(scale)
        return u
    return (flat * scale).reshape(u.shape)


def random_cotangent(
    like: Tensor, generator: torch.Generator, distribution: Distribution = "normal"
) -> Tensor:
    """A random tensor of ``like``'s shape, dtype and device, drawn from ``generator`` only.

    Args:
        like: reference tensor, any shape.
        generator: the handle's private generator (never the global RNG).
        distribution: ``"normal"`` (``N(0, 1)``), ``"uniform"`` (``U[0, 1)``, ``torch.rand``) or
            ``"symmetric-uniform"`` (``U(-1, 1)``). (default: ``"normal"``)

    Raises:
        ValueError: unknown ``distribution``.
    """
    if distribution == "normal":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if distribution == "uniform":
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if distribution == "symmetric-uniform":
        r = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        return r.mul_(2).sub_(1)
    raise ValueError(
        f"Invalid distribution: {distribution!r}; expected 'normal', 'uniform' or 'symmetric-uniform'"
    )


def isotropic_guess(output: Tensor, generator: torch.Generator) -> Tensor:
    """Activation perturbation (paper A.4): ``u ~ N(0, I)`` of the guess point's output shape ``[N, *S]``."""
    return normalize_rows(random_cotangent(output, generator), inplace=True)


def mixing_guess(
    targets: Sequence[Tensor], pullback: Pullback, generator: torch.Generator, num_guesses: int = 1
) -> Tensor:
    """Activation mixing (paper §2.2, A.4): random combinations of the batch's post-activations, pulled back.

    Args:
        targets: the post-activations ``x_{i+1}`` feeding each next module, each ``[N, *T]`` with
            ``N = num_guesses * B``; the mixing coefficients ``α ~ N(0, 1)`` (``[B, B]`` per guess) mix only the
            rows of one guess block.
        pullback: VJP from the targets back to the guess point's output (applies the activation mask).
        generator: private generator.
        num_guesses: number of guess blocks stacked along the rows. (default: 1)

    Returns:
        The guess, ``[N, *S]``, rows normalized.
    """
    cotangents = []
    for x in targets:
        flat = x.reshape(num_guesses, x.shape[0] // num_guesses, -1)
        alpha = torch.randn(
            (num_guesses, flat.shape[1], flat.shape[1]), generator=generator, dtype=x.dtype, device=x.device
        )
        cotangents.append(torch.bmm(alpha, flat).reshape(x.shape))
    return normalize_rows(pullback(cotangents))


def wt_guess(targets: Sequence[Tensor], pullback: Pullback, generator: torch.Generator) -> Tensor:
    """``W^T`` guessing (paper §2.1, A.4): ``ε ~ N(0, I)`` at each next module's output, pulled back.

    Args:
        targets: the next modules' outputs ``s_{i+1}`` (each ``[N, *T]``), only their shapes are used.
        pullback: VJP through (element-wise ops, next module), i.e. ``ε ↦ J^T W_{i+1}^T ε`` for a Linear.
        generator: private generator.

    Returns:
        The guess, ``[N, *S]``, rows normalized.
    """
    return normalize_rows(pullback(random_cotangent(t, generator) for t in targets))


def downstream_guess(
    targets: Sequence[Tensor],
    pullback: Pullback,
    generator: torch.Generator,
    distribution: Distribution = "normal",
) -> Tensor:
    """``l``-layer downstream guessing (paper §2.1 "partial backpropagation", A.4) and self-sharpening.

    Args:
        targets: the post-activations ``l`` modules downstream, each ``[N, *T]`` (only shapes are used).
        pullback: VJP through the ``l``-module segment back to the guess point.
        generator: private generator.
        distribution: law of ``ε``: ``"normal"`` for ``downstream``, ``"uniform"`` (``U[0, 1)``, default of
            ``self-sharpening``) or ``"symmetric-uniform"``. (default: ``"normal"``)

    Returns:
        The guess, ``[N, *S]``, rows normalized.
    """
    return normalize_rows(pullback(random_cotangent(t, generator, distribution) for t in targets))


def directional_guess(param: Tensor, generator: torch.Generator) -> Tensor:
    """Directional descent (weight perturbation, paper A.4): ``V ~ N(0, I)`` of ``param``'s shape, rescaled to
    norm ``sqrt(numel)`` (still exactly unbiased)."""
    v = random_cotangent(param.detach(), generator)
    return normalize_rows(v.reshape(1, -1), inplace=True).reshape(param.shape)


def zero_padding(u: Tensor, ids: Tensor | None, padding_idx: int | None) -> Tensor:
    """An embedding's output guess ``u`` (``[*ids.shape, D]``) with zeros at the positions whose id is
    ``padding_idx`` (non-negative; ``None``: ``u`` unchanged).

    Backprop's gradient through those positions only reaches the padding row, whose gradient is zero by definition:
    a guess there adds nothing to the estimate but noise to every directional derivative (a norm after the embedding
    sees an all-zero input there, with a Jacobian of order ``1/sqrt(eps)``). The guess of the other positions is
    unchanged, so an unbiased estimate stays unbiased (``E[u uᵀ]`` restricted to them is still ``I``).
    """
    if padding_idx is None:
        return u
    return u.masked_fill((ids == padding_idx).unsqueeze(-1), 0)


def __getattr__(name: str):
    # The registry moved to guess_optim.estimators (one class per estimator); these names stay importable from here.
    if name in ("METHODS", "get_method", "Method"):
        from . import estimators

        return {"METHODS": estimators.METHODS, "get_method": estimators.get_estimator,
                "Method": estimators.Estimator}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
