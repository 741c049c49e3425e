"""``guess_optim.check``: is my model safe to train with guesses? The gradcheck of guessed gradients.

``torch.autograd.gradcheck`` compares autograd with finite differences; :func:`check` compares the average of many
guesses of an unbiased estimator with backprop's gradient, on the user's own model and batch, parameter by
parameter. An unbiased estimator averages to the gradient (paper A.4), so every deviation beyond the sampling noise
is a pattern the engine got wrong: a parameter without an estimate, a guess whose tangent never reaches the output,
a bias.

The noise is measured, not assumed: the ``num_guesses`` guesses are taken in ``steps`` forwards of
``guesses_per_step`` guesses each, and the spread of the per-step estimates gives the standard error of their mean.
A parameter *agrees* when its averaged estimate is within a few standard errors of backprop's gradient (the error
over the expected noise, ``z``, is the mean squared error of the average divided by its estimated variance; about 1
when unbiased).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int
from ._rng import capture_rng, cuda_devices, replayed_rng
from .attach import attach, handle_of
from .diagnostics import backprop_gradient
from .estimators import get_estimator

__all__ = ["CheckReport", "ParameterCheck", "check"]

Z_LIMIT = 9.0
"""A parameter is flagged when the squared error of its averaged estimate exceeds ``Z_LIMIT`` times the estimated
variance of that average (a 3-standard-error test on the error's norm)."""


@dataclass
class ParameterCheck:
    """One trainable parameter: backprop's gradient against the average of the guesses.

    Attributes:
        name: qualified name. ``numel``: its size.
        cosine: of the averaged estimate to backprop's gradient (``nan`` without one of the two).
        ratio: projection ratio ``<ĝ, g> / |g|²`` (1 when the scale is right).
        z: squared error of the average over its estimated variance (about 1 when unbiased; ``nan`` when undefined).
        status: ``"ok"``, ``"biased"`` (outside the noise), ``"no estimate"`` (the loss depends on it but it got no
            estimate), ``"tangent lost"`` (its estimate averages to zero: its guesses never reach the output),
            ``"unused"`` (no gradient and no estimate). ``"tangent lost"`` means the average is within the noise of zero
            while backprop's gradient is not.
    """

    name: str
    numel: int
    cosine: float
    ratio: float
    z: float
    status: str


@dataclass
class CheckReport:
    """What :func:`check` found.

    Attributes:
        method: the estimator checked. ``guesses``: guesses averaged.
        parameters: one :class:`ParameterCheck` per trainable parameter.
        safe: every parameter agrees with backprop within the noise.
        verdict: one line saying so, or what is wrong and the fix.
    """

    method: str
    guesses: int
    parameters: list[ParameterCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[ParameterCheck]:
        return [p for p in self.parameters if p.status not in ("ok", "unused")]

    @property
    def safe(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if self.safe:
            return (f"safe: the average of {self.guesses} {self.method} guesses agrees with backprop's gradient for "
                    f"every trainable parameter ({len(self.parameters)})")
        kinds = {}
        for p in self.problems:
            kinds.setdefault(p.status, []).append(p.name)
        parts = [f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in kinds.items()]
        return ("NOT safe: " + "; ".join(parts) + ". Guessed gradients would be wrong for these parameters: freeze "
                "them, change the op named by the engine, or train them with backprop (see the README, 'Is my model "
                "safe to train with guesses?').")

    def __str__(self) -> str:
        width = max([len(p.name) for p in self.parameters] + [9])
        lines = [f"guess_optim.check: {self.method}, {self.guesses} guesses averaged",
                 f"{'parameter':<{width}} {'numel':>8} {'cosine':>8} {'ratio':>8} {'z':>8}  status"]
        for p in self.parameters:
            lines.append(f"{p.name:<{width}} {p.numel:>8} {p.cosine:>8.4f} {p.ratio:>8.4f} {p.z:>8.2f}  {p.status}")
        lines.append(self.verdict)
        return "\n".join(lines)


def check(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    method: str = "activation",
    *,
    num_guesses: int = 4096,
    guesses_per_step: int = 256,
    seed: int = 0,
    verbose: bool = False,
    **attach_kwargs: Any,
) -> CheckReport:
    """Average ``num_guesses`` guesses of an unbiased estimator on ``batch`` and compare with backprop, per parameter.

    Example::

        report = guess_optim.check(model.train(), (x, y), F.cross_entropy)
        print(report)          # one row per parameter, then the verdict
        assert report.safe

    Args:
        model: the model, in training mode (the mode it will be trained in; dropout is replayed between backprop and
            the guesses only within one forward, so prefer a model without dropout or with dropout off for the check).
            It must have no :class:`~guess_optim.GuessHandle` attached.
        batch: ``(inputs, targets)``; ``inputs`` is passed to the model as is (a tensor, or a tuple of positional
            arguments).
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        method: an unbiased estimator of :data:`~guess_optim.METHODS` (``"activation"``, ``"directional"``, or one you
            registered with ``unbiased = True``). (default: ``"activation"``)
        num_guesses: guesses averaged in all. More make the check sharper (its noise falls as ``1/sqrt(N)``).
            (default: 4096)
        guesses_per_step: guesses per forward (``num_guesses=`` of :func:`~guess_optim.attach`, riding the batch);
            at least 2 steps are taken to measure the noise. (default: 256)
        seed: seed of the guesses. (default: 0)
        verbose: print the report. (default: ``False``)
        **attach_kwargs: other options of :func:`~guess_optim.attach` (``head=``, ``store=``, estimator options).

    Returns:
        A :class:`CheckReport`; ``p.grad`` of the model is left as it was.

    Raises:
        ValueError: a biased method, a model in eval mode, a bad count, or a model with a handle attached.
    """
    cls = get_estimator(method)
    if not cls.unbiased or cls.space == "backprop":
        raise ValueError(
            f"check compares the average of an unbiased estimator with backprop; {method!r} is "
            f"{'backprop itself' if cls.space == 'backprop' else 'biased'}: use 'activation' or 'directional'"
        )
    num_guesses = check_int("num_guesses", num_guesses, low=2)
    per_step = min(check_int("guesses_per_step", guesses_per_step, low=1), max(1, num_guesses // 2))
    if not model.training:
        raise ValueError("check needs the model in training mode (model.train()): in eval mode nothing is guessed")
    if handle_of(model) is not None:
        raise ValueError("check attaches its own estimator: remove the model's handle first (handle.remove())")
    steps = math.ceil(num_guesses / per_step)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = {n: p.grad for n, p in model.named_parameters()}
    rng = capture_rng(cuda_devices(model.parameters()))
    try:
        with replayed_rng(rng):
            reference = backprop_gradient(model, batch, loss_fn, missing_as_none=True)
        sums, squares, seen = _average(model, named, batch, loss_fn, method, steps, per_step, seed, rng,
                                       attach_kwargs)
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
    report = CheckReport(method, steps * per_step)
    for n, p in named:
        report.parameters.append(_compare(n, p, reference[n], sums.get(n), squares.get(n, 0.0), seen.get(n, 0),
                                          steps))
    if verbose:
        print(report)
    return report


def _average(model, named, batch, loss_fn, method, steps, per_step, seed, rng, attach_kwargs):
    """Per parameter: the sum of the per-step estimates, the sum of their squared norms, and in how many steps it got
    one."""
    from .diagnostics import _loss

    sums: dict[str, Tensor] = {}
    squares: dict[str, float] = {}
    seen: dict[str, int] = {}
    with attach(model, method, seed=seed, num_guesses=per_step, **attach_kwargs) as handle:
        for _ in range(steps):
            for _, p in named:
                p.grad = None
            with replayed_rng(rng), torch.enable_grad():  # the dropout masks of the reference
                _loss(model, batch, loss_fn).backward()
            if handle.last_step_skipped:
                raise FloatingPointError("a guessed step was not finite: check the model and loss for overflow")
            for n, p in named:
                if p.grad is not None:
                    g = p.grad.detach().double()
                    sums[n] = g.clone() if n not in sums else sums[n] + g
                    squares[n] = squares.get(n, 0.0) + float(g.pow(2).sum())
                    seen[n] = seen.get(n, 0) + 1
    return sums, squares, seen


def _compare(name: str, p: Tensor, g: Tensor | None, total: Tensor | None, square: float, seen: int,
             steps: int) -> ParameterCheck:
    nan = float("nan")
    has_gradient = g is not None and bool(torch.count_nonzero(g))
    if total is None or seen == 0:
        return ParameterCheck(name, p.numel(), nan, nan, nan, "no estimate" if has_gradient else "unused")
    mean = total / steps  # steps without an estimate count as zeros, as they would in training
    g = torch.zeros_like(mean) if g is None else g.detach().double()
    # variance of the mean, summed over elements: (Σ|e_s|² - S|m|²) / (S (S - 1))
    variance = max((square - steps * float(mean.pow(2).sum())) / (steps * (steps - 1)), 1e-300)
    z = float((mean - g).pow(2).sum()) / variance
    gn, mn = float(g.norm()), float(mean.norm())
    cosine = float(mean.flatten() @ g.flatten()) / (gn * mn) if gn > 0 and mn > 0 else nan
    ratio = float(mean.flatten() @ g.flatten()) / gn ** 2 if gn > 0 else nan
    if not has_gradient:
        status = "ok" if z <= Z_LIMIT else "biased"
    elif z <= Z_LIMIT:
        status = "ok"
    elif mn ** 2 / variance <= Z_LIMIT and abs(ratio) < 0.5:  # the average is indistinguishable from zero (and
        # points nowhere near the gradient: a sign-flipped or scaled estimate is biased, not lost): only noise
        status = "tangent lost"
    else:
        status = "biased"
    return ParameterCheck(name, p.numel(), cosine, ratio, z, status)
