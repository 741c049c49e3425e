"""``mixing``: random mixtures of the batch's post-activations, pulled back (paper §2.2 "activation mixing")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..guesses import isotropic_guess, mixing_guess
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["Mixing"]


@register_estimator
@dataclass(frozen=True)
class Mixing(Estimator):
    """``u_b = J_bᵀ Σ_{b'} α_{bb'} x_{i+1,b'}``, ``α ~ N(0, 1)``: the gradient of a Linear's weight lies in the span of
    the batch's inputs to it, so guess in that span (paper §2.2, A.4). ``J_b`` is the Jacobian of the parameter-free
    ops between the guess point and the next module (for ReLU, the activation mask).

    Expectation: biased, ``E[u uᵀ] ∝ Jᵀ Cov(x_{i+1}) J``. The output layer (no next module) gets an isotropic guess.
    """

    name = "mixing"
    summary = "random mixtures of the batch's activations (§2.2)"
    label = "Mixing"
    color = "tab:green"
    source = "paper §2.2, A.4"
    needs = "post"

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        targets, pullback = site.post_activations()
        return mixing_guess(targets, pullback, site.generator, site.num_guesses)
