"""``attach(model, method=...)``: the one call that makes ``loss.backward()`` write guessed gradients."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ._checks import check_choice, check_int
from .estimators import Estimator, make_estimator
from .handle import ATTR, GuessHandle, live_handles
from .layout import GUESS_POINT_TYPES, unsupported_parameters  # noqa: F401  (GUESS_POINT_TYPES: docs)
from .nonfinite import NONFINITE_POLICIES
from .release import refuse_distributed

__all__ = ["COMBINES", "RAW_PARAMETERS", "STORES", "attach", "handle_of"]

RAW_PARAMETERS = ("guess", "directional", "error")
"""What to do with trainable parameters outside the fast-path modules (``raw_parameters=`` of :func:`attach`)."""
STORES = ("activations", "recompute")
COMBINES = ("mean", "project")
"""What a step keeps between its forward and its backward (``store=`` of :func:`attach`)."""


def handle_of(model: nn.Module) -> GuessHandle | None:
    """The :class:`~guess_optim.GuessHandle` attached to ``model``, or ``None``."""
    return getattr(model, ATTR, None)


def attach(
    model: nn.Module,
    method: str | Estimator = "wt",
    *,
    seed: int | None = None,
    exact_head: bool = False,
    num_guesses: int = 1,
    head: nn.Module | None = None,
    on_nonfinite: str = "skip",
    store: str = "activations",
    raw_parameters: str = "guess",
    combine: str = "mean",
    gradient_release: bool = False,
    **options: Any,
) -> GuessHandle:
    """Train ``model`` with guessed gradients: an unchanged ``loss.backward()`` writes the estimate to ``p.grad``.

    Example::

        handle = attach(model, method="wt", seed=0)
        loss = F.cross_entropy(model(x), y)   # any loss, any reduction
        loss.backward()                       # estimate of ∂loss/∂p in every trainable p.grad
        opt.step()
        handle.remove()                       # the model is exactly as before

    Guessing happens in training-mode forwards with grad enabled; ``eval()``, ``torch.no_grad()`` and
    ``torch.inference_mode()`` run the plain model. Dim 0 of the model's inputs and output must be the batch
    (each example's output may depend only on that example: BatchNorm must be in eval mode).

    Args:
        model: any ``nn.Module`` whose trainable parameters live in modules of :data:`GUESS_POINT_TYPES`
            (``nn.Linear`` on any leading shape, ``nn.Conv1d/2d``, ``nn.LayerNorm``, ``nn.GroupNorm``,
            ``nn.Embedding``, eval-mode BatchNorm, :class:`~guess_optim.PromptTokens`) with parameter-free ops
            (activations, reshapes, pooling, dropout, attention) in between.
        method: a name of :data:`~guess_optim.METHODS` (``"backprop"``, ``"directional"``, ``"activation"``,
            ``"mixing"``, ``"wt"``, ``"downstream"``, ``"self-sharpening"``, or one you registered with
            :func:`~guess_optim.register_estimator`), or an :class:`~guess_optim.Estimator` instance
            (``WT(power=2.0)``). Paper §2, A.4. (default: ``"wt"``)
        seed: seed of the handle's private ``torch.Generator``; the same seed gives bit-identical estimates. The
            global RNG is never used. ``None`` draws a seed from the OS. (default: ``None``)
        exact_head: give the output layer(s) — guess points with no next module — their exact gradient, which is
            local (computed from ``∂L/∂z`` without backprop through the network). Always on for
            ``"self-sharpening"``. (default: ``False``)
        num_guesses: ``K`` independent guesses averaged per step (paper Fig. 3); costs a forward over ``K x`` the
            batch. (default: 1)
        head: the module whose output ends the guessing region, for models whose output is not a tensor (Hugging
            Face ``ModelOutput``) or that compute their loss inside ``forward``. (default: the model itself)
        on_nonfinite: ``"skip"`` (warn with :class:`~guess_optim.NonFiniteEstimateWarning`, write no estimate,
            count it in ``handle.skipped_steps``), ``"raise"`` (``FloatingPointError``) or ``"propagate"`` (write it
            as backprop would, and count it: for ``torch.amp.GradScaler``, whose ``step()`` needs to see the overflow
            to skip the step and back off the scale). (default: ``"skip"``)
        store: ``"activations"`` keeps each guess point's input and guess from the forward to the backward (memory
            like backprop's); ``"recompute"`` keeps only the input batch and the generator/RNG states, and runs a
            second forward during ``backward()`` that regenerates them one layer at a time (memory near inference's,
            one extra forward of compute; same estimate). (default: ``"activations"``)
        raw_parameters: what to do with trainable parameters outside the fast-path modules (a ViT's ``cls_token``,
            position embeddings, ``nn.MultiheadAttention``, transformers' ``Conv1D``, ``RMSNorm``, parametrized or
            weight-normed layers, a weight used outside its module): ``"guess"`` makes every op where one meets the
            batch a guess point of the method (its estimate is that op's local VJP, pulled back exactly through the
            parameter-only ops before it); ``"directional"`` gives them a weight-space guess ``V ~ N(0, I)`` per use
            (shared by the ``num_guesses`` blocks) for every method; ``"error"`` refuses them at attach time.
            (default: ``"guess"``)
        combine: how the ``num_guesses=K`` guesses of a step combine: ``"mean"`` averages their estimates (unbiased
            for unbiased guesses); ``"project"`` gives each example the projection of its gradient onto the span of its
            ``K`` guesses, ``V (VᵀV)⁺ d_b`` over all its guessed coordinates (Flügel et al., "Beyond Backpropagation:
            Optimization with Multi-Tangent Forward Gradients", IJCNN 2025). With isotropic guesses the projection
            averages to ``(K / n) ∇L``, ``n`` the guessed coordinates per example: multiply by ``n / K`` for an unbiased
            estimate, or raise the learning rate accordingly (10–100x in the reference's tuning). Needs
            ``store="activations"``. (default: ``"mean"``)
        gradient_release: hand each parameter's estimate to autograd as soon as it is complete (all its uses in the
            step accumulated), instead of all estimates at the end of ``backward()``: a hook registered with
            ``p.register_post_accumulate_grad_hook`` then runs at once, so an optimizer stepped in backward
            (:class:`~guess_optim.optim.OptimizerInBackward`; PyTorch's "optimizer step in backward", optimi's
            "gradient release") applies it and frees it before the next parameter's is formed. With
            ``store="recompute"`` peak memory is then the model, the optimizer state and about one layer. The
            parameters are updated during ``backward()``, so what needs every gradient of the step cannot work:
            accumulation over micro-batches (a ``.grad`` already present is an error), global-norm clipping
            (``clip_grad_norm_``; clip each parameter in its own hook instead), ``GradScaler``, DDP/FSDP (refused).
            Each estimate is checked before it is delivered: a non-finite one never reaches its parameter (with
            ``on_nonfinite="skip"`` its step is skipped with a warning, the parameters delivered before it keep their
            step; ``"raise"`` raises, leaving the parameters delivered before it stepped; ``"propagate"`` is refused).
            Without a hook that steps and clears ``p.grad``, the estimates simply accumulate into ``p.grad`` as usual
            (with a warning: the memory saving is lost). With ``method="backprop"`` it changes nothing: autograd
            already accumulates each gradient as soon as it is formed. (default: ``False``)
        **options: the estimator's own options, e.g. ``power=`` of ``"wt"`` (also ``wt_power=``), ``layers=`` and
            ``distribution=`` of ``"downstream"`` (also ``downstream_layers=``). See each class in
            :mod:`guess_optim.estimators`.

    Returns:
        The :class:`~guess_optim.GuessHandle` (also a context manager).

    Raises:
        ValueError: unknown method or option, an invalid option value, a trainable parameter in an unsupported
            module type, no trainable parameter at all, a model compiled with ``torch.compile``, or
            ``gradient_release=True`` with ``on_nonfinite="propagate"`` or a DDP/FSDP-wrapped model.
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: the model already has a handle attached, or ``gradient_release=True`` in a
            ``torch.distributed`` process group of more than one rank.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() expects an nn.Module, got {type(model).__name__}")
    estimator = make_estimator(method, **options)
    check_int("num_guesses", num_guesses, low=1)
    if estimator.space == "backprop" and (num_guesses != 1 or exact_head or store != "activations"):
        raise ValueError(
            "num_guesses, exact_head and store apply to guessed methods; method='backprop' computes the exact "
            "gradient (leave them at their defaults)"
        )
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    check_choice("store", store, STORES)
    check_choice("raw_parameters", raw_parameters, RAW_PARAMETERS)
    check_choice("combine", combine, COMBINES)
    if combine == "project" and store != "activations":
        raise ValueError("combine='project' needs store='activations' (the Gram matrix of the guesses is formed "
                         "before the estimates; the recompute replay regenerates the guesses only then)")
    for flag, value in (("gradient_release", gradient_release), ("exact_head", exact_head)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {flag}: {value!r}; expected a bool")
    if gradient_release:
        _check_release(model, on_nonfinite)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    else:
        check_int("seed", seed, low=0)
    _check_model(model, head)
    if estimator.space != "backprop" and raw_parameters == "error":
        unsupported = unsupported_parameters(model)
        if unsupported:
            name, mod, own = unsupported[0]
            raise ValueError(
                f"module {name or '<root>'!r} ({type(mod).__name__}) has trainable parameters {own} outside the fast "
                "paths, and raw_parameters='error' refuses them. Pass raw_parameters='guess' (the default: every op "
                "where they meet the batch is a guess point), raw_parameters='directional' (weight-space guesses), "
                "freeze them (requires_grad_(False)), or use method='backprop'."
            )
    return GuessHandle(model, estimator, seed=int(seed), exact_head=exact_head, num_guesses=int(num_guesses),
                       head=head, on_nonfinite=on_nonfinite, store=store, raw_parameters=raw_parameters,
                       combine=combine, gradient_release=gradient_release)


def _check_release(model: nn.Module, on_nonfinite: str) -> None:
    """What ``gradient_release=True`` cannot work with, refused before anything is installed."""
    if on_nonfinite == "propagate":
        raise ValueError(
            "gradient_release=True steps each parameter inside backward(), so a non-finite estimate written there "
            "would reach the weights before a GradScaler could skip the step: on_nonfinite='propagate' is refused. "
            "Use on_nonfinite='skip' (the default) or 'raise'; loss scaling (GradScaler) needs the whole step's "
            "gradients and cannot step in backward."
        )
    wrappers = [type(m).__name__ for m in model.modules()
                if type(m).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")]
    if wrappers:
        raise ValueError(
            f"gradient_release=True with a {wrappers[0]}-wrapped model: stepping each parameter in backward would "
            "apply each rank's own estimate before it is averaged across ranks. Use gradient_release=False (estimates "
            "are all-reduced like ordinary gradients) and a regular optimizer.step()."
        )
    refuse_distributed("at attach")


def _check_model(model: nn.Module, head: nn.Module | None) -> None:
    if hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule":
        raise ValueError(
            "attach() got a torch.compile'd model; attach to the original module (model._orig_mod) instead: "
            "forward-mode guessing runs eagerly"
        )
    existing = handle_of(model)
    if existing is not None:
        raise RuntimeError(
            f"this model already has guessed gradients attached ({existing!r}); call handle.remove() first "
            "(guess_optim.handle_of(model).remove() if you have no handle, e.g. on a deep copy)"
        )
    inner = next(((n, m) for n, m in model.named_modules() if n and handle_of(m) is not None), None)
    if inner is not None:
        raise RuntimeError(
            f"submodule {inner[0]!r} of this model already has guessed gradients attached ({handle_of(inner[1])!r}): "
            "one attach per model (pass head= or freeze parameters to narrow what is guessed); remove that handle "
            "first"
        )
    outer = next((h for h in live_handles() if any(m is model for m in h.model.modules())), None)
    if outer is not None:
        raise RuntimeError(
            f"this model is a submodule of a model that already has guessed gradients attached ({outer!r}): one "
            "attach per model (pass head= or freeze parameters to narrow what is guessed); remove that handle first"
        )
    lazy = next((n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:
        raise ValueError(
            f"parameter {lazy!r} is not initialized yet (a lazy module, e.g. nn.LazyLinear): run one forward of the "
            "model (e.g. under torch.no_grad()) to materialize it, then attach"
        )
    if head is not None and not any(head is mod for mod in model.modules()):
        raise ValueError("head must be a submodule of the model")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    complex_params = [n for n, p in model.named_parameters() if p.requires_grad and p.is_complex()]
    if complex_params:
        raise ValueError(
            f"trainable complex parameter {complex_params[0]!r}: guessed gradients do not support complex values (the "
            "estimate would be noise); use method='backprop' for this model"
        )
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.scale_grad_by_freq and m.weight.requires_grad:
            raise ValueError(
                f"nn.Embedding {n!r} has scale_grad_by_freq=True: its gradient divides by each token's count in the "
                "batch, which mixes the examples (a per-example directional derivative cannot carry it). Set "
                "scale_grad_by_freq=False, or use method='backprop'"
            )
