"""``self-sharpening``: ``downstream`` with uniform guesses and the exact head gradient (paper §3, A.4)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register_estimator
from .downstream import Downstream

__all__ = ["SelfSharpening"]


@register_estimator
@dataclass(frozen=True)
class SelfSharpening(Downstream):
    """A preset of :class:`~guess_optim.estimators.downstream.Downstream`: ``ε ~ U[0, 1)`` and the output layer's
    exact (local) gradient always (paper §3 "self-sharpening", A.4). The paper's "random uniform guessing" is
    ambiguous: ``distribution="symmetric-uniform"`` gives ``U(-1, 1)``.

    Expectation: biased; the paper observes the guesses' effective rank collapsing during training.

    Args:
        layers: as :class:`Downstream`. (default: 1)
        distribution: as :class:`Downstream`. (default: ``"uniform"``)
    """

    distribution: str = "uniform"

    name = "self-sharpening"
    summary = "downstream with uniform guesses and the exact head gradient (§3, A.4)"
    label = "Self-sharpening"
    color = "tab:purple"
    source = "paper §3, A.4"
    exact_head = True
