"""Per-example spectral filters of an upstream Jacobian: exact and randomized SVDs, Newton–Schulz, whitening.

Pure functions over batched tensors (no modules, no hooks). For every example ``b`` of a guess point, ``J_b`` is the
``m x n`` Jacobian of the next modules' outputs with respect to the guess point's output (:mod:`guess_optim.jacobian`;
for ReLU and a Linear next module ``J_b = W_{i+1} D_b``), with thin SVD ``J_b = U S Vᵀ``. The follow-up estimators
draw ``u_b = V diag(w(S)) η_b``, ``η_b ~ N(0, I)``, so that ``E[u uᵀ] = V w(S)² Vᵀ``
(``research/follow-up-estimators.md``; Wang, Markou, Campbell, arXiv 2511.03110):

* ``wt`` (for reference): ``w = S`` (the squared spectrum is its bias);
* ``wt-perp``: ``w = 1`` on the top ``k`` singular values, 0 elsewhere (:func:`top_k_weights`);
* ``wt-precond``: ``w = S / sqrt(max(S² + σ, clip))`` (:func:`whitening_weights`);
* ``wt-perp-ns``: ``w = p(S / σ̂_1)`` for the polynomial of a Newton–Schulz iteration (:func:`newton_schulz`), applied
  to ``J_b`` as a matrix function, without an SVD.

Shapes: ``J`` is ``[N, m, n]`` (one matrix per row of the guess point); singular values ``s`` are ``[N, r]``, sorted
descending, with ``0`` marking a direction outside the numerical range of ``J_bᵀ``; right singular vectors ``V`` are
``[N, n, r]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NSDesign",
    "compress_columns",
    "energy_rank",
    "expand_rows",
    "exact_svd",
    "filtered_guess",
    "newton_schulz",
    "ns_design",
    "ns_polynomial",
    "randomized_svd",
    "top_k_weights",
    "whitening_weights",
]

MatMul = Callable[[Tensor], Tensor]


def _rank_floor(s: Tensor, m: int, n: int, dtype: torch.dtype) -> Tensor:
    """Singular values at or below this (per row, ``[N, 1]``) are numerically zero: ``sqrt(max(m, n) · eps) · σ_1``
    for ``eps`` of the dtype the Gram matrix was formed in (its eigenvalues are accurate to
    ``~max(m, n) · eps · σ_1²``): ``1.7e-7 σ_1`` in float64, ``3.9e-3 σ_1`` in float32 for a 128-wide layer."""
    return s[:, :1] * math.sqrt(max(m, n) * torch.finfo(dtype).eps)


def compress_columns(J: Tensor, keep_below: float = 0.85) -> tuple[Tensor, Tensor | None]:
    """Drop the all-zero columns of every ``J_b`` (a ReLU's dead units: ``J_b = W D_b``), keeping the column order.

    Args:
        J: ``[N, m, n]``.
        keep_below: compress only when the widest row keeps fewer than this fraction of the ``n`` columns.

    Returns:
        ``(Jc, index)``: ``Jc`` ``[N, m, c]`` (``c`` the largest count of non-zero columns of a row; shorter rows are
        padded with zero columns) and ``index`` ``[N, c]``, the original column of each (``None`` and ``J`` itself when
        nothing is gained). :func:`expand_rows` undoes it on ``[N, c, r]`` tensors.
    """
    nonzero = (J != 0).any(1)
    c = int(nonzero.sum(1).max()) if J.shape[0] else 0
    if c >= keep_below * J.shape[2]:
        return J, None
    index = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :max(c, 1)]
    return torch.gather(J, 2, index[:, None, :].expand(-1, J.shape[1], -1)), index


def expand_rows(X: Tensor, index: Tensor | None, n: int) -> Tensor:
    """``[N, c, r] → [N, n, r]``: rows of ``X`` put back at the columns ``index`` of :func:`compress_columns` (zeros
    elsewhere); ``X`` itself for ``index=None``."""
    if index is None:
        return X
    out = X.new_zeros(X.shape[0], n, X.shape[2])
    return out.scatter_(1, index[:, :, None].expand(-1, -1, X.shape[2]), X)


def exact_svd(J: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values and right singular vectors of every ``J_b``, by ``eigh`` of the smaller Gram matrix.

    ``eigh`` of ``J Jᵀ`` (or ``Jᵀ J``) is about twice as fast as ``torch.linalg.svd`` on CPU (512 matrices of 128 x 128:
    0.9 s in float32, 1.6 s in float64, one core). The Gram matrix is formed in ``J``'s dtype (float32 for float32
    models, where it is 1.5x faster), at least float32; singular values below :func:`_rank_floor` count as zero.
    All-zero columns (dead ReLU units) are dropped first (:func:`compress_columns`): the Gram matrix shrinks to the live
    units.

    Args:
        J: ``[N, m, n]``.

    Returns:
        ``(s, V)``: ``s`` ``[N, r]`` descending (``r = min(m, c)``, ``c <= n`` the live columns; numerically zero
        values set to 0) and ``V``
        ``[N, n, r]`` (orthonormal columns where ``s > 0``; columns where ``s == 0`` are zero), in ``J``'s dtype.
    """
    m, n = J.shape[1:]
    Jc, index = compress_columns(J)
    s, V = _gram_svd(Jc if J.dtype in (torch.float32, torch.float64) else Jc.float(), max(m, n))
    return s.to(J.dtype), expand_rows(V, index, n).to(J.dtype)


def _gram_svd(Jd: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """:func:`exact_svd` of ``Jd`` (``[N, m, n]``, float32/64) without compression; ``size`` sets the rank floor."""
    _, m, n = Jd.shape
    if m <= n:
        lam, U = torch.linalg.eigh(Jd @ Jd.mT)
        s = lam.flip(-1).clamp_min(0).sqrt()
        keep = s > _rank_floor(s, size, size, Jd.dtype)
        V = (Jd.mT @ U.flip(-1)) / torch.where(keep, s, 1.0)[:, None, :]
    else:
        lam, V = torch.linalg.eigh(Jd.mT @ Jd)
        s, V = lam.flip(-1).clamp_min(0).sqrt(), V.flip(-1)
        keep = s > _rank_floor(s, size, size, Jd.dtype)
    return s * keep, V * keep[:, None, :]


def _orthonormal(Y: Tensor) -> Tensor:
    """An orthonormal basis ``Q`` (``[N, n, l]``) of the columns of ``Y`` (reduced QR)."""
    return torch.linalg.qr(Y).Q


def randomized_svd(matmul: MatMul, rmatmul: MatMul, shape: tuple[int, int, int], columns: int, power_iters: int,
                   generator: torch.Generator, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Top singular triplets of every ``J_b`` by a randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4).

    Only products with ``J`` and ``Jᵀ`` are used: ``Y = Jᵀ Ω`` with ``Ω ~ N(0, I)`` (``columns`` of them), ``q``
    power iterations ``Y ← Jᵀ J Q`` (re-orthonormalized), then ``B = J Q`` and the small SVD of ``B`` (``eigh`` of
    ``BᵀB``): ``V = Q W``. With ``columns >= rank(J_b)`` the result is exact up to rounding; otherwise the top ``k``
    directions are accurate when ``(σ_{columns+1} / σ_k)^(2q+1)`` is small.

    Args:
        matmul: ``V [N, n, l] ↦ J V [N, m, l]``.
        rmatmul: ``Y [N, m, l] ↦ Jᵀ Y [N, n, l]``.
        shape: ``(N, m, n)``.
        columns: ``l``, the sketch size (the wanted rank plus oversampling).
        power_iters: ``q``.
        generator: draws ``Ω``.
        dtype, device: of ``Ω``.

    Returns:
        ``(s, V)`` as :func:`exact_svd`, with ``r = columns``.
    """
    N, m, n = shape
    omega = torch.randn((N, m, columns), generator=generator, dtype=dtype, device=device)
    Y = rmatmul(omega)
    for _ in range(power_iters):
        Y = rmatmul(matmul(_orthonormal(Y)))
    Q = _orthonormal(Y)
    B = matmul(Q).double()
    lam, W = torch.linalg.eigh(B.mT @ B)
    s = lam.flip(-1).clamp_min(0).sqrt()
    # B carries the rounding of J's dtype: at least matrix_rank's tolerance, max(m, n) · eps · σ_1
    keep = s > torch.maximum(_rank_floor(s, m, n, torch.float64), s[:, :1] * max(m, n) * torch.finfo(dtype).eps)
    V = Q.double() @ W.flip(-1)
    return (s * keep).to(dtype), (V * keep[:, None, :]).to(dtype)


def top_k_weights(s: Tensor, k: int | None) -> Tensor:
    """``w = 1`` on the ``k`` largest non-zero singular values of each row (all of them for ``k=None``), else 0.

    Args:
        s: ``[N, r]``, descending.
        k: the rank, or ``None`` for the whole numerical range.

    Returns:
        ``[N, r]``, of ``s``'s dtype.
    """
    w = (s > 0).to(s.dtype)
    if k is not None and k < s.shape[1]:
        w[:, k:] = 0
    return w


def energy_rank(s: Tensor, fraction: float) -> int:
    """The smallest ``k`` whose top singular values hold ``fraction`` of the energy (``Σ σ²``) of the batch-mean
    spectrum (the reference code's rule), at least 1.

    Args:
        s: ``[N, r]``, descending.
        fraction: in ``(0, 1]``.
    """
    energy = s.double().pow(2).mean(0)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = energy.cumsum(0) / total
    return int((cumulative < fraction - 1e-12).sum()) + 1


def whitening_weights(s: Tensor, sigma: float, clip: float | None = None) -> Tensor:
    """``w = s / sqrt(max(s² + σ, clip))``: the spectrum of ``(JᵀJ + σI)^(-1/2) Jᵀ`` (eigenvalues floored at
    ``clip`` when given). ``w² = s² / (s² + σ)`` makes ``E[u uᵀ]`` the projector onto ``range(Jᵀ)`` up to ``O(σ)``.

    Args:
        s: ``[N, r]``.
        sigma: the ridge ``σ > 0``.
        clip: floor of the eigenvalues ``s² + σ`` before the inverse square root, or ``None``.
    """
    lam = s.pow(2) + sigma
    if clip is not None:
        lam = lam.clamp_min(clip)
    return s / lam.sqrt()


def filtered_guess(V: Tensor, w: Tensor, generator: torch.Generator, repeat: int = 1) -> Tensor:
    """``u_b = V_b diag(w_b) V_bᵀ ξ_b`` with ``ξ_b ~ N(0, I_n)``: ``E[u_b u_bᵀ] = V_b diag(w_b²) V_bᵀ``. No rescaling.

    Drawn in the ambient space (``V_bᵀ ξ_b ~ N(0, I_r)``), not as ``V_b diag(w_b) η_b``: the guess is then a function
    of the filter ``V diag(w) Vᵀ`` alone, which does not depend on the basis ``eigh`` picks inside a (near-)degenerate
    singular subspace. A basis that moved with roundoff-level changes of ``J`` (the ``store="recompute"`` replay
    computes it again) gave the replay another guess than the forward's: a wrong estimate.

    Args:
        V: ``[B, n, r]``; w: ``[B, r]``.
        generator: draws ``η``.
        repeat: the rows are ``repeat`` blocks of the same ``B`` matrices (``num_guesses``); each row draws its own
            ``η``. (default: 1)

    Returns:
        ``[repeat * B, n]``.
    """
    B, n, r = V.shape
    xi = torch.randn((repeat, B, n), generator=generator, dtype=V.dtype, device=V.device)
    # one [n, r] x [r, repeat] product per matrix (and its transpose): a broadcast V[None] @ ... would copy V repeat
    # times (8.6 GB for 512 matrices of 128 x 128 and num_guesses=256)
    eta = (V.mT @ xi.permute(1, 2, 0)).permute(2, 0, 1)  # [repeat, B, r]
    return (V @ (w[None] * eta).permute(1, 2, 0)).permute(2, 0, 1).reshape(repeat * B, n)


# ------------------------------------------------------------------------------------------------- Newton–Schulz
@dataclass(frozen=True)
class NSDesign:
    """A Newton–Schulz soft rank filter (our own coefficients; the paper's are not public).

    With ``X = J / σ̂_1`` (singular values ``x ∈ [0, ~1]``), one sharpening step ``X ← (XXᵀ) X`` (``x ↦ x³``), then
    ``steps`` quintic steps ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` with ``b = (5 - 4a)/2``, ``c = (2a - 3)/2`` (so ``p(1) = 1``
    and ``p'(1) = 0``: singular values near ``σ_1`` stay at 1). ``a`` is set by bisection so that the composite
    polynomial ``P`` passes ``P(threshold)² = 1/2``, with the fewest steps for which ``a <= 3`` and
    ``max P <= 1.1`` on ``[0, 1.03]``. Measured (numpy, on ``[0, 1]``): ``P² <= 0.01`` at ``x = threshold/2``, ``P²``
    from 0.1 to 0.9 across ``x ∈ [0.74, 1.16] · threshold``, ``P² ≈ 1`` above ``2 · threshold``: singular values above
    the threshold are kept near 1, smaller ones damped towards 0. E.g. threshold 0.3: 4 steps, ``a = 2.337``;
    0.1: 7 steps, ``a = 2.594``; 0.7: 1 step.

    Attributes:
        threshold: ``τ``, in units of ``σ_1``.
        coefficients: ``(a, b, c)`` of each quintic step.
    """

    threshold: float
    coefficients: tuple[tuple[float, float, float], ...]

    @property
    def matmuls(self) -> int:
        """Batched products of the smaller Gram's size per call: the Gram, the sharpening step, 3 per quintic step."""
        return 2 + 3 * len(self.coefficients)


def _quintic(a: float) -> tuple[float, float, float]:
    return a, (5 - 4 * a) / 2, (2 * a - 3) / 2


def ns_polynomial(x: Tensor | float, design: NSDesign) -> Tensor | float:
    """``P(x)``: the composite map of singular values (``x = σ / σ̂_1``) of :func:`newton_schulz`."""
    y = x ** 3
    for a, b, c in design.coefficients:
        y2 = y * y
        y = y * (a + y2 * (b + c * y2))
    return y


@functools.lru_cache(maxsize=256)
def ns_design(threshold: float) -> NSDesign:
    """The :class:`NSDesign` for ``threshold`` (``τ``, clamped to ``[0.02, 0.9]``), found by bisection (cached).

    Raises:
        ValueError: ``threshold`` not a finite number > 0.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"Invalid threshold: {threshold!r}; expected a finite number > 0")
    tau = min(max(float(threshold), 0.02), 0.9)
    grid = [i / 1000 for i in range(1031)]
    target = 0.5 ** 0.5
    for steps in range(1, 25):
        def composite(a: float, x: float, steps: int = steps) -> float:
            return ns_polynomial(x, NSDesign(tau, (_quintic(a),) * steps))

        lo, hi = 0.5, 3.0
        if composite(hi, tau) < target:
            continue
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if composite(mid, tau) < target else (lo, mid)
        if max(composite(hi, x) for x in grid) <= 1.1:
            return NSDesign(tau, (_quintic(hi),) * steps)
    raise ValueError(f"no Newton–Schulz design for threshold {threshold!r}")  # pragma: no cover


def _top_eigenvalue(G: Tensor, iters: int, generator: torch.Generator, block: int = 4) -> Tensor:
    """A lower bound of the top eigenvalue of every symmetric PSD ``G_b`` (``[N, r, r]``): the largest Ritz value after
    ``iters`` block power iterations from ``block`` random vectors (``[N]``)."""
    r = G.shape[-1]
    Q = torch.randn((G.shape[0], r, min(block, r)), generator=generator, dtype=G.dtype, device=G.device)
    for _ in range(iters):
        Q = _orthonormal(G @ Q)
    return torch.linalg.eigvalsh(Q.mT @ G @ Q)[:, -1].clamp_min(0)


def _ns_iterate(J: Tensor, G: Tensor, sigma: Tensor, design: NSDesign, left: bool) -> Tensor:
    """``P(J / σ)`` per row given the Gram matrix ``G`` of ``J`` on the ``left`` (``J Jᵀ``) or right side."""
    scale = torch.where(sigma > 0, 1 / sigma.clamp_min(torch.finfo(J.dtype).tiny), 0.0)
    X = J * scale[:, None, None]
    A = G * (scale * scale)[:, None, None]
    X = A @ X if left else X @ A  # sharpening: x ↦ x³
    eye = torch.eye(G.shape[-1], dtype=J.dtype, device=J.device)
    for a, b, c in design.coefficients:
        A = X @ X.mT if left else X.mT @ X
        poly = a * eye + A @ (b * eye + c * A)
        X = poly @ X if left else X @ poly
    return X


def newton_schulz(J: Tensor, design: NSDesign, generator: torch.Generator, power_iters: int = 20
                  ) -> tuple[Tensor, Tensor]:
    """``O_b = P(J_b / σ̂_1) = U P(S/σ̂_1) Vᵀ`` by matrix products only (no SVD), on the smaller Gram side.

    ``σ̂_1`` is 1.02 times the square root of the top Ritz value of ``power_iters`` block power iterations (4
    vectors) on the Gram matrix, so the scaled singular values stay below about 1, where the polynomial is designed.
    A row whose iteration still diverges (a Ritz value more than ~5% low: ``‖O_b‖_F² > 1.3 min(m, n)`` or not finite)
    is redone with ``σ̂_1 = ‖J_b‖_F``, an upper bound (its effective threshold is then lower).

    Args:
        J: ``[N, m, n]``.
        design: the filter (:func:`ns_design`).
        generator: draws the power iteration's start.
        power_iters: power iterations for ``σ̂_1``. (default: 20)

    Returns:
        ``(O, sigma_hat)``: ``O`` ``[N, m, n]`` (``E[Oᵀε (Oᵀε)ᵀ] = OᵀO = V P(S/σ̂_1)² Vᵀ`` for ``ε ~ N(0, I_m)``) and
        the ``σ̂_1`` used, ``[N]`` (margin included; 0 for a zero ``J_b``, whose ``O_b`` is 0).
    """
    left = J.shape[1] <= J.shape[2]  # multiply by the m x m Gram on the left, or the n x n one on the right
    G = J @ J.mT if left else J.mT @ J
    sigma = _top_eigenvalue(G, power_iters, generator).sqrt() * 1.02
    O = _ns_iterate(J, G, sigma, design, left)
    bad = ~torch.isfinite(O).all(2).all(1) | (O.pow(2).sum((1, 2)) > 1.3 * min(J.shape[1:]))
    if bool(bad.any()):
        sigma = sigma.clone()
        sigma[bad] = torch.linalg.matrix_norm(J[bad])
        O[bad] = _ns_iterate(J[bad], G[bad], sigma[bad], design, left)
    return O, sigma
