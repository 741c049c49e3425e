"""``wt-precond``: the ``Wᵀ`` guess whitened by the upstream Jacobian's Gram matrix (Wang, Markou, Campbell 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .._checks import check_float, check_int
from ..guesses import isotropic_guess
from ..jacobian import EXACT_BUDGET, dense_rows
from ..spectral import exact_svd, filtered_guess, whitening_weights
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["WTPrecond"]


@register_estimator
@dataclass(frozen=True)
class WTPrecond(Estimator):
    """``u_b = (J_bᵀ J_b + σI)^(-1/2) J_bᵀ ε_b``, ``ε_b ~ N(0, I)``: the ``wt`` guess (``J_bᵀ ε``, ``J_b`` the masked
    upstream Jacobian ``W_{i+1} D_b``) whitened per example. Wang, Markou, Campbell, arXiv 2511.03110 (2025), and their
    code; ``research/follow-up-estimators.md`` §3.

    Computed from the thin SVD ``J_b = U S Vᵀ`` (``eigh`` of the smaller Gram matrix, float64): in distribution
    ``u_b = V diag(S / sqrt(S² + σ)) η_b``, ``η_b ~ N(0, I_r)`` (``Uᵀ ε`` is standard normal). The output layer gets
    an isotropic guess. Not rescaled (``E‖u‖² = Σ s²/(s² + σ) ≈ rank(J_b)``).

    Expectation: ``E[u uᵀ] = J_bᵀ J_b (J_bᵀ J_b + σI)⁻¹ = V diag(S²/(S² + σ)) Vᵀ``, the projector onto
    ``range(J_bᵀ)`` up to ``O(σ)``: **unbiased** up to ``‖(I - M) g_b‖ <= (sqrt(σ)/2) ‖g_{i+1,b}‖`` (``g_b = J_bᵀ
    g_{i+1,b}``; 1.6e-3 relative at ``σ = 1e-5``). It equals full-rank ``wt-perp`` in expectation; the paper reports it
    below ``W̃⊥`` with small ``k``: the bias is gone, the variance is back. With ``clip`` the eigenvalues
    ``s² + σ`` are floored at ``clip`` before the inverse square root (``M = V diag(S² / max(S² + σ, clip)) Vᵀ``):
    biased, directions with ``s² < clip`` shrink, like ``wt``'s squared spectrum but only there.

    Cost: the exact spectrum of every ``J_b`` (``O(m n min(m, n))`` per example); beyond ``exact_budget`` it raises
    :class:`~guess_optim.jacobian.JacobianTooLargeError` (a convolution's Jacobian is too large: use ``wt-perp``).

    Args:
        sigma: the ridge ``σ``. (default: 1e-5, the reference code's)
        clip: eigenvalue floor, or ``None``. (default: ``None``; the reference code's clipped variant uses 0.05)
        exact_budget: the largest exact cost ``B · m · n · min(m, n)`` allowed. (default:
            :data:`~guess_optim.jacobian.EXACT_BUDGET`)

    Raises:
        ValueError: ``sigma`` not a finite number > 0, ``clip`` not ``None`` or > 0, ``exact_budget`` < 1.
    """

    sigma: float = 1e-5
    clip: float | None = None
    exact_budget: int = EXACT_BUDGET

    name = "wt-precond"
    summary = "W^T whitened per example: (J^T J + sigma I)^(-1/2) J^T eps (2025; unbiased up to O(sigma))"
    label = r"Preconditioned $W^T$"
    color = "tab:olive"
    source = "Wang, Markou, Campbell 2025 (arXiv 2511.03110); research/follow-up-estimators.md §3"
    unbiased = True
    needs = "next"
    guess_matmuls = 512  # the exact spectrum of a 128 x 128 Jacobian: about 4 min(m, n) layer-sized products

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_float("sigma", self.sigma, low=0.0, strict=True))
        if self.clip is not None:
            object.__setattr__(self, "clip", check_float("clip", self.clip, low=0.0, strict=True))
        check_int("exact_budget", self.exact_budget, low=1)

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        J, repeat = dense_rows(site.next_jacobian(), site.num_guesses, self.exact_budget, self.name, site.name)
        s, V = exact_svd(J)
        u = filtered_guess(V, whitening_weights(s, self.sigma, self.clip), site.generator, repeat)
        return u.reshape(site.output.shape)
