"""How good is a guess? One guessed estimate, the backprop gradient, and their cosine similarity (paper §3, Fig. 1);
the bias and variance of an estimator at fixed weights.

:func:`guessed_gradient` and :func:`backprop_gradient` return gradients as ``{parameter name: tensor}`` without
touching ``p.grad``; backprop is the oracle, computed with ``torch.autograd.grad`` on the plain model (the handle
paused). :func:`cosine_similarity` compares the two on one batch; :func:`bias_variance` averages many guesses and
reports, per layer, how far their mean is from the gradient (bias) and how far one guess is from their mean
(variance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._rng import capture_rng, cuda_devices, replayed_rng
from .engine import GuessHandle, attach, handle_of
from .estimators import Estimator, get_estimator

__all__ = [
    "BiasVarianceReport",
    "BiasVarianceRow",
    "CosineReport",
    "backprop_gradient",
    "bias_variance",
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


@dataclass
class BiasVarianceRow:
    """Bias and variance of one layer's estimate (its trainable parameters concatenated), or of the whole model's.

    ``g`` is the backprop gradient, ``ĝ`` one guess's estimate, ``ḡ`` the mean of all guesses drawn. Norms are in the
    gradient's units (the loss's per parameter unit), ``variance`` in their square.

    Attributes:
        norm: ``‖g‖``.
        bias: ``‖E[ĝ] - g‖``, estimated without the sampling noise of ``ḡ``:
            ``sqrt(max(‖ḡ - g‖² - variance / guesses, 0))``.
        bias_noise: ``sqrt(variance / guesses)``: the standard error of ``‖ḡ - E[ĝ]‖``; a ``bias`` below a few
            times this is not resolved.
        variance: ``E‖ĝ - E[ĝ]‖²`` of a single guess (from the spread of the per-step means of ``num_guesses``
            guesses, times ``num_guesses``).
        cosine: the mean over single guesses of ``cos(ĝ, g)`` (the paper's Fig. 1 measure).
        cosine_of_mean: ``cos(ḡ, g)``.
        scale: ``<ḡ, g> / ‖g‖²`` (1 for an unbiased estimator).
    """

    norm: float
    bias: float
    bias_noise: float
    variance: float
    cosine: float
    cosine_of_mean: float
    scale: float

    @property
    def relative_bias(self) -> float:
        """``bias / ‖g‖`` (``nan`` for a zero gradient)."""
        return self.bias / self.norm if self.norm > 0 else math.nan

    @property
    def relative_variance(self) -> float:
        """``variance / ‖g‖²`` (``nan`` for a zero gradient)."""
        return self.variance / self.norm**2 if self.norm > 0 else math.nan

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "relative_bias": self.relative_bias,
                "relative_variance": self.relative_variance}


@dataclass
class BiasVarianceReport:
    """What :func:`bias_variance` measured: per layer (module qualified name) and for the whole model.

    Attributes:
        method: the estimator (its name and options).
        guesses: guesses averaged for ``ḡ`` (``steps x num_guesses``).
        single: single guesses drawn for ``cosine``.
        total: the whole model (every trainable parameter concatenated).
        per_layer: ``{module name: BiasVarianceRow}``.
    """

    method: str
    guesses: int
    single: int
    total: BiasVarianceRow
    per_layer: dict[str, BiasVarianceRow] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "guesses": self.guesses, "single": self.single, "total": self.total.as_dict(),
                "per_layer": {k: v.as_dict() for k, v in self.per_layer.items()}}

    def __str__(self) -> str:
        head = (f"{'layer':<24} {'|g|':>9} {'rel. bias':>9} {'± noise':>8} {'rel. var':>9} {'cos(1)':>8} "
                f"{'cos(mean)':>9}")
        lines = [f"{self.method}: {self.guesses} guesses averaged, {self.single} single", head]
        for name, r in [*self.per_layer.items(), ("(all)", self.total)]:
            noise = r.bias_noise / r.norm if r.norm > 0 else math.nan
            lines.append(f"{name:<24} {r.norm:>9.3g} {r.relative_bias:>9.3g} {noise:>8.2g} {r.relative_variance:>9.3g} "
                         f"{r.cosine:>8.4f} {r.cosine_of_mean:>9.4f}")
        return "\n".join(lines)


def bias_variance(
    model: nn.Module,
    method: str | Any,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    *,
    guesses: int = 2048,
    per_step: int = 256,
    single: int = 64,
    seed: int = 0,
    **attach_kwargs: Any,
) -> BiasVarianceReport:
    """Bias and variance of an estimator per layer at fixed weights: many guesses on one batch against backprop.

    For a layer (a module's trainable parameters, flattened and concatenated into one vector of ``P`` numbers) with
    backprop gradient ``g`` and one guess's estimate ``ĝ`` (what ``loss.backward()`` writes into ``p.grad``), both in
    the gradient's units (loss per parameter unit):

    * **bias** ``‖E[ĝ] - g‖``: what averaging infinitely many guesses would still miss (``W^T``'s ``Cov(u) g - g``,
      ``research/follow-up-estimators.md``); 0 for an unbiased estimator;
    * **variance** ``E‖ĝ - E[ĝ]‖²`` (a trace, summed over the ``P`` numbers, in squared gradient units): the noise
      of one guess around its own mean. Mean squared error = ``bias² + variance``.

    Estimated from ``S = ceil(guesses / per_step)`` steps; step ``s`` is one forward and backward with
    ``num_guesses=per_step`` (``K``), whose estimate ``ĝ_s`` is the mean of ``K`` guesses. With ``ḡ = mean_s ĝ_s``:

    * ``var_K = Σ_s ‖ĝ_s - ḡ‖² / (S - 1)`` (the variance of a ``K``-guess mean), ``variance = K · var_K``;
    * ``bias_noise² = var_K / S`` (the expected ``‖ḡ - E[ĝ]‖²``) and ``bias = sqrt(max(‖ḡ - g‖² - bias_noise², 0))``:
      the sampling noise of ``ḡ`` is removed from its squared error, so an unbiased estimator reads about 0 (within a
      few ``bias_noise``);
    * ``cosine``: the mean of ``cos(ĝ, g)`` over ``single`` more forwards with one guess each (paper Fig. 1).

    Put any estimator in the same table::

        report = bias_variance(model.train(), "wt-perp", (x, y), F.cross_entropy, rank=1)
        print(report)                       # per layer: |g|, relative bias ± noise, relative variance, cosines
        report.per_layer["layers.1"].relative_bias

    Closed forms to check against: ``directional`` (one weight guess ``V`` per parameter tensor, norm
    ``sqrt(numel)``) has variance ``P_l ‖g‖² - ‖g_l‖²`` in layer ``l`` (``P_l`` its numbers, ``g`` the whole model's
    gradient: every layer carries the others' noise); ``activation`` and full-rank ``wt-perp`` have bias 0.

    ``p.grad`` and the model's attach state are left as they were; the reference's forward replays the global RNG
    state of the guessed forwards (the same dropout masks).

    Args:
        model: the model, in training mode, with no :class:`GuessHandle` attached.
        method: a registered method name or an :class:`~guess_optim.Estimator` instance (any space but backprop).
        batch: ``(inputs, targets)``; inputs of shape ``[B, ...]`` (a tensor or a tuple of positional arguments).
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        guesses: guesses averaged for the bias (rounded up to a multiple of ``per_step``, at least two steps).
            (default: 2048)
        per_step: guesses per forward (``num_guesses``); memory grows with ``per_step x B``. (default: 256)
        single: single-guess estimates for the mean cosine (0: skip, ``cosine`` is ``nan``). (default: 64)
        seed: seed of the guesses (``seed + 1`` for the single ones). (default: 0)
        **attach_kwargs: other options of :func:`~guess_optim.attach`, estimator options included (``rank=1``).

    Returns:
        A :class:`BiasVarianceReport`: ``per_layer`` (module name → :class:`BiasVarianceRow`) and ``total`` (all
        trainable parameters). Computed in float64. The noise of the bias shrinks as ``1/sqrt(guesses)``: compare
        ``bias`` with ``bias_noise``.

    Raises:
        ValueError: a bad count, an unknown method or the backprop oracle, a model in eval mode or with a handle
            attached, an invalid option (from :func:`~guess_optim.attach`).
    """
    from ._checks import check_int

    per_step = check_int("per_step", per_step, low=1)
    steps = max(2, -(-check_int("guesses", guesses, low=1) // per_step))
    single = check_int("single", single, low=0)
    estimator_cls = type(method) if isinstance(method, Estimator) else get_estimator(method)
    if estimator_cls.space == "backprop":
        raise ValueError(f"Invalid method: {estimator_cls.name!r}; bias_variance measures a guessing estimator "
                         "(backprop is the reference)")
    if handle_of(model) is not None:
        raise ValueError("bias_variance attaches its own estimator: remove the model's handle first (handle.remove())")
    if not model.training:
        raise ValueError("bias_variance needs the model in training mode (model.train()): in eval mode nothing is "
                         "guessed")
    rng = capture_rng(cuda_devices(model.parameters()))
    with replayed_rng(rng):
        reference = backprop_gradient(model, batch, loss_fn)
    layers = {**_layers(model), "(all)": list(reference)}
    flat_ref = {k: _flat(ps, reference) for k, ps in layers.items()}
    sums: dict[str, Tensor] = {}
    squares = dict.fromkeys(layers, 0.0)
    with attach(model, method, seed=seed, num_guesses=per_step, **attach_kwargs) as handle:
        name = _describe(handle.estimator)
        for _ in range(steps):
            with replayed_rng(rng):
                estimate = guessed_gradient(model, handle, batch, loss_fn)
            for k, ps in layers.items():
                v = _flat(ps, estimate)
                sums[k] = v if k not in sums else sums[k] + v
                squares[k] += float(v @ v)
    cosines: dict[str, list[float]] = {k: [] for k in layers}
    if single:
        with attach(model, method, seed=seed + 1, **attach_kwargs) as handle:
            for _ in range(single):
                with replayed_rng(rng):
                    estimate = guessed_gradient(model, handle, batch, loss_fn)
                for k, ps in layers.items():
                    cosines[k].append(_cos(_flat(ps, estimate), flat_ref[k]))
    rows = {}
    for k in layers:
        g, mean = flat_ref[k], sums[k] / steps
        var_mean = max((squares[k] - steps * float(mean @ mean)) / (steps - 1), 0.0)  # E|ĝ_K - E ĝ|², K = per_step
        variance = var_mean * per_step
        noise2 = var_mean / steps
        err2 = float((mean - g) @ (mean - g))
        gg = float(g @ g)
        rows[k] = BiasVarianceRow(
            norm=math.sqrt(gg), bias=math.sqrt(max(err2 - noise2, 0.0)), bias_noise=math.sqrt(noise2),
            variance=variance, cosine=sum(cosines[k]) / len(cosines[k]) if cosines[k] else math.nan,
            cosine_of_mean=_cos(mean, g), scale=float(mean @ g) / gg if gg > 0 else math.nan)
    total = rows.pop("(all)")
    return BiasVarianceReport(name, steps * per_step, single, total, rows)


def _flat(names: Sequence[str], grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([grads[n].detach().double().flatten() for n in names])


def _describe(estimator: Any) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in estimator.options().items()
                        if v != type(estimator).__dataclass_fields__[k].default)
    return f"{estimator.name}({options})" if options else estimator.name


def _loss(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn) -> Tensor:
    inputs, targets = batch
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return loss_fn(out, targets)
