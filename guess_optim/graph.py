"""Discovery of guess points' next modules from the data flow of one forward pass.

A structured guess (``mixing``, ``wt``, ``downstream``) at a guess point ``i`` needs what happens to its output
``s_i`` before the next parametrized module(s): the element-wise activation (for its mask), reshapes, dropout, and
which module(s) consume the result. We learn this once per input signature by running the model's forward under a
:class:`~torch.overrides.TorchFunctionMode` that follows every tensor produced by a tracked module through the
parameter-free ops that consume it, until a tracked module consumes it (an :class:`Edge` to that module) or it
leaves the guessing region (an edge to ``BOUNDARY``).

The ops of an edge form a :class:`Chain` that can be replayed on a new ``s_i``, so the engine can compute the
guess at hook time by a vector-Jacobian product through ``chain`` (and the next module). A chain is *replayable*
when each op takes the followed tensor as its only non-constant tensor input (parameters and buffers of the model
count as constants). Ops that combine it with another activation (a residual add, attention's ``q @ k^T``) make the
chain non-replayable; structured guesses then raise :class:`GraphError` naming the op.

Dropout in a chain is replayed as the identity: the guess direction is computed without the mask, and the real
forward applies the very mask the user sees to both the primal and the tangent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["BOUNDARY", "Chain", "Edge", "Graph", "GraphError", "discover"]

BOUNDARY = "<boundary>"
"""Consumer name of an edge that leaves the guessing region (the model's or the head's output)."""

_SLOT = object()
_IDENTITY_OPS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 torch.dropout, torch.Tensor.contiguous}


class GraphError(RuntimeError):
    """A structured guess needs a part of the model's graph that cannot be replayed."""


def _fill(template: Any, x: Tensor) -> Any:
    return tree_map(lambda a: x if a is _SLOT else a, template)


def _op_name(func: Callable) -> str:
    return getattr(func, "__name__", repr(func))


@dataclass(frozen=True)
class Chain:
    """The parameter-free ops between a tracked module's output and one consumer.

    Attributes:
        ops: ``(func, args, kwargs)`` with the followed tensor replaced by a slot.
        blocker: name of the first op that makes the chain non-replayable, or ``None``.
    """

    ops: tuple[tuple[Callable, tuple, dict], ...] = ()
    blocker: str | None = None

    @property
    def replayable(self) -> bool:
        return self.blocker is None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(_op_name(f) for f, _, _ in self.ops)

    def extend(self, func: Callable, args: tuple, kwargs: dict, blocker: str | None) -> Chain:
        if self.blocker is not None:
            return self
        if blocker is not None:
            return Chain(self.ops, blocker)
        if func in _IDENTITY_OPS:
            return self
        return Chain((*self.ops, (func, args, kwargs)), None)

    def __call__(self, x: Tensor) -> Tensor:
        """Replay the chain on ``x`` (same trailing shape as at discovery).

        Raises:
            GraphError: the chain is not replayable.
        """
        if self.blocker is not None:
            raise GraphError(f"cannot replay an op chain blocked at {self.blocker!r}")
        # In-place ops (ReLU(inplace=True)) must not modify the caller's tensor.
        x = x.clone() if self.ops else x
        for func, args, kwargs in self.ops:
            x = func(*_fill(args, x), **_fill(kwargs, x))
        return x


@dataclass(frozen=True)
class Edge:
    """``consumer`` (a module, or :data:`BOUNDARY`) consumes ``chain(output of the producer)``."""

    consumer: nn.Module | str
    chain: Chain


@dataclass
class Graph:
    """Edges from each tracked module to its consumers, found by :func:`discover`.

    Attributes:
        edges: ``module → list of edges``; a module absent from the map was not called.
        names: ``module → qualified name`` in the model, for messages.
    """

    edges: dict[nn.Module, list[Edge]] = field(default_factory=dict)
    names: dict[nn.Module, str] = field(default_factory=dict)

    def next_edges(self, module: nn.Module) -> list[Edge]:
        """Edges of ``module`` to other modules (not to the boundary)."""
        return [e for e in self.edges.get(module, []) if e.consumer is not BOUNDARY]

    def boundary_edges(self, module: nn.Module) -> list[Edge]:
        """Edges of ``module`` that leave the guessing region."""
        return [e for e in self.edges.get(module, []) if e.consumer is BOUNDARY]

    def describe(self) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
        """``{producer name: [(consumer name, op names), ...]}``, for documentation and tests."""
        out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for m, edges in self.edges.items():
            out[self.names[m]] = [
                (e.consumer if isinstance(e.consumer, str) else self.names[e.consumer], e.chain.names)
                for e in edges
            ]
        return out


class _Tracer(TorchFunctionMode):
    """Follows tensors produced by tracked modules through parameter-free ops."""

    def __init__(self, constants: set[int]):
        super().__init__()
        self.constants = constants  # ids of parameters and buffers
        self.tracked: dict[int, tuple[Tensor, dict[nn.Module, Chain]]] = {}
        self.inside = 0

    def origins(self, t: Any) -> dict[nn.Module, Chain]:
        if isinstance(t, Tensor) and id(t) in self.tracked and self.tracked[id(t)][0] is t:
            return self.tracked[id(t)][1]
        return {}

    def track(self, t: Tensor, origins: dict[nn.Module, Chain]) -> None:
        self.tracked[id(t)] = (t, origins)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        leaves, _ = tree_flatten((args, kwargs))
        followed = [t for t in leaves if self.origins(t)]
        if not followed:
            return out
        merged: dict[nn.Module, Chain] = {}
        for t in followed:
            others = [
                x for x in leaves
                if isinstance(x, Tensor) and x is not t and id(x) not in self.constants
            ]
            blocker = f"{_op_name(func)} (combines the tensor with another activation)" if others else None
            slot_args, slot_kwargs = tree_map(lambda a, t=t: _SLOT if a is t else a, (args, kwargs))
            for origin, chain in self.origins(t).items():
                new = chain.extend(func, slot_args, slot_kwargs, blocker)
                if origin not in merged or (merged[origin].replayable and not new.replayable):
                    merged[origin] = new
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor):
                self.track(o, merged)
        return out


def discover(
    model: nn.Module,
    run_forward: Callable[[], Any],
    modules: Iterable[nn.Module],
    boundary: nn.Module,
) -> Graph:
    """Run ``run_forward()`` once under a tracer and return the edges between ``modules``.

    The caller is responsible for side effects of the extra forward (buffers, RNG state): the engine restores
    both around this call.

    Args:
        model: the root module (for names, parameters and buffers).
        run_forward: calls the model's forward on the real inputs, with guessing disabled.
        modules: the parametrized modules to track (guess points and possible next modules).
        boundary: the module whose output leaves the guessing region (the root, or the chosen head).

    Returns:
        The :class:`Graph`.
    """
    modules = list(modules)
    constants = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    tracer = _Tracer(constants)
    graph = Graph(names={m: n for n, m in model.named_modules()})
    if boundary is model:
        graph.names.setdefault(model, "<root>")
    graph.names[model] = graph.names.get(model) or "<root>"
    tracked = set(modules)

    def pre(module, args, kwargs):
        if module in tracked:
            for t in tree_flatten((args, kwargs))[0]:
                for origin, chain in tracer.origins(t).items():
                    graph.edges.setdefault(origin, []).append(Edge(module, chain))
            tracer.inside += 1

    def post(module, args, kwargs, output):
        if module in tracked:
            tracer.inside -= 1
            graph.edges.setdefault(module, [])
            if isinstance(output, Tensor):
                tracer.track(output, {module: Chain()})
        if module is boundary:
            for t in tree_flatten(output)[0]:
                for origin, chain in tracer.origins(t).items():
                    graph.edges.setdefault(origin, []).append(Edge(BOUNDARY, chain))

    handles = []
    for m in {*tracked, boundary}:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with tracer:
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return graph
