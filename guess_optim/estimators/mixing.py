"""``mixing``: random mixtures of the batch's post-activations, pulled back (paper §2.2 "activation mixing")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..graph import GraphError
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
        n = site.output.shape[0]
        moved = next((t for t in targets if t.dim() == 0 or t.shape[0] % n), None)
        if moved is not None:
            raise GraphError(
                f"mixing at {site.name!r}: the post-activation feeding a next module has shape {tuple(moved.shape)}, "
                f"whose dim 0 is not the batch's {n} rows (an op between moved it, e.g. h.t() or a sequence-first "
                "transpose, as inside nn.MultiheadAttention): mixing combines the examples' post-activations row by "
                "row. Use method='wt' or "
                "'activation' for this model, or keep the batch on dim 0 up to the next module."
            )
        return mixing_guess(targets, pullback, site.generator, site.num_guesses)
