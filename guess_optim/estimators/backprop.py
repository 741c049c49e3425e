"""``backprop``: the exact gradient by plain autograd, the oracle every estimate is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Estimator, register_estimator

__all__ = ["Backprop"]


@register_estimator
@dataclass(frozen=True)
class Backprop(Estimator):
    """Plain backpropagation: :func:`~guess_optim.attach` installs nothing and ``loss.backward()`` is autograd's.

    Expectation: exact, ``ĝ = ∇L``. Costs one reverse pass through the network (paper §1).
    """

    name = "backprop"
    summary = "exact gradient by backpropagation (the oracle)"
    label = "Backprop (oracle)"
    color = "k"
    source = "reverse-mode automatic differentiation"
    space = "backprop"
    unbiased = True
