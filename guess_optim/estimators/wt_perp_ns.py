"""``wt-perp-ns``: ``W̃⊥`` with a Newton–Schulz iteration instead of an SVD (Wang, Markou, Campbell 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._checks import check_float, check_int
from ..guesses import isotropic_guess
from ..jacobian import EXACT_BUDGET, dense_rows
from ..spectral import compress_columns, expand_rows, newton_schulz, ns_design
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["WTPerpNS", "rank_threshold"]


@register_estimator
@dataclass(frozen=True)
class WTPerpNS(Estimator):
    """``u_b = O_bᵀ ε_b``, ``ε_b ~ N(0, I)``, with ``O_b = P(J_b / σ̂_1) = U P(S/σ̂_1) Vᵀ`` computed by a Newton–Schulz
    iteration on the masked upstream Jacobian ``J_b = W_{i+1} D_b`` (matrix products only, no SVD): a soft rank filter
    that keeps singular values above ``threshold · σ_1`` near 1 and damps smaller ones towards 0. Wang, Markou,
    Campbell, arXiv 2511.03110 (2025); ``research/follow-up-estimators.md`` §2. Their coefficients are not public:
    these are our own (:class:`~guess_optim.spectral.NSDesign`: one cubing step, then quintic steps with ``p(1) = 1``,
    ``p'(1) = 0``, the gain set so that ``P(threshold)² = 1/2``). ``σ̂_1``: 20 power iterations on the Gram matrix.
    The output layer gets an isotropic guess. Not rescaled.

    Expectation: ``E[u uᵀ] = O_bᵀ O_b = V P(S/σ̂_1)² Vᵀ`` (:func:`~guess_optim.spectral.ns_polynomial`): biased like
    ``wt-perp`` with the rank the threshold picks, softly; ``u`` stays in ``range(J_bᵀ)``.

    The threshold plays the part of ``σ_k / σ_1``. That ratio moves a lot during training (MNIST-1D, 4 x 128 MLP,
    ``k = 10``: about 0.82 at initialization, 0.3 after 300 AdamW steps), so by default it is set per guess point and
    step from ``rank``: the median of ``sqrt(σ_k σ_{k+1}) / σ_1`` over the first 8 distinct examples
    (:func:`rank_threshold`; ``torch.linalg.svdvals`` of 8 matrices is the only SVD: pass a number to be SVD-free). A
    rank at or above ``min(m, n)`` gives the smallest threshold (0.02). The filter's transition (``P²`` from 0.1 to 0.9
    over ``[0.74, 1.16] · threshold``) is wider than the gap between neighbouring singular values of these layers, so
    ``M_b`` is a soft version of ``V_k V_kᵀ``.

    Measured against the SVD version (``guess-optim reproduce follow-up``, RESULTS.md "After the paper"): at
    ``rank=10`` its bias and variance per layer are close to ``wt-perp``'s (``rank=10``); on CPU it costs about twice
    the randomized ``wt-perp`` step.

    Cost: ``2 + 3 · steps`` batched products with the smaller ``min(m, n)``-sized Gram matrix per example (about 15
    for thresholds from 0.2 to 0.4), so ``J_b`` is materialized: beyond ``exact_budget`` it raises
    :class:`~guess_optim.jacobian.JacobianTooLargeError`.

    Args:
        rank: ``k`` whose ``σ_k / σ_1`` sets the threshold when ``threshold`` is ``None``. (default: 10)
        threshold: ``τ`` in ``(0, 1)`` (clamped to ``[0.02, 0.9]``), or ``None`` (from ``rank``). (default: ``None``)
        power_iters: power iterations for ``σ̂_1``. (default: 20)
        exact_budget: the largest cost ``B · m · n · min(m, n)`` allowed. (default:
            :data:`~guess_optim.jacobian.EXACT_BUDGET`)

    Raises:
        ValueError: an invalid option.
    """

    rank: int = 10
    threshold: float | None = None
    power_iters: int = 20
    exact_budget: int = EXACT_BUDGET

    name = "wt-perp-ns"
    summary = "W~perp with a Newton-Schulz soft rank filter instead of an SVD (2025; our coefficients)"
    label = r"$\tilde W_\perp$ (Newton–Schulz)"
    color = "tab:pink"
    source = "Wang, Markou, Campbell 2025 (arXiv 2511.03110); research/follow-up-estimators.md §2"
    needs = "next"
    guess_matmuls = 1920  # 15 Gram-sized products, each ~min(m, n) = 128 layer-sized ones

    def __post_init__(self) -> None:
        check_int("rank", self.rank, low=1)
        if self.threshold is not None:
            value = check_float("threshold", self.threshold, low=0.0, strict=True, high=1.0, high_strict=True)
            object.__setattr__(self, "threshold", value)
        check_int("power_iters", self.power_iters, low=1)
        check_int("exact_budget", self.exact_budget, low=1)

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        J, repeat = dense_rows(site.next_jacobian(), site.num_guesses, self.exact_budget, self.name, site.name)
        B, m, n = J.shape
        J, index = compress_columns(J)  # dead units: a smaller Gram matrix
        threshold = self.threshold if self.threshold is not None else rank_threshold(J, self.rank)
        O, _ = newton_schulz(J, ns_design(round(min(max(threshold, 0.02), 0.9), 2)), site.generator, self.power_iters)
        eps = torch.randn((B, m, repeat), generator=site.generator, dtype=J.dtype, device=J.device)
        u = expand_rows(O.mT @ eps, index, n)  # [B, n, repeat]: u = Oᵀ ε, one ε per row
        return u.permute(2, 0, 1).reshape(site.output.shape)


def rank_threshold(J: Tensor, rank: int, examples: int = 8) -> float:
    """The median of ``sqrt(σ_k σ_{k+1}) / σ_1`` (between the ``k``-th and the next singular value, so that the
    filter keeps ``σ_k`` and damps ``σ_{k+1}`` as far as their gap allows) over the first ``examples`` rows of ``J``
    (``[B, m, n]``) whose ``J_b`` is not zero; 0.02 (keep nearly all) when ``rank >= min(m, n)`` or every row is
    zero."""
    if rank >= min(J.shape[1:]):
        return 0.02
    s = torch.linalg.svdvals(J[:examples].double())
    alive = s[:, 0] > 0
    if not bool(alive.any()):
        return 0.02
    s = s[alive]
    return max(float(((s[:, rank - 1] * s[:, rank]).sqrt() / s[:, 0]).median()), 0.02)
