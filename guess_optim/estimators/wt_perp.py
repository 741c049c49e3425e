"""``wt-perp``: ``W̃⊥``, the rank-k orthogonalised upstream Jacobian (Wang, Markou, Campbell 2025)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .._checks import check_choice, check_int
from ..guesses import isotropic_guess
from ..jacobian import EXACT_BUDGET, dense_rows, exact_cost
from ..spectral import energy_rank, exact_svd, filtered_guess, randomized_svd, top_k_weights
from .base import Estimator, register_estimator

if TYPE_CHECKING:
    from ..site import Site

__all__ = ["SOLVERS", "WTPerp", "parse_rank"]

SOLVERS = ("auto", "exact", "randomized")
"""``"exact"``: ``eigh`` of each example's smaller Gram matrix (float64). ``"randomized"``: a range finder with
``rank + oversample`` columns and ``power_iters`` power iterations, from products with ``J`` and ``Jᵀ`` only.
``"auto"``: exact when ``min(m, n) <= 2 · (rank + oversample)`` (small layers, e.g. the layer before a 10-way head)
and within ``exact_budget``, randomized otherwise; a rank of ``None`` or ``"99%"`` always needs the exact spectrum."""

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*%\s*$")


def parse_rank(rank: int | str | None) -> int | float | None:
    """``rank`` as an int ``k >= 1``, ``None`` (full: the whole numerical range; ``"full"`` too) or an energy fraction
    in ``(0, 1]`` (from ``"99%"``).

    Raises:
        ValueError: anything else.
    """
    if rank is None or rank == "full":
        return None
    if isinstance(rank, str):
        match = _PERCENT.match(rank)
        if match and 0 < float(match.group(1)) <= 100:
            return float(match.group(1)) / 100
        raise ValueError(f"Invalid rank: {rank!r}; expected an int >= 1, None (or 'full'), or an energy such as '99%'")
    return check_int("rank", rank, low=1)


@register_estimator
@dataclass(frozen=True)
class WTPerp(Estimator):
    """``u_b = V_k η_b``, ``η_b ~ N(0, I_k)``: the top-``k`` right singular vectors ``V_k`` of the masked upstream
    Jacobian ``J_b = W_{i+1} D_b = U S Vᵀ`` (mask applied before the SVD), with every kept singular value set to 1
    (``u_b = V_k U_kᵀ ε_b`` in distribution). Wang, Markou, Campbell, "Towards Scalable Backpropagation-Free Gradient
    Estimation", arXiv 2511.03110 (2025); ``research/follow-up-estimators.md`` §1.

    ``J_b`` is the Jacobian of (chain, next modules) at the guess point (:meth:`Site.next_jacobian
    <guess_optim.site.Site.next_jacobian>`), so the method works wherever ``wt`` does: Linear and other next modules,
    residual and attention chains. The output layer gets an isotropic guess.

    Expectation: ``E[u uᵀ] = V_k V_kᵀ``, a projector: bias ``-(I - V_k V_kᵀ) g_b`` (only the tail directions of
    ``range(J_bᵀ)``, where ``g_b`` lies, are lost); **unbiased** when ``k >= rank(J_b)`` (``rank=None``).
    Second moment ``E‖(g·u) u‖² = (k + 2)‖V_kᵀ g‖²``: the noise dimension is ``k``, not ``n``.

    Scale: **not** rescaled to norm ``sqrt(n)`` (that would make ``E[u uᵀ] = (n/k) V_k V_kᵀ``, a scale bias):
    ``E‖u‖² = k`` (the reference code's scale). Singular values below ``max(m, n) · eps · σ_1`` count as zero, so an
    example whose layer is dead gets ``u = 0``.

    Solvers (:data:`SOLVERS`): the randomized one is approximate (``E[u uᵀ]`` is then the average of ``V̂_k V̂_kᵀ``
    over its sketches; accurate when ``σ_{k+oversample+1} / σ_k`` is small), the exact one costs ``O(m n min(m, n))``
    per example. ``num_guesses`` blocks with the same matrices are factorized once.

    Args:
        rank: ``k``: an int, ``None`` (or ``"full"``: the whole numerical range of ``J_bᵀ``, unbiased), or an energy
            rule ``"99%"``: the smallest ``k`` holding that fraction of the batch-mean spectrum's energy ``Σσ²`` (one
            ``k`` per guess point and step; the reference code's option). (default: 10, the reference code's constant)
        solver: ``"auto"``, ``"exact"`` or ``"randomized"`` (:data:`SOLVERS`). (default: ``"auto"``)
        oversample: extra sketch columns of the randomized solver. (default: 10)
        power_iters: power iterations of the randomized solver. (default: 2)
        exact_budget: the largest exact cost ``B · m · n · min(m, n)`` allowed; beyond it an exact spectrum raises
            :class:`~guess_optim.jacobian.JacobianTooLargeError` and ``"auto"`` picks the randomized solver.
            (default: :data:`~guess_optim.jacobian.EXACT_BUDGET`)

    Raises:
        ValueError: an invalid option, or ``rank=None``/an energy rule with ``solver="randomized"``.
    """

    rank: int | str | None = 10
    solver: str = "auto"
    oversample: int = 10
    power_iters: int = 2
    exact_budget: int = EXACT_BUDGET

    name = "wt-perp"
    summary = "W~perp: top-k right singular vectors of the masked upstream Jacobian, spectrum set to 1 (2025)"
    label = r"$\tilde W_\perp$"
    color = "tab:red"
    source = "Wang, Markou, Campbell 2025 (arXiv 2511.03110); research/follow-up-estimators.md §1"
    needs = "next"
    guess_matmuls = 120  # randomized solver at the defaults: (2 · power_iters + 2) products of 20 columns each

    def __post_init__(self) -> None:
        rank = parse_rank(self.rank)
        check_choice("solver", self.solver, SOLVERS)
        check_int("oversample", self.oversample, low=0)
        check_int("power_iters", self.power_iters, low=0)
        check_int("exact_budget", self.exact_budget, low=1)
        if not isinstance(rank, int) and self.solver == "randomized":
            raise ValueError(f"Invalid rank: {self.rank!r} with solver='randomized'; the full range or an energy rule "
                             "needs the exact spectrum: use solver='auto' or 'exact', or an integer rank")

    def guess(self, site: Site) -> Tensor:
        if not site.has_next:
            return isotropic_guess(site.output, site.generator)
        rank = parse_rank(self.rank)
        op = site.next_jacobian()
        N, m, n = op.shape
        distinct = op.distinct_rows(site.num_guesses)
        if isinstance(rank, int) and self._randomized(distinct.shape, rank):
            columns = min(rank + self.oversample, m, n)
            s, V = randomized_svd(distinct.matmul, distinct.rmatmul, distinct.shape, columns, self.power_iters,
                                  site.generator, dtype=op.dtype, device=op.device)
            repeat = N // distinct.shape[0]
        else:
            J, repeat = dense_rows(op, site.num_guesses, self.exact_budget, self.name, site.name)
            s, V = exact_svd(J)
            if isinstance(rank, float):
                rank = energy_rank(s, rank)
        u = filtered_guess(V, top_k_weights(s, rank), site.generator, repeat)
        return u.reshape(site.output.shape)

    def _randomized(self, shape: tuple[int, int, int], rank: int) -> bool:
        """The solver for ``B`` distinct ``m x n`` matrices (:data:`SOLVERS`)."""
        if self.solver != "auto":
            return self.solver == "randomized"
        _, m, n = shape
        return min(m, n) > 2 * (rank + self.oversample) or exact_cost(shape) > self.exact_budget
