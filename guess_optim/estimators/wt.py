"""``wt``: the ``Wᵀ`` guess, a random vector pulled back through the next layer (paper §2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import Tensor

from .._checks import check_float
from ..guesses import isotropic_guess, wt_guess
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["WT"]


@register_estimator
@dataclass(frozen=True)
class WT(Estimator):
    """``u_b = J_bᵀ W_{i+1}ᵀ ε_b``, ``ε ~ N(0, I)`` at the next module's output: the VJP of ``ε`` through the next
    module, masked by the activation's Jacobian ``J_b`` (paper §2.1, A.4). The gradient ``g_b = J_bᵀ W_{i+1}ᵀ
    g_{i+1,b}`` lies in the row space of ``W_{i+1} J_b``, and so does this guess.

    Expectation: biased, ``E[u uᵀ] = J_bᵀ W_{i+1}ᵀ W_{i+1} J_b`` (the squared spectrum). The output layer gets an
    isotropic guess.

    Args:
        power: research variant of paper §3 / Fig. 4: build the guess from ``U diag(S^p) Vᵀ`` of each next Linear's
            weight instead of the weight itself; ``p > 1`` lets a few singular directions dominate. Older name:
            ``wt_power=``. (default: 1.0, the plain method)

    Raises:
        ValueError: ``power`` not a finite number > 0.
    """

    power: float = 1.0

    name = "wt"
    summary = "W^T of the next layer times N(0, I), masked (§2.1)"
    label = "$W^T$"
    color = "tab:blue"
    source = "paper §2.1, A.4"
    needs = "next"
    guess_matmuls = 1
    aliases = MappingProxyType({"wt_power": "power"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "power", check_float("power (wt_power)", self.power, low=0.0, strict=True))

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        targets, pullback = site.next_outputs(self.power)
        return wt_guess(targets, pullback, site.generator)
