"""How good is a guess? Cosine similarity of an estimate to the backprop gradient (paper §3, Fig. 1).

Backprop is the oracle: the reference gradient is computed with ``torch.autograd.grad`` on the plain model (the
handle paused), so ``p.grad`` is never touched by the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import GuessHandle, attach, handle_of

__all__ = ["CosineReport", "backprop_gradient", "cosine_similarity", "gradient_cosine", "read_grads"]

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class CosineReport:
    """Cosine similarity of an estimate to the true gradient.

    Attributes:
        total: over all trainable parameters concatenated, in ``[-1, 1]``.
        per_layer: per module (qualified name) with trainable parameters, its parameters concatenated.
    """

    total: float
    per_layer: dict[str, float] = field(default_factory=dict)


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(((a @ b) / (na * nb)).clamp(-1.0, 1.0))  # rounding can exceed 1 by an ulp


def _layers(model: nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for mname, mod in model.named_modules():
        names = [f"{mname}.{n}" if mname else n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if names:
            out[mname or "<root>"] = names
    return out


def gradient_cosine(model: nn.Module, estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> CosineReport:
    """Cosine similarity between two gradients given as ``{parameter name: tensor}``.

    Parameters missing from ``estimate`` count as zero (no estimate was written). Computed in float64.
    """
    def flat(names: Sequence[str], grads: dict[str, Tensor]) -> Tensor:
        return torch.cat([
            (grads[n] if grads.get(n) is not None else torch.zeros_like(reference[n])).detach().double().flatten()
            for n in names
        ])

    names = list(reference)
    per_layer = {
        layer: _cos(flat(ps, estimate), flat(ps, reference)) for layer, ps in _layers(model).items()
    }
    return CosineReport(total=_cos(flat(names, estimate), flat(names, reference)), per_layer=per_layer)


def read_grads(model: nn.Module) -> dict[str, Tensor | None]:
    """``{name: p.grad}`` (clones) of the model's trainable parameters."""
    return {
        n: (None if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def backprop_gradient(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn) -> dict[str, Tensor]:
    """The exact gradient ``∂loss_fn(model(inputs), targets)/∂θ`` by backprop, without touching ``p.grad``.

    Args:
        model: the model (if a :class:`GuessHandle` is attached, it is paused for this call).
        batch: ``(inputs, targets)``; ``inputs`` is passed to the model as is (a tensor, or a tuple of positional
            arguments).
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.

    Returns:
        ``{parameter name: gradient}`` for every trainable parameter (zeros where the loss does not depend on it).
    """
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    handle = handle_of(model)
    ctx = handle.paused() if handle is not None else contextlib.nullcontext()
    with ctx, torch.enable_grad():
        loss = _loss(model, batch, loss_fn)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads, strict=True)}


def cosine_similarity(
    model: nn.Module,
    method: str | GuessHandle,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    **attach_kwargs: Any,
) -> CosineReport:
    """Cosine similarity of one guessed estimate to the backprop gradient on ``batch`` (paper Fig. 1).

    ``p.grad`` of the model is left exactly as it was.

    Args:
        model: the model, in the mode in which to measure (usually ``train()``).
        method: a method name (attached for this call only; ``attach_kwargs`` such as ``seed=`` are passed on), or
            the :class:`GuessHandle` already attached to ``model``.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.

    Returns:
        A :class:`CosineReport`: whole model and per layer.

    Raises:
        RuntimeError: ``method`` is a name but the model already has a handle attached (pass the handle instead).
    """
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        reference = backprop_gradient(model, batch, loss_fn)
        for p in model.parameters():
            p.grad = None
        if isinstance(method, GuessHandle):
            _loss(model, batch, loss_fn).backward()
        else:
            with attach(model, method, **attach_kwargs):
                _loss(model, batch, loss_fn).backward()
        estimate = read_grads(model)
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
    return gradient_cosine(model, estimate, reference)


def _loss(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn) -> Tensor:
    inputs, targets = batch
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return loss_fn(out, targets)
