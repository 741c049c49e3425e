"""Per-example upstream Jacobians ``J_b`` of a guess point, as batched linear operators.

``J_b`` (``m x n`` per example ``b``) is the Jacobian of the next modules' outputs ``s_{i+1}`` with respect to the
guess point's output ``s_i``, through the parameter-free ops in between (the graph's chains) and the next module:
for ReLU and a Linear next module, ``J_b = W_{i+1} D_b``. The ``wt`` guess is ``J_bᵀ ε``; the follow-up estimators
(:mod:`guess_optim.spectral`) need its singular vectors, so they need products with ``J`` and ``Jᵀ`` for many vectors
at once, and sometimes ``J`` itself. :meth:`guess_optim.site.Site.next_jacobian` builds the operator:

* :class:`LinearJacobian` when every next module is an ``nn.Linear`` and every chain is element-wise (ReLU, GELU,
  tanh, dropout, a flatten that keeps the order): ``J_b = [W_j diag(d_{j,b})]_j``, stacked over the next modules ``j``
  (and block-diagonal over tokens when the Linear acts on ``[..., L, d]``). ``d = J_chainᵀ 1`` is one
  vector-Jacobian product; the chain is taken as element-wise after a probe (``J_chainᵀ ρ == d ⊙ ρ`` for a fixed,
  non-symmetric ``ρ``).
* :class:`AutogradJacobian` otherwise (convolutions, LayerNorm, residual adds, attention): ``Jᵀ Y`` by
  ``torch.autograd.grad`` through the replayed chain, batched over the columns of ``Y`` (``is_grads_batched``), and
  ``J V`` by double backward (``J V = ∂/∂e <Jᵀ e, V>``): forward-mode ``jvp`` cannot nest inside the engine's
  dual level.

Shapes: vectors of the guess point's space are flattened per row, ``[N, n, l]`` for ``l`` of them (``n`` = the
output's size per row, in its row-major order); of the next outputs' space, ``[N, m, l]`` (the next modules' outputs
flattened and concatenated in edge order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contexts import own_autograd
from .errors import GuessingNotSupportedError
from .graph import GraphError

__all__ = [
    "EXACT_BUDGET",
    "AutogradJacobian",
    "DenseJacobian",
    "JacobianTooLargeError",
    "LinearJacobian",
    "UpstreamJacobian",
    "dense_rows",
    "exact_cost",
    "upstream_jacobian",
]

EXACT_BUDGET = 2**33
"""Default largest cost ``B · m · n · min(m, n)`` (multiply-adds; ``B`` distinct rows) of an exact per-example
spectrum: about 10 s on one CPU core. The MNIST-1D MLP (512 x 128 x 128 x 128) costs 2^30; a 6 x 1024 MLP at batch 128
costs 2^37."""


class JacobianTooLargeError(GuessingNotSupportedError):
    """An estimator needs the exact spectrum of ``J_b`` and materializing it would cost more than its budget."""


def exact_cost(shape: tuple[int, int, int]) -> int:
    """``N · m · n · min(m, n)``: the order of the multiply-adds of an exact spectrum of ``N`` ``m x n`` matrices."""
    N, m, n = shape
    return N * m * n * min(m, n)


class UpstreamJacobian:
    """``J_b`` for every row ``b``: ``shape = (N, m, n)``; :meth:`matmul` (``J V``), :meth:`rmatmul` (``Jᵀ Y``),
    :meth:`dense` (``[N, m, n]``) and :meth:`distinct_rows`."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device

    def matmul(self, V: Tensor) -> Tensor:
        """``J_b V_b`` for every row: ``[N, n, l] → [N, m, l]``."""
        raise NotImplementedError

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``J_bᵀ Y_b`` for every row: ``[N, m, l] → [N, n, l]``."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """``J`` materialized, ``[N, m, n]`` (from ``min(m, n)`` products with identity columns)."""
        N, m, n = self.shape
        if m <= n:
            eye = torch.eye(m, dtype=self.dtype, device=self.device).expand(N, m, m)
            return self.rmatmul(eye).mT
        return self.matmul(torch.eye(n, dtype=self.dtype, device=self.device).expand(N, n, n))

    def distinct_rows(self, blocks: int) -> UpstreamJacobian:
        """The operator of the first ``N / blocks`` rows when the ``blocks`` blocks of rows (``num_guesses``) hold the
        same matrices, else ``self``. Only :class:`LinearJacobian` and :class:`DenseJacobian` can tell cheaply."""
        return self


class DenseJacobian(UpstreamJacobian):
    """A materialized ``J`` (``[N, m, n]``)."""

    def __init__(self, J: Tensor):
        self.J = J
        self.shape = tuple(J.shape)
        self.dtype, self.device = J.dtype, J.device

    def matmul(self, V: Tensor) -> Tensor:
        return self.J @ V

    def rmatmul(self, Y: Tensor) -> Tensor:
        return self.J.mT @ Y

    def dense(self) -> Tensor:
        return self.J

    def distinct_rows(self, blocks: int) -> UpstreamJacobian:
        first = _first_block(self.J, blocks)
        return self if first is None else DenseJacobian(first)


def _first_block(t: Tensor, blocks: int) -> Tensor | None:
    """``t[:N/blocks]`` when ``t`` is that block repeated ``blocks`` times along dim 0, else ``None``."""
    if blocks <= 1 or t.shape[0] % blocks:
        return None
    first = t[: t.shape[0] // blocks]
    return first if torch.equal(t, first.repeat(blocks, *([1] * (t.dim() - 1)))) else None


class LinearJacobian(UpstreamJacobian):
    """``J_b = [W_j diag(d_{j,b})]_j`` for Linear next modules after element-wise chains.

    Args:
        n: size of the guess point's output per row.
        blocks: per next module ``j``, ``(d_j, W_j)``: ``d_j`` ``[N, *X_j]`` the chain's derivative in the layout of
            the Linear's input (``prod(X_j) == n``; the last dim is the Linear's ``in_features``) and ``W_j``
            ``[out_j, in_j]``.
    """

    def __init__(self, n: int, blocks: list[tuple[Tensor, Tensor]]):
        self.blocks = blocks
        d0 = blocks[0][0]
        self.dtype, self.device = d0.dtype, d0.device
        self.shape = (d0.shape[0], sum(d[0].numel() // d.shape[-1] * w.shape[0] for d, w in blocks), n)

    def matmul(self, V: Tensor) -> Tensor:
        N, l = V.shape[0], V.shape[-1]
        out = []
        for d, w in self.blocks:
            x = (d.reshape(N, -1, 1) * V).reshape(N, -1, d.shape[-1], l)  # [N, L, in, l]
            out.append((x.mT @ w.mT).mT.reshape(N, -1, l))  # one [N·L·l, in] x [in, out] product, not N small ones
        return torch.cat(out, 1)

    def rmatmul(self, Y: Tensor) -> Tensor:
        N, l = Y.shape[0], Y.shape[-1]
        total, start = None, 0
        for d, w in self.blocks:
            size = d[0].numel() // d.shape[-1] * w.shape[0]
            y = Y[:, start:start + size].reshape(N, -1, w.shape[0], l)  # [N, L, out, l]
            start += size
            x = (y.mT @ w).mT.reshape(N, -1, l) * d.reshape(N, -1, 1)  # one large product (as in matmul)
            total = x if total is None else total + x
        return total

    def dense(self) -> Tensor:
        if all(d.dim() == 2 for d, _ in self.blocks):  # one token: W_j diag(d_j), stacked
            return torch.cat([w[None] * d[:, None, :] for d, w in self.blocks], 1)
        return super().dense()

    def distinct_rows(self, blocks: int) -> UpstreamJacobian:
        firsts = [_first_block(d, blocks) for d, _ in self.blocks]
        if any(f is None for f in firsts):
            return self
        return LinearJacobian(self.shape[2], [(f, w) for f, (_, w) in zip(firsts, self.blocks, strict=True)])


class AutogradJacobian(UpstreamJacobian):
    """``J`` through autograd: ``Jᵀ Y`` by a batched vector-Jacobian product, ``J V`` by double backward.

    Args:
        leaf: the guess point's output (``[N, *S]``, requiring grad) the outputs were replayed from.
        outputs: per next module, the tensor replayed from ``leaf`` (the chain's output for a Linear next module,
            else the next module's output).
        lifts: per next module, ``None`` or the Linear's weight ``W`` (the target is then ``outputs[j] @ Wᵀ``).
    """

    def __init__(self, leaf: Tensor, outputs: list[Tensor], lifts: list[Tensor | None]):
        self.leaf = leaf
        self.dtype, self.device = leaf.dtype, leaf.device
        self.distinct: list[Tensor] = []
        self.index: list[int] = []
        for o in outputs:
            ids = [id(t) for t in self.distinct]
            if id(o) not in ids:
                self.distinct.append(o)
                ids.append(id(o))
            self.index.append(ids.index(id(o)))
        self.lifts = lifts
        self.target_shapes = [tuple(o.shape[1:-1]) + ((w.shape[0],) if w is not None else tuple(o.shape[-1:]))
                              for o, w in zip(outputs, lifts, strict=True)]
        N = leaf.shape[0]
        self.shape = (N, sum(math.prod(t) for t in self.target_shapes), leaf[0].numel())
        self._e: list[Tensor] | None = None
        self._h: Tensor | None = None
        self._batched = True

    def _grad(self, outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor | None]:
        """``torch.autograd.grad`` with cotangents batched on a leading dim of size ``l``; a loop over ``l`` where an op
        has no batching rule."""
        with own_autograd():
            if self._batched:
                try:
                    return list(torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True,
                                                    allow_unused=True, is_grads_batched=True))
                except RuntimeError:
                    self._batched = False
            cols = [torch.autograd.grad(outputs, inputs, [c[i] for c in cotangents], retain_graph=True,
                                        allow_unused=True) for i in range(cotangents[0].shape[0])]
        return [None if col[0] is None else torch.stack(col) for col in zip(*cols, strict=True)]

    def rmatmul(self, Y: Tensor) -> Tensor:
        N, m, l = Y.shape
        summed: list[Tensor | None] = [None] * len(self.distinct)
        start = 0
        for j, (shape, w) in enumerate(zip(self.target_shapes, self.lifts, strict=True)):
            size = math.prod(shape)
            c = Y[:, start:start + size].movedim(-1, 0).reshape(l, N, *shape).to(self.dtype)
            start += size
            c = c if w is None else c @ w
            i = self.index[j]
            summed[i] = c if summed[i] is None else summed[i] + c
        (g,) = self._grad(self.distinct, [self.leaf], summed)
        if g is None:
            return Y.new_zeros(N, self.shape[2], l)
        return g.reshape(l, N, -1).movedim(0, -1)

    def matmul(self, V: Tensor) -> Tensor:
        N, n, l = V.shape
        if self._e is None:
            with own_autograd():
                self._e = [torch.zeros_like(o, requires_grad=True) for o in self.distinct]
                (h,) = torch.autograd.grad(self.distinct, [self.leaf], self._e, create_graph=True, retain_graph=True,
                                           allow_unused=True)
            self._h = h
        if self._h is None or not self._h.requires_grad:
            return V.new_zeros(N, self.shape[1], l)
        v = V.movedim(-1, 0).reshape(l, *self.leaf.shape).to(self.dtype)
        xs = self._grad([self._h], self._e, [v])
        out = []
        for j, (shape, w) in enumerate(zip(self.target_shapes, self.lifts, strict=True)):
            x = xs[self.index[j]]
            if x is None:
                x = v.new_zeros(l, N, *shape)
            elif w is not None:
                x = x @ w.mT
            out.append(x.reshape(l, N, -1))
        return torch.cat(out, -1).movedim(0, -1)


def _probe(like: Tensor) -> Tensor:
    """A fixed, non-symmetric pattern of ``like``'s shape (``frac(k φ) - 1/2``): no permutation or reflection of it
    equals it, so ``J_chainᵀ ρ == (J_chainᵀ 1) ⊙ ρ`` only when ``J_chain`` is diagonal (almost surely)."""
    k = torch.arange(1, like.numel() + 1, dtype=torch.float64, device=like.device)
    return (torch.frac(k * 0.6180339887498949) - 0.5).reshape(like.shape).to(like.dtype)


def _elementwise_derivative(leaf: Tensor, x: Tensor) -> Tensor | None:
    """``d`` with ``J_chain = diag(d)`` (in ``x``'s layout) if the chain ``leaf → x`` is element-wise, else ``None``."""
    if x.numel() != leaf.numel() or x.shape[0] != leaf.shape[0]:
        return None
    if not x.requires_grad:
        return torch.zeros_like(x)
    with own_autograd():
        d, r = (torch.autograd.grad(x, leaf, c, retain_graph=True, allow_unused=True)[0]
                for c in (torch.ones_like(x), _probe(x)))
    if d is None:
        return torch.zeros_like(x)
    rho = _probe(x).reshape(leaf.shape)
    tol = 8 * torch.finfo(x.dtype).eps * float(d.abs().max().clamp_min(1.0))
    if not torch.allclose(r, d * rho, rtol=0.0, atol=tol):
        return None
    return d.reshape(x.shape)


def upstream_jacobian(leaf: Tensor, outputs: list[Tensor], lifts: list[Tensor | None]) -> UpstreamJacobian:
    """The operator of ``J_b`` for replayed ``outputs`` (see :class:`AutogradJacobian` for the arguments):
    :class:`LinearJacobian` when every next module is a Linear behind an element-wise chain, else
    :class:`AutogradJacobian`. An output whose rows are folded into dim 0 (``x.view(-1, D)`` of ``[N, L, D]``, as
    transformers' ``Conv1D`` does) is seen as ``[N, L, D]``.

    Raises:
        GraphError: an output whose dim 0 does not hold the ``N`` rows (nor ``N`` folded blocks of rows).
    """
    n, seen = leaf.shape[0], {}
    for x in outputs:
        if id(x) in seen:
            continue
        if x.dim() >= 2 and x.shape[0] != n and x.shape[0] % n == 0:
            seen[id(x)] = x.reshape(n, -1, x.shape[-1])
        elif x.dim() == 0 or x.shape[0] != n:
            raise GraphError(
                f"the per-example Jacobian of a guess point's next modules needs their inputs with the batch's {n} "
                f"rows on dim 0, but one has shape {tuple(x.shape)} (an op between moved the batch, e.g. a "
                "sequence-first transpose, as inside nn.MultiheadAttention): use method='wt' or 'activation' for "
                "this model"
            )
        else:
            seen[id(x)] = x
    outputs = [seen[id(x)] for x in outputs]
    if lifts and all(w is not None for w in lifts):
        derivatives: dict[int, Tensor | None] = {}
        for x in outputs:
            if id(x) not in derivatives:
                derivatives[id(x)] = _elementwise_derivative(leaf, x)
        if all(d is not None for d in derivatives.values()):
            blocks = [(derivatives[id(x)].detach(), w.to(leaf.dtype)) for x, w in zip(outputs, lifts, strict=True)]
            return LinearJacobian(leaf[0].numel(), blocks)
    return AutogradJacobian(leaf, outputs, lifts)


def dense_rows(op: UpstreamJacobian, blocks: int, budget: int, method: str, name: str) -> tuple[Tensor, int]:
    """``J`` of the distinct rows, materialized, and how many times those rows repeat (``num_guesses`` blocks with the
    same matrices are factorized once).

    Args:
        op: the operator. blocks: ``num_guesses``. budget: the largest :func:`exact_cost` allowed.
        method, name: the estimator and the guess point, for the error message.

    Raises:
        JacobianTooLargeError: the exact spectrum would cost more than ``budget``.
    """
    distinct = op.distinct_rows(blocks)
    cost = exact_cost(distinct.shape)
    if cost > budget:
        N, m, n = distinct.shape
        raise JacobianTooLargeError(
            f"{method!r} needs the exact spectrum of the per-example Jacobian at {name!r} ({N} rows of {m} x {n}: "
            f"cost {cost:.3g} > exact_budget={budget:.3g}). Raise exact_budget= if that is affordable, or use "
            "method='wt-perp' with an integer rank (a randomized solver), or 'wt'."
        )
    J = distinct.dense()
    if distinct is op and blocks > 1:
        first = _first_block(J, blocks)
        J = J if first is None else first
    return J, op.shape[0] // J.shape[0]
