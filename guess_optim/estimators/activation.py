"""``activation``: activation (pre-activation) perturbation, the unbiased activation-space guess (paper A.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..guesses import isotropic_guess
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["Activation"]


@register_estimator
@dataclass(frozen=True)
class Activation(Estimator):
    """``u_b ~ N(0, I)`` at every guess point's output (the paper's pre-activation ``s_i``), rescaled to norm
    ``sqrt(n)`` per example.

    Estimate of module ``i``'s parameters: the local VJP of ``d_b u_{i,b}`` through that module (for a Linear,
    ``Σ_b d_b u_{i,b} x_{i,b}ᵀ``). Expectation: ``E[(g·u) u] = g``, unbiased (paper A.4; Ren et al. 2023).
    """

    name = "activation"
    summary = "pre-activation perturbation, N(0, I) (A.4)"
    label = "Activation perturbation"
    color = "tab:brown"
    source = "paper A.4"
    unbiased = True
    regenerable = True

    def guess(self, site: Site) -> Tensor:
        return isotropic_guess(site.output, site.generator)
