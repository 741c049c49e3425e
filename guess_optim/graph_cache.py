"""The graphs of an attached model, discovered once per input signature (:func:`~guess_optim.graph.discover`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .graph import Graph, discover

__all__ = ["GraphCache"]


class GraphCache:
    """The graphs of one attached model, discovered once per input signature (shapes, dtypes, device types).

    A volatile graph (captured activations) is valid for its batch only: it is returned but not kept.

    Args:
        model: the attached model.
        modules: the tracked modules (guess points and the modules that may consume their outputs).
        boundary: the module whose output ends the guessing region.
        sources: the modules whose outputs are followed (``None``: all of ``modules``).
        internal: a context manager factory under which the engine's own forwards run (hooks stand aside).
        max_size: graphs kept at most (the oldest is dropped first). (default: 8)
    """

    def __init__(self, model: nn.Module, modules: Iterable[nn.Module], boundary: nn.Module,
                 sources: Iterable[nn.Module] | None, internal: Callable[[], Any], max_size: int = 8):
        self.model = model
        self.modules = list(modules)
        self.boundary = boundary
        self.sources = None if sources is None else list(sources)
        self.internal = internal
        self.max_size = max_size
        self._graphs: dict[tuple, Graph] = {}
        self._dynamic: set[tuple] = set()  # signatures whose control flow changed: discovered on every step

    def get(self, args: tuple, kwargs: dict, trainable: list[Tensor] | None = None, rows: int | None = None) -> Graph:
        """The graph of the model's forward on these inputs: cached, or discovered by one traced forward run with the
        global RNG forked and buffers restored after (the extra forward leaves no trace).

        ``trainable``: the parameters the step estimates (an op reading one of them is an op-level guess point); the
        engine passes them, as the ``store="recompute"`` replay discovers while they are frozen. (default: those that
        require grad now). ``rows``: the batch's rows (see :func:`~guess_optim.graph.discover`).
        """
        from .contexts import parameters_frozen

        leaves = tree_flatten((args, kwargs))[0]
        key = tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else type(t) for t in leaves)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        dynamic = key in self._dynamic
        model = self.model
        if trainable is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
        buffers = [b.detach().clone() for b in model.buffers()]
        devices = sorted({t.device.index or 0 for t in leaves if isinstance(t, Tensor) and t.device.type == "cuda"})
        try:
            with self.internal(), torch.random.fork_rng(devices=devices), parameters_frozen(model, trainable):
                graph = discover(model, lambda: model(*args, **kwargs), self.modules, self.boundary, self.sources,
                                 trainable, rows)
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)
        graph.signature = key
        if not graph.volatile and not dynamic:  # a volatile graph holds this batch's activations: rediscover
            if len(self._graphs) >= self.max_size:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = graph
        return graph

    @staticmethod
    def uses(graph: Graph | None, guess_points: Iterable[nn.Module], exact_head: bool) -> dict[nn.Module, int] | None:
        """For a volatile graph: how many guess-point calls will read it (those with next modules, and the head's
        with ``exact_head``), so that a step can drop it, and the activations it captured, after the last."""
        if graph is None or not graph.volatile:
            return None
        nodes = [*guess_points, *graph.op_nodes.values()]
        return {m: graph.calls.get(m, 0) for m in nodes
                if graph.next_edges(m) or (exact_head and graph.boundary_edges(m))}

    def stale(self, graph: Graph, module_calls: dict[nn.Module, int]) -> str | None:
        """Whether a cached ``graph`` no longer describes the forward that just used it: a guess point called a
        different number of times (control flow that depends on more than the input signature: a layer skipped,
        LayerDrop, early exit). Then the signature is discovered again on every step from now on, and the returned
        text says which module changed (``None``: the graph still holds)."""
        key = getattr(graph, "signature", None)
        if key is None or self._graphs.get(key) is not graph:
            return None
        for m, n in module_calls.items():
            if graph.calls.get(m, 0) != n:
                break
        else:
            return None
        self._graphs.pop(key)
        self._dynamic.add(key)
        return f"{graph.names.get(m, '?')!r} was called {n} time(s), {graph.calls.get(m, 0)} when the graph was found"

    def clear(self) -> None:
        self._graphs.clear()
        self._dynamic.clear()
