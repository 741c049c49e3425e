"""The guess point an estimator draws a guess for: its output, the generator, and the graph around it.

A structured guess (paper §2.1–2.2) is a random cotangent at some *targets* downstream of the guess point, pulled back
to the guess point's output by a vector-Jacobian product through the parameter-free ops in between (and, for ``wt``,
through the next module). :class:`Site` builds those targets and pullbacks from the discovered graph
(:mod:`guess_optim.graph`); an estimator only chooses the cotangents' law and the targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from .contexts import own_autograd
from .graph import BOUNDARY, Edge, Graph, OpNode
from .jacobian import UpstreamJacobian, upstream_jacobian
from .local_grad import power_singular_values

__all__ = ["Site"]

Pullback = Callable[[Iterable[Tensor]], Tensor]


class Site:
    """One call of a guess point, as an estimator sees it.

    Attributes:
        output: the guess point's output (its values, detached), ``[N, *S]`` with ``N = num_guesses x batch``.
        generator: the handle's private generator on the output's device (never use the global RNG).
        num_guesses: ``K``: the rows are ``K`` blocks of the batch.
        module: the guess point's module. ``name``: its qualified name in the model.
        edges: the edges to the next modules (empty for the output layer: no next module).
        read: ids of the parameters of the modules (and op-level guess points) whose weights or forward the guess read
            (the next modules for ``next_outputs``, ``next_jacobian`` and ``downstream``): stepping in backward
            (``gradient_release=True``) steps none of them before the replayed guess has read it.
    """

    def __init__(self, output: Tensor, generator: torch.Generator, num_guesses: int, module: nn.Module, name: str,
                 edges: list[Edge], graph: Graph | None, internal: Callable[[], AbstractContextManager],
                 streamed: bool = False, layout: Callable[[Tensor], Tensor] | None = None):
        self.output = output
        self.generator = generator
        self.num_guesses = num_guesses
        self.module = module
        self.name = name
        self.edges = edges
        self._graph = graph
        self._internal = internal
        self._streamed = streamed  # keep one edge's replayed values alive at a time (Step.draw_guess says when)
        # [N, *S] rows -> the output's own layout, where the chains were recorded (a batch on dim 1: the sequence-
        # first tensors inside nn.MultiheadAttention); differentiable, so pullbacks come back one row per example
        self._layout = layout if layout is not None else (lambda t: t)
        self.read: set[int] = set()

    @property
    def has_next(self) -> bool:
        """Whether the output reaches another guess point's module (``False`` for the output layer)."""
        return bool(self.edges)

    # --------------------------------------------------------------------------------------------------- targets
    def next_outputs(self, power: float = 1.0) -> tuple[list[Tensor], Pullback]:
        """Targets at the next modules' outputs ``s_{i+1}`` and the pullback ``ε ↦ J_bᵀ W_{i+1}ᵀ ε`` (paper §2.1).

        Args:
            power: use ``U diag(S^p) Vᵀ`` of each next Linear's weight instead of the weight (paper Fig. 4).

        Returns:
            ``(targets, pullback)``: the targets' shapes are the next modules' outputs (only shapes and dtypes are
            meaningful), and the pullback maps one cotangent per target (drawn lazily, in order) to ``[N, *S]``.
        """
        if self._streamed:
            streamed = self._streamed_next_outputs(power)
            if streamed is not None:
                return streamed
        return self._pulled_back("next", power=power)

    def post_activations(self) -> tuple[list[Tensor], Pullback]:
        """Targets at the post-activations ``x_{i+1}`` feeding the next modules (their values: a mixing guess combines
        them) and the pullback through the parameter-free ops (for ReLU, the activation mask; paper §2.2)."""
        return self._pulled_back("post")

    def downstream(self, layers: int) -> tuple[list[Tensor], Pullback]:
        """Targets at the post-activations ``layers`` modules downstream and the pullback through that segment
        (paper §2.1, "partial backpropagation")."""
        return self._pulled_back("downstream", layers=layers)

    def next_jacobian(self) -> UpstreamJacobian:
        """The per-example Jacobian ``J_b`` of the next modules' outputs ``s_{i+1}`` w.r.t. this guess point's output,
        through the replayed chains and the next modules (for ReLU and a Linear, ``J_b = W_{i+1} D_b``), as a batched
        operator: ``J V``, ``Jᵀ Y`` and ``J`` itself (:mod:`guess_optim.jacobian`). ``next_outputs()``'s pullback is
        ``ε ↦ J_bᵀ ε``; this is the same map, for many vectors at once and in both directions.

        Returns:
            A :class:`~guess_optim.jacobian.UpstreamJacobian` of shape ``(N, m, n)``: ``N`` rows, ``n`` the output's
            size per row, ``m`` the next modules' outputs' size per row (concatenated in edge order).
        """
        leaf = self.output.detach().requires_grad_(True)
        with self._internal(), own_autograd():
            outputs, lifts = self._targets(leaf, "next", 1.0, 1)
        return upstream_jacobian(leaf, outputs, lifts)

    # ------------------------------------------------------------------------------------------------ internals
    def _pulled_back(self, target: str, *, power: float = 1.0, layers: int = 1) -> tuple[list[Tensor], Pullback]:
        primal = self.output
        leaf = primal.detach().requires_grad_(True)
        with self._internal(), own_autograd():
            outputs, lifts = self._targets(leaf, target, power, layers)
            # A target whose lift is a weight W stands for F.linear(x, W): its VJP is ε @ W, so the next layer's
            # forward is never computed for Wᵀ guesses (one matmul, not two); and only the rows of x that depend on
            # the guess point (a prompt's rows in a token sequence) are drawn and multiplied.
            spans: dict[int, tuple[int, int, int] | None] = {}
            for o, w in zip(outputs, lifts, strict=True):
                if w is not None and id(o) not in spans:
                    spans[id(o)] = _dependent_span(o, leaf)
        targets = []
        for o, w in zip(outputs, lifts, strict=True):
            if w is None:
                targets.append(o.detach())
                continue
            shape = list(o.shape[:-1])
            span = spans[id(o)]
            if span is not None:
                shape[span[0]] = span[2] - span[1]
            targets.append(o.new_empty(()).expand(*shape, w.shape[0]))

        def pullback(cotangents: Iterable[Tensor]) -> Tensor:
            # One summed cotangent per distinct replayed tensor (q, k and v read one LayerNorm output), built as the
            # cotangents are drawn: a prompt's next modules are every layer's projections, whose ε would not fit.
            summed: dict[int, list] = {}
            for o, w, c in zip(outputs, lifts, cotangents, strict=True):
                c = c if w is None else c @ w
                entry = summed.get(id(o))
                if entry is None:
                    summed[id(o)] = [o, c]
                else:
                    entry[1] = entry[1] + c
            grads = []
            for o, c in summed.values():
                span = spans.get(id(o))
                if span is not None:  # back to the full rows (the others have no path to the guess point)
                    full = c.new_zeros(o.shape)
                    full.narrow(span[0], span[1], span[2] - span[1]).copy_(c)
                    c = full
                grads.append(c)
            with own_autograd():
                (g,) = torch.autograd.grad([o for o, _ in summed.values()], leaf, grads, allow_unused=True)
            return torch.zeros_like(primal) if g is None else g

        return targets, pullback

    def _targets(self, s: Tensor, target: str, power: float, layers: int) -> tuple[list[Tensor], list[Any]]:
        """What the guess is pulled back from, as differentiable functions of ``s``: the outputs and, per output,
        ``None`` or a weight ``W`` (the target is then ``F.linear(output, W)``: a Linear next module, whose forward is
        not needed for a VJP)."""
        out, lifts = [], []
        memo: dict[int, Tensor] = {}  # the edges' chains share their prefixes (a residual stream)
        s = self._layout(s)
        for edge in self.edges:
            x = edge.chain(s, memo)
            if target != "post":
                self._reads(edge.consumer)
            if target == "post":
                out.append(x)
                lifts.append(None)
            elif target == "next" and type(edge.consumer) is nn.Linear:
                w = edge.consumer.weight.detach()
                out.append(x)
                lifts.append(w if power == 1.0 else power_singular_values(w, power))
            elif target == "next":
                out.append(edge.consume(x))
                lifts.append(None)
            else:
                y = self._downstream(edge.consumer, edge.consume(x), layers)
                out.extend(y)
                lifts.extend([None] * len(y))
        return out, lifts

    def _downstream(self, module: nn.Module, y: Tensor, layers: int) -> list[Tensor]:
        """Post-activations ``layers`` modules downstream of the guess point, given ``y`` = next module output."""
        chains = []
        for e in self._graph.edges.get(module, []):
            if not any(c is e.chain or c.ops == e.chain.ops for c, _ in chains):
                chains.append((e.chain, e))
        if not chains:
            return [y]
        out = []
        for chain, e in chains:
            x = chain(y)
            if layers <= 1 or e.consumer is BOUNDARY:
                out.append(x)
            else:
                self._reads(e.consumer)
                out.extend(self._downstream(e.consumer, e.consume(x), layers - 1))
        return out

    def _reads(self, consumer: Any) -> None:
        """The guess reads ``consumer``'s parameters (a module's, or those an op-level guess point reads)."""
        if isinstance(consumer, nn.Module):
            self.read.update(id(p) for p in consumer.parameters())
        elif isinstance(consumer, OpNode):
            self.read.update(consumer.key[0][1])  # (op_key, occurrence); op_key: (op name, parameter ids)

    def _streamed_next_outputs(self, power: float) -> tuple[list[Tensor], Pullback] | None:
        """``next_outputs`` of ``store="recompute"``, and of a graph holding captured activations (a residual stream),
        when every next module is a Linear: each edge's chain is replayed,
        given its summed cotangent ``Σ ε_j W_j`` and pulled back on its own, so only one edge's values are alive at a
        time (a prompt's next modules are every layer's projections). Shared prefixes are replayed again per edge:
        compute for memory. Same draws, in the same order, as :meth:`_pulled_back`. ``None``: not applicable."""
        edges = self.edges
        if any(type(e.consumer) is not nn.Linear or e.shape is None for e in edges):
            return None
        primal = self.output
        for e in edges:
            self._reads(e.consumer)
        lifts = [e.consumer.weight.detach() for e in edges]
        if power != 1.0:
            lifts = [power_singular_values(w, power) for w in lifts]
        spans: dict[int, tuple[int, int, int] | None] = {}  # per chain, as _pulled_back's per replayed tensor
        for e in edges:
            if id(e.chain) not in spans and len(e.shape) < 3:
                spans[id(e.chain)] = None  # (no rows to narrow: the chain is not replayed for nothing)
            elif id(e.chain) not in spans:
                leaf = primal.detach().requires_grad_(True)
                with self._internal(), own_autograd():
                    spans[id(e.chain)] = _dependent_span(e.chain(self._layout(leaf), {}), leaf)
        targets = []
        for e, w in zip(edges, lifts, strict=True):
            shape, span = list(e.shape[:-1]), spans[id(e.chain)]
            if span is not None:
                shape[span[0]] = span[2] - span[1]
            targets.append(primal.new_empty((), dtype=e.dtype).expand(*shape, w.shape[0]))

        def pullback(cotangents: Iterable[Tensor]) -> Tensor:
            draws = iter(cotangents)
            total = torch.zeros_like(primal)
            i = 0
            while i < len(edges):
                chain, summed = edges[i].chain, None
                while i < len(edges) and edges[i].chain is chain:  # q, k and v read one value
                    c = next(draws) @ lifts[i]
                    summed = c if summed is None else summed + c
                    i += 1
                leaf = primal.detach().requires_grad_(True)
                with self._internal(), own_autograd():
                    x = chain(self._layout(leaf), {})
                    span = spans[id(chain)]
                    if span is not None:
                        full = summed.new_zeros(x.shape)
                        full.narrow(span[0], span[1], span[2] - span[1]).copy_(summed)
                        summed = full
                    (g,) = torch.autograd.grad(x, leaf, summed.to(x.dtype), allow_unused=True)
                if g is not None:
                    total += g
            return total

        return targets, pullback


def _dependent_span(x: Tensor, leaf: Tensor) -> tuple[int, int, int] | None:
    """``(dim, start, stop)``: the only rows of ``x`` along ``dim`` (not the first, not the last) whose values depend
    on ``leaf`` in this step, when they are a strict sub-range (a prompt's tokens, concatenated with the others and
    carried by position-wise ops); ``None`` otherwise. Found exactly from the rows of one Jacobian-vector product
    ``J v`` (computed as a double VJP): a row outside the span has no path from ``leaf``, so its entries are exactly
    zero, and the cotangent there contributes nothing to a pullback."""
    if x.dim() < 3 or not x.requires_grad or not leaf.is_floating_point():
        return None
    try:
        u = torch.zeros_like(x, requires_grad=True)
        (vjp,) = torch.autograd.grad(x, leaf, u, create_graph=True, retain_graph=True, allow_unused=True)
        if vjp is None or not vjp.requires_grad:
            return None
        # random v (not ones: a LayerNorm's Jacobian maps a constant direction to zero); a fixed generator, so the
        # handle's draws do not change. A row with a path from leaf gets J v = 0 with probability zero.
        gen = torch.Generator(device=leaf.device).manual_seed(0)
        v = torch.randn(leaf.shape, generator=gen, device=leaf.device, dtype=leaf.dtype)
        (jv,) = torch.autograd.grad(vjp, u, v, allow_unused=True)
    except RuntimeError:  # an op without a double backward: no narrowing
        return None
    if jv is None:
        return None
    for dim in range(1, x.dim() - 1):
        rows = jv.ne(0).movedim(dim, 0).reshape(x.shape[dim], -1).any(1)
        index = rows.nonzero().flatten()
        if len(index) == 0 or len(index) == x.shape[dim]:
            continue
        start, stop = int(index[0]), int(index[-1]) + 1
        if stop - start <= x.shape[dim] // 2:
            return dim, start, stop
    return None
