"""How good is a guess? One guessed estimate, the backprop gradient, and their cosine similarity (paper §3, Fig. 1).

:func:`guessed_gradient` and :func:`backprop_gradient` return gradients as ``{parameter name: tensor}`` without
touching ``p.grad``; backprop is the oracle, computed with ``torch.autograd.grad`` on the plain model (the handle
paused). :func:`cosine_similarity` compares the two on one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._rng import capture_rng, cuda_devices, replayed_rng
from .engine import GuessHandle, attach, handle_of
from .estimators import get_estimator

__all__ = [
    "CosineReport",
    "backprop_gradient",
    "cosine_similarity",
    "gradient_cosine",
    "guessed_gradient",
    "read_grads",
]

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


def backprop_gradient(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn, *,
                      missing_as_none: bool = False) -> dict[str, Tensor | None]:
    """The exact gradient ``∂loss_fn(model(inputs), targets)/∂θ`` by backprop, without touching ``p.grad``.

    Args:
        model: the model (if a :class:`GuessHandle` is attached, it is paused for this call).
        batch: ``(inputs, targets)``; ``inputs`` is passed to the model as is (a tensor, or a tuple of positional
            arguments).
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        missing_as_none: ``None`` (not zeros) for a parameter the loss does not depend on. (default: ``False``)

    Returns:
        ``{parameter name: gradient}`` for every trainable parameter (zeros where the loss does not depend on it).
    """
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    handle = handle_of(model)
    ctx = handle.paused() if handle is not None else contextlib.nullcontext()
    with ctx, torch.enable_grad():
        loss = _loss(model, batch, loss_fn)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (g if g is not None or missing_as_none else torch.zeros_like(p))
            for n, p, g in zip(names, params, grads, strict=True)}


def guessed_gradient(
    model: nn.Module,
    method: str | GuessHandle,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    *,
    seed: int | None = None,
    **attach_kwargs: Any,
) -> dict[str, Tensor]:
    """One guessed estimate of ``∂loss_fn(model(inputs), targets)/∂θ``, without touching ``p.grad`` (paper §2).

    The estimate is what ``loss.backward()`` would write into ``p.grad`` with ``method`` attached: one forward with
    forward-mode AD along the guesses, the directional derivative times the guess. It is the counterpart of
    :func:`backprop_gradient`; :func:`cosine_similarity` compares the two.

    Left untouched: every parameter's ``p.grad`` (restored exactly, also when an error is raised) and the model's
    attach state (a method name is attached for this call only and removed; a handle stays attached). A handle's
    generators advance as in a training step, so successive calls draw new guesses, and its counters
    (``skipped_steps``) count the call. Guessed forwards draw dropout masks from the global RNG like any forward.

    Example::

        est = guessed_gradient(model.train(), "wt", (x, y), F.cross_entropy, seed=0)
        ref = backprop_gradient(model, (x, y), F.cross_entropy)

    Args:
        model: the model, in training mode when ``method`` guesses (in eval mode the engine runs the plain model).
        method: a name of :data:`~guess_optim.METHODS` (attached for this call with ``seed`` and
            ``attach_kwargs``), or the :class:`~guess_optim.GuessHandle` already attached to ``model``.
        batch: ``(inputs, targets)``; ``inputs`` is passed to the model as is (a tensor, or a tuple of positional
            arguments).
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        seed: seed of the guesses when ``method`` is a name; the same seed gives the same estimate. (default:
            ``None``: drawn from the OS, as :func:`~guess_optim.attach` does)
        **attach_kwargs: further options of :func:`~guess_optim.attach` when ``method`` is a name
            (``num_guesses``, ``exact_head``, ``head``, ...).

    Returns:
        ``{parameter name: estimate}`` for every trainable parameter, each of the parameter's shape, dtype and
        device; zeros for a parameter that got no estimate (e.g. a non-finite estimate that the engine skipped with a
        :class:`~guess_optim.NonFiniteEstimateWarning`).

    Raises:
        ValueError: unknown method name; a guessing method on a model in eval mode; ``seed``/``attach_kwargs`` with a
            handle; a handle attached to another model; an invalid option (from :func:`~guess_optim.attach`).
        RuntimeError: ``method`` is a name but the model already has a handle attached (pass the handle instead).
    """
    handle = method if isinstance(method, GuessHandle) else None
    if handle is not None:
        if seed is not None or attach_kwargs:
            raise ValueError("seed= and attach options apply to a method name; the handle already has its own")
        if handle_of(model) is not handle:
            raise ValueError(f"{handle!r} is not attached to this model; pass the model it was attached to")
        space = handle.method.space
    else:
        space = get_estimator(method).space
    if space != "backprop" and not model.training:
        raise ValueError(
            "guessed_gradient needs the model in training mode: guesses are drawn only in training-mode forwards "
            "(in eval mode the estimate would be the exact gradient); call model.train() first"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        for _, p in named:
            p.grad = None
        with torch.enable_grad():
            if handle is not None:
                _loss(model, batch, loss_fn).backward()
            else:
                with attach(model, method, seed=seed, **attach_kwargs):
                    _loss(model, batch, loss_fn).backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach() for n, p in named}
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]


def cosine_similarity(
    model: nn.Module,
    method: str | GuessHandle,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    **attach_kwargs: Any,
) -> CosineReport:
    """Cosine similarity of one guessed estimate to the backprop gradient on ``batch`` (paper §3, Fig. 1).

    The estimate is :func:`guessed_gradient`'s and the reference :func:`backprop_gradient`'s; the reference's forward
    replays the global RNG state of the estimate's (:mod:`guess_optim._rng`), so both see the same dropout masks.
    ``p.grad`` and the model's attach state are left as they were.

    Args:
        model: the model, in training mode (see :func:`guessed_gradient`).
        method: a method name (attached for this call only; ``attach_kwargs`` such as ``seed=`` are passed on), or
            the :class:`GuessHandle` already attached to ``model``.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.

    Returns:
        A :class:`CosineReport`: whole model and per layer.

    Raises:
        ValueError, RuntimeError: as :func:`guessed_gradient`.
    """
    rng = capture_rng(cuda_devices(model.parameters()))
    with replayed_rng(rng):
        reference = backprop_gradient(model, batch, loss_fn)
    estimate = guessed_gradient(model, method, batch, loss_fn, **attach_kwargs)
    return gradient_cosine(model, estimate, reference)


def _loss(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn) -> Tensor:
    inputs, targets = batch
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return loss_fn(out, targets)
