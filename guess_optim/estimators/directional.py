"""``directional``: weight perturbation (forward gradient; paper A.4 "directional descent")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..guesses import directional_guess, normalize_rows, random_cotangent
from .base import Estimator, register_estimator

__all__ = ["Directional"]


@register_estimator
@dataclass(frozen=True)
class Directional(Estimator):
    """Weight-space guess ``V ~ N(0, I)`` of each trainable parameter's shape, shared by the batch.

    Estimate: ``ĝ_θ = (Σ_b d_b) V_θ`` with ``d_b`` the JVP of example ``b``'s loss along all parameters' ``V`` at once.
    Each ``V`` is rescaled to norm ``sqrt(numel)``, which keeps it exactly unbiased: ``E[ĝ] = ∇L`` (Baydin et al. 2022,
    "Gradients without backpropagation"; paper A.4).
    """

    name = "directional"
    summary = "weight perturbation, V ~ N(0, I) (A.4)"
    label = "Directional"
    color = "tab:gray"
    source = "paper A.4; Baydin et al. 2022"
    space = "weight"
    unbiased = True

    def weight_guess(self, param: Tensor, generator: torch.Generator) -> Tensor:
        """``V ~ N(0, I)`` of ``param``'s shape, dtype and device, norm ``sqrt(param.numel())``."""
        return directional_guess(param, generator)

    def weight_guesses(self, param: Tensor, generator: torch.Generator, k: int) -> Tensor:
        """``k`` guesses drawn at once, ``[k, *param.shape]``, each of norm ``sqrt(param.numel())``."""
        v = random_cotangent(param.detach().new_empty((k, *param.shape)), generator)
        return normalize_rows(v, inplace=True)
