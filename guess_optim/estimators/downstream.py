"""``downstream``: a random vector pulled back from ``l`` modules downstream (paper §2.1 "partial backpropagation")."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import Tensor

from .._checks import check_choice, check_int
from ..guesses import downstream_guess, isotropic_guess
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["DISTRIBUTIONS", "Downstream"]

DISTRIBUTIONS = ("normal", "uniform", "symmetric-uniform")
"""Laws of the downstream ``ε``: ``N(0, 1)``, ``U[0, 1)`` (``torch.rand``) and ``U(-1, 1)``."""


@register_estimator
@dataclass(frozen=True)
class Downstream(Estimator):
    """The VJP of ``ε`` from the post-activations ``l`` modules downstream back to the guess point (for ``l = 1``:
    ``J_bᵀ W_{i+1}ᵀ (m_{i+1} ⊙ ε)``): a backward through ``l`` modules, by definition of the method (paper §2.1, A.4).

    Expectation: biased. The output layer gets an isotropic guess.

    Args:
        layers: ``l``, the depth of the downstream segment (paper Fig. 5). Older name: ``downstream_layers=``.
            (default: 1)
        distribution: law of ``ε``: ``"normal"``, ``"uniform"`` (``U[0, 1)``) or ``"symmetric-uniform"``
            (``U(-1, 1)``). (default: ``"normal"``)

    Raises:
        ValueError: ``layers`` not an int >= 1, or an unknown ``distribution``.
    """

    layers: int = 1
    distribution: str = "normal"

    name = "downstream"
    summary = "VJP of N(0, I) from l layers down (§2.1)"
    label = "1-layer downstream"
    color = "tab:orange"
    source = "paper §2.1, A.4"
    needs = "downstream"
    guess_matmuls = 2
    aliases = MappingProxyType({"downstream_layers": "layers"})

    def __post_init__(self) -> None:
        check_int("layers (downstream_layers)", self.layers, low=1)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        targets, pullback = site.downstream(self.layers)
        return downstream_guess(targets, pullback, site.generator, self.distribution)
