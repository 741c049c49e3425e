"""Discovery of guess points' next modules from the data flow of one forward pass.

A structured guess (``mixing``, ``wt``, ``downstream``) at a guess point ``i`` needs what happens to its output
``s_i`` before the next parametrized module(s): the element-wise activation (for its mask), reshapes, pooling,
dropout, residual adds, attention, and which module(s) consume the result. :func:`discover` runs the model's forward
under a :class:`~torch.overrides.TorchFunctionMode` that follows every tensor produced by a tracked module through
the parameter-free ops that consume it, until a tracked module consumes it (an :class:`Edge` to that module) or it
leaves the guessing region (an edge to ``BOUNDARY``).

The ops of an edge form a :class:`Chain` that can be replayed on a new ``s_i``, so the engine computes the guess at
hook time as a vector-Jacobian product through ``chain`` (and the next module). When an op combines the followed
tensor with another activation (a residual add, attention's ``q @ k^T``, a ``torch.cat`` with other tokens), that
other operand is *captured* by value: the chain is then *volatile* (valid for this batch only), and the engine
re-runs discovery on every guessing step, before the guessing forward, with the same RNG state (so dropout masks
agree). The VJP through a chain treats captured operands as constants: a partial derivative, as the paper's
``W^T`` guess uses only the direct path to the next layer.

In-place ops are recorded as their out-of-place versions. Dropout is replayed as the identity: the guess direction
is computed without the mask, and the real forward applies the very mask the user sees to primal and tangent alike.

What is found for common blocks (see ``tests/test_graph.py``):

* MLP ``fc1 → ReLU → fc2``: ``fc1 → fc2`` through ``relu``.
* ResNet basic block ``conv1 → bn1 → relu → conv2 → bn2 → (+ identity) → relu``: ``conv1 → bn1``,
  ``bn1 → conv2`` through ``relu``, ``conv2 → bn2``, ``bn2 → <next block's conv1 and the next skip>`` through
  ``add, relu`` (the add captures the identity branch).
* Hugging Face ViT block (transformers 5.x names): ``layernorm_before → q_proj, k_proj, v_proj``;
  ``q_proj → o_proj`` through ``reshape (a view), transpose, scaled_dot_product_attention (captures k and v), …``
  (``matmul, softmax, matmul`` with eager attention); ``o_proj`` and ``fc2 →`` every later ``LayerNorm`` along the
  residual stream through the residual adds.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["BOUNDARY", "Chain", "Edge", "Graph", "GraphError", "OpNode", "discover", "op_key", "out_of_place"]

BOUNDARY = "<boundary>"
"""Consumer name of an edge that leaves the guessing region (the model's or the head's output)."""

_SLOT = object()
_IDENTITY_OPS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 torch.dropout, torch.Tensor.contiguous}


class GraphError(RuntimeError):
    """The model's graph does not allow what was asked (e.g. ``exact_head`` on a head that leaves no trace)."""


@dataclass(frozen=True, eq=False)
class _Sub:
    """In an op's template: the value of ``chain`` applied to the origin (one of several paths from it)."""

    chain: Chain


class _Element:
    """Replay of taking the ``index``-th tensor of a multi-output op's result (``q, k, v = qkv.unbind(0)``,
    ``x.chunk(2, -1)``, ``max(dim=...)``, attention returning ``(output, weights)``)."""

    def __init__(self, index: int):
        self.index = index
        self.__name__ = f"[{index}]"

    def __call__(self, out: Any) -> Tensor:
        return tree_flatten(out)[0][self.index]


def _fill(template: Any, x: Tensor, origin: Tensor, memo: dict[int, Tensor]) -> Any:
    def fill(a):
        if a is _SLOT:
            return x
        if isinstance(a, _Sub):
            return a.chain(origin, memo)
        return a

    return tree_map(fill, template)


def _op_name(func: Callable) -> str:
    return getattr(func, "__name__", repr(func))


@dataclass(frozen=True, eq=False)
class Chain:
    """The parameter-free ops between a tracked module's output and one consumer.

    Attributes:
        ops: ``(func, args, kwargs)`` with the followed tensor replaced by a slot.
        volatile: the chain holds captured activations (valid for the batch it was discovered on only).
    """

    ops: tuple[tuple[Callable, tuple, dict], ...] = ()
    volatile: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(_op_name(f) for f, _, _ in self.ops)

    def extend(self, func: Callable, args: tuple, kwargs: dict, *, captured: bool) -> Chain:
        if func in _IDENTITY_OPS:
            return self
        return Chain((*self.ops, (func, args, kwargs)), self.volatile or captured)

    def __call__(self, x: Tensor, memo: dict[int, Tensor] | None = None) -> Tensor:
        """Replay the chain on ``x`` (same shape as at discovery), differentiably.

        ``memo`` caches the value of every sub-chain met on the way (keyed by chain identity), so a graph whose
        paths from the origin split and merge many times (a residual stream) is evaluated once per node, not once
        per path.
        """
        memo = {} if memo is None else memo
        if id(self) in memo:
            return memo[id(self)]
        origin = x
        # In-place ops (ReLU(inplace=True)) must not modify the caller's tensor.
        out = x.clone() if self.ops else x
        for func, args, kwargs in self.ops:
            try:
                out = func(*_fill(args, out, origin, memo), **_fill(kwargs, out, origin, memo))
            except (GraphError, MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # an op the tracer recorded but cannot replay: say so, not a raw TypeError
                raise GraphError(
                    f"replaying {_op_name(func)!r}, recorded between a guess point and its next modules, failed "
                    f"({type(e).__name__}: {e}). Structured guesses (wt, mixing, downstream, self-sharpening) need "
                    "these ops replayed; use method='activation' or 'directional' for this model, or replace the op."
                ) from e
        memo[id(self)] = out
        return out


@dataclass(frozen=True)
class Edge:
    """``consumer`` (a module, an :class:`OpNode`, or :data:`BOUNDARY`) consumes ``chain(output of the producer)``, a
    tensor of shape ``shape`` and dtype ``dtype`` (as seen at discovery). ``call(x)`` evaluates the consumer on ``x``
    (for an op node: the op with ``x`` where this producer's value went)."""

    consumer: Any
    chain: Chain
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    call: Callable[[Tensor], Tensor] | None = None

    def consume(self, x: Tensor) -> Tensor:
        """The consumer's output for input ``x``."""
        return self.call(x) if self.call is not None else self.consumer(x)


def op_key(func: Callable, sources: tuple[int, ...]) -> tuple:
    """What identifies an op-level guess point across forwards (with its occurrence number): the op and the trainable
    parameters it reads, directly or through parameter-only ops."""
    return (_op_name(func), tuple(sorted(set(sources))))


@dataclass(eq=False)
class OpNode:
    """A guess point at one op that reads trainable parameters outside the fast-path modules (found by
    :func:`discover`; README "How it works"): a node of the graph like a module, keyed by :func:`op_key` and its
    occurrence."""

    key: tuple
    name: str

    def replay(self, template: tuple, x: Tensor) -> Tensor:
        """The op's first output with ``x`` in the slot of the template ``(func, args, kwargs)``."""
        func, args, kwargs = template
        out = func(*_fill(args, x, x, {}), **_fill(kwargs, x, x, {}))
        return out if isinstance(out, Tensor) else next(o for o in tree_flatten(out)[0] if isinstance(o, Tensor))


@dataclass
class Graph:
    """Edges from each tracked module to its consumers, found by :func:`discover`.

    Attributes:
        edges: ``module → list of edges``; a module absent from the map was not called.
        names: ``module → qualified name`` in the model, for messages.
        calls: ``module → number of calls`` in the traced forward.
        op_nodes: ``(op_key, occurrence) → OpNode``: the op-level guess points that read a followed tensor.
        signature: the input signature it was discovered for (set by :class:`~guess_optim.graph_cache.GraphCache`).
    """

    edges: dict[Any, list[Edge]] = field(default_factory=dict)
    names: dict[Any, str] = field(default_factory=dict)
    calls: dict[Any, int] = field(default_factory=dict)
    op_nodes: dict[tuple, OpNode] = field(default_factory=dict)
    signature: tuple | None = None  # the input signature it was discovered for (GraphCache)

    @property
    def volatile(self) -> bool:
        """Whether some chain captured activations (then the graph is valid for its batch only)."""
        return any(e.chain.volatile for edges in self.edges.values() for e in edges)

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

    def __init__(self, constants: set[int], trainable: set[int] = frozenset(), graph: Graph | None = None):
        super().__init__()
        self.constants = constants  # ids of parameters and buffers
        self.trainable = trainable  # ids of the trainable parameters (op-level guess points read them)
        self.graph = graph
        # weak references: the traced forward's intermediate tensors die as they would in a plain forward
        self.tracked: dict[int, tuple[weakref.ref, dict[nn.Module, Chain]]] = {}
        self.derived: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}  # computed from trainable parameters alone
        self.counts: dict[tuple, int] = {}
        self.param_names: dict[int, str] = {}
        self.inside = 0

    def _is_derived(self, t: Tensor) -> bool:
        """Whether ``t`` was computed from trainable parameters alone (a live entry: the id of a dead tensor may be
        reused by a batch tensor, which would then be taken for parameter-only, depending on garbage collection)."""
        entry = self.derived.get(id(t))
        return entry is not None and entry[0]() is t

    def _sources(self, leaves: list) -> tuple[int, ...]:
        out: dict[int, None] = {}
        for t in leaves:
            if not isinstance(t, Tensor):
                continue
            if id(t) in self.trainable:
                out[id(t)] = None
            entry = self.derived.get(id(t))
            if entry is not None and entry[0]() is t:
                out.update(dict.fromkeys(entry[1]))
        return tuple(out)

    def _op_node(self, func, args, kwargs, leaves, followed, sources) -> Any:
        """An op reading trainable parameters and a followed tensor: an :class:`OpNode`, the next node of every origin
        followed into it; its output is followed from it."""
        key = op_key(func, sources)
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        graph = self.graph
        node = graph.op_nodes.get((key, n))
        if node is None:
            params = ", ".join(sorted(self.param_names.get(i, "?") for i in key[1]))
            node = graph.op_nodes[(key, n)] = OpNode((key, n), f"{_op_name(func)}({params})" + (f"#{n}" if n else ""))
            graph.names[node] = node.name
        fn, fn_kwargs, _ = out_of_place(func, kwargs)
        if self._bias_add(func, leaves, followed):
            # a bias added as its own op (h @ W.T + b): its own guess point, and transparent to the nodes before it,
            # whose next modules lie beyond it (as for an nn.Linear, whose bias is inside the layer)
            t = followed[0]
            template = self._template({id(t): _SLOT}, {id(x): x.detach() for x in leaves if isinstance(x, Tensor)})
            # (a bias computed from parameters is captured by value: valid for this step only)
            captured = any(isinstance(x, Tensor) and x is not t and id(x) not in self.constants for x in leaves)
            through = {origin: chain.extend(fn, *tree_map(template, (args, fn_kwargs)), captured=captured)
                       for origin, chain in self.origins(t).items()}
            out = func(*args, **kwargs)
            graph.edges.setdefault(node, [])
            graph.calls[node] = graph.calls.get(node, 0) + 1
            self.track(out, {**through, node: Chain()})
            return out
        for origin in {o for t in followed for o in self.origins(t)}:
            mine = [t for t in followed if origin in self.origins(t)]
            slots = {id(t): _SLOT for t in mine}
            template = tree_map(lambda a, slots=slots: slots.get(id(a), a if id(a) in self.constants else (
                a.detach() if isinstance(a, Tensor) else a)) if isinstance(a, Tensor) else a, (args, fn_kwargs))
            volatile = any(isinstance(a, Tensor) and id(a) not in self.constants and id(a) not in slots for a in leaves)
            chain = self.origins(mine[0])[origin]
            chain = Chain(chain.ops, chain.volatile or volatile)
            graph.edges.setdefault(origin, []).append(
                Edge(node, chain, tuple(mine[0].shape), mine[0].dtype,
                     call=functools.partial(node.replay, (fn, *template))))
        out = func(*args, **kwargs)
        graph.edges.setdefault(node, [])
        graph.calls[node] = graph.calls.get(node, 0) + 1
        first = out if isinstance(out, Tensor) else next((o for o in tree_flatten(out)[0] if isinstance(o, Tensor)),
                                                          None)
        if first is not None:
            self.track(first, {node: Chain()})
        return out

    def _bias_add(self, func: Any, leaves: list, followed: list[Tensor]) -> bool:
        """``h + b`` (or ``b + h``, ``h - b``): one followed tensor and parameters broadcast along it."""
        if _op_name(func) not in _BIAS_OPS or len(followed) != 1:
            return False
        t = followed[0]
        others = [x for x in leaves if isinstance(x, Tensor) and x is not t]
        return bool(others) and all(  # broadcast along the batch (also at batch size 1)
            (id(x) in self.constants or self._is_derived(x))
            and (x.dim() < t.dim() or x.numel() < t.numel() or (x.dim() == t.dim() and x.shape[0] == 1))
            for x in others)

    def _template(self, slots: dict[int, Any], snapshot: dict[int, Tensor]) -> Callable[[Any], Any]:
        def template(a):
            if isinstance(a, Tensor) and id(a) in slots:
                return slots[id(a)]
            if isinstance(a, Tensor) and id(a) not in self.constants:
                return snapshot[id(a)]
            return a

        return template

    def origins(self, t: Any) -> dict[nn.Module, Chain]:
        entry = self.tracked.get(id(t)) if isinstance(t, Tensor) else None
        if entry is not None and entry[0]() is t:
            return entry[1]
        return {}

    def track(self, t: Tensor, origins: dict[nn.Module, Chain]) -> None:
        self.tracked[id(t)] = (weakref.ref(t), origins)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside or not torch.is_grad_enabled():  # the model's own no_grad regions are constants
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        followed = [t for t in leaves if self.origins(t)]
        sources = self._sources(leaves) if self.trainable else ()
        if sources and all(not isinstance(t, Tensor) or id(t) in self.constants or self._is_derived(t)
                           for t in leaves):  # parameter-only: remember which parameters it reads
            out = func(*args, **kwargs)
            for o in tree_flatten(out)[0]:
                if isinstance(o, Tensor):
                    self.derived[id(o)] = (weakref.ref(o), sources)
            return out
        if sources and self.graph is not None:  # where parameters meet the batch: an op-level guess point
            return self._op_node(func, args, kwargs, leaves, followed, sources)
        if not followed or _constant_of(func):  # h.detach(), zeros_like(h): no path back to the guess point
            return func(*args, **kwargs)
        replay_func, replay_kwargs, inplace = out_of_place(func, kwargs)
        if replay_func is torch.Tensor.view and not any(isinstance(a, torch.dtype) for a in args[1:]):
            # the chain replays .contiguous() as the identity: a view after it may need a copy (channel shuffle)
            replay_func = torch.Tensor.reshape
        replay_args, replay_kwargs = _without_running_stat_updates(func, args, replay_kwargs)
        # Operands other than the followed tensor are captured by value; an in-place op would modify them.
        snapshot = {id(x): (x.detach().clone() if inplace else x.detach()) for x in leaves if isinstance(x, Tensor)}
        out = func(*args, **kwargs)
        merged: dict[nn.Module, Chain] = {}
        for origin in {o for t in followed for o in self.origins(t)}:
            mine = [t for t in followed if origin in self.origins(t)]
            captured = any(
                isinstance(x, Tensor) and all(x is not t for t in mine) and id(x) not in self.constants
                for x in leaves
            )
            if len(mine) == 1:  # the common case: a chain of ops on one running value
                t = mine[0]
                template = self._template({id(t): _SLOT}, snapshot)
                merged[origin] = self.origins(t)[origin].extend(
                    replay_func, *tree_map(template, (replay_args, replay_kwargs)), captured=captured
                )
            else:  # several operands descend from the origin (h * sigmoid(h)): each one's chain is replayed
                subs = {id(t): _Sub(self.origins(t)[origin]) for t in mine}
                slot_args, slot_kwargs = tree_map(self._template(subs, snapshot), (replay_args, replay_kwargs))
                volatile = captured or any(sub.chain.volatile for sub in subs.values())
                merged[origin] = Chain(((replay_func, slot_args, slot_kwargs),), volatile)
        if isinstance(out, Tensor):
            self.track(out, merged)
            return out
        for i, o in enumerate(tree_flatten(out)[0]):  # each output replays the op once (memo) and picks its own
            if isinstance(o, Tensor):
                pick = _Element(i)
                self.track(o, {origin: Chain(((pick, (_Sub(chain),), {}),), chain.volatile)
                               for origin, chain in merged.items()})
        return out


_BIAS_OPS = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "sub_", "__isub__"}


def _constant_of(func: Any) -> bool:
    """Ops whose output is a constant of the followed tensor (no derivative flows through them, as in backprop)."""
    name = getattr(func, "__name__", "")
    return "detach" in name or name.startswith("new_") or name.endswith("_like")


_STAT_UPDATERS = {  # func: (running_mean index, running_var index, flag index, flag name, flag default)
    F.batch_norm: (1, 2, 5, "training", False),
    F.instance_norm: (1, 2, 5, "use_input_stats", True),
}


def _without_running_stat_updates(func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A replayed batch/instance norm that normalizes with the input's statistics must not update the running
    statistics again (the forward the user sees already did): drop them from the replay, which changes nothing
    else in its output."""
    if func is F.scaled_dot_product_attention:  # its dropout is replayed as the identity, like F.dropout
        if kwargs.get("dropout_p"):
            kwargs = {**kwargs, "dropout_p": 0.0}
        if len(args) > 4 and args[4]:
            args = (*args[:4], 0.0, *args[5:])
        return args, kwargs
    spec = _STAT_UPDATERS.get(func)
    if spec is None:
        return args, kwargs
    mean_at, var_at, flag_at, flag_name, default = spec
    flag = kwargs.get(flag_name, args[flag_at] if len(args) > flag_at else default)
    if not flag:
        return args, kwargs
    args = list(args)
    kwargs = dict(kwargs)
    for at, name in ((mean_at, "running_mean"), (var_at, "running_var")):
        if len(args) > at:
            args[at] = None
        elif name in kwargs:
            kwargs[name] = None
    return tuple(args), kwargs


def out_of_place(func: Callable, kwargs: dict) -> tuple[Callable, dict, bool]:
    """The out-of-place version of an in-place op (``relu_`` → ``relu``, ``__iadd__`` → ``__add__``,
    ``inplace=True`` → ``False``), and whether ``func`` is in-place."""
    name = _op_name(func)
    if kwargs.get("inplace"):
        return func, {**kwargs, "inplace": False}, True
    alt = None
    if name.startswith("__i") and name.endswith("__"):
        alt = getattr(torch.Tensor, "__" + name[3:], None)
    elif name.endswith("_") and not name.endswith("__"):
        alt = getattr(torch.Tensor, name[:-1], None)
    if alt is not None:
        return alt, kwargs, True
    return func, kwargs, False


def discover(
    model: nn.Module,
    run_forward: Callable[[], Any],
    modules: Iterable[nn.Module],
    boundary: nn.Module,
    sources: Iterable[nn.Module] | None = None,
    trainable: Iterable[Tensor] = (),
    rows: int | None = None,
) -> Graph:
    """Run ``run_forward()`` once under a tracer and return the edges between ``modules``.

    The caller is responsible for side effects of the extra forward (buffers, RNG state): the engine restores
    both around this call.

    Args:
        model: the root module (for names, parameters and buffers).
        run_forward: calls the model's forward on the real inputs, with guessing disabled.
        modules: the parametrized modules to track (guess points and possible next modules).
        boundary: the module whose output leaves the guessing region (the root, or the chosen head).
        sources: the modules whose outputs are followed (default: all of ``modules``). Only they get edges; the
            outputs of the others are operands like any activation. Following fewer modules keeps fewer
            activations captured (a frozen backbone's layers need no edges when only prompts are guessed).
        trainable: the trainable parameters: an op that reads one of them (directly, or through parameter-only ops)
            and a followed tensor becomes an :class:`OpNode`, the op-level guess point of the guessing forward.
        rows: the batch's rows (``K`` times the batch size): a tracked module none of whose inputs has them (nor a
            followed tensor) is parameter-only, as in the guessing step. (default: ``None``, every call followed)

    Returns:
        The :class:`Graph`.
    """
    modules = list(modules)
    constants = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    graph = Graph(names={m: n for n, m in model.named_modules()})
    tracer = _Tracer(constants, {id(p) for p in trainable}, graph)
    tracer.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if boundary is model:
        graph.names.setdefault(model, "<root>")
    graph.names[model] = graph.names.get(model) or "<root>"
    tracked = set(modules)
    followed = tracked if sources is None else set(sources)

    reads_batch: list[bool] = []

    def pre(module, args, kwargs):
        if module in tracked:
            leaves = tree_flatten((args, kwargs))[0]
            for t in leaves if torch.is_grad_enabled() else ():
                for origin, chain in tracer.origins(t).items():
                    graph.edges.setdefault(origin, []).append(Edge(module, chain, tuple(t.shape), t.dtype))
            # as the guessing step decides (GuessingStep.enter_module): a module reading no batch tensor (a prompt
            # embedded once, position ids (1, L)) computes from its parameters alone: its output is parameter-derived,
            # and the op where it meets the batch is the guess point
            reads_batch.append(rows is None or type(module).__name__ == "PromptTokens" or any(
                isinstance(t, Tensor) and (tracer.origins(t) or (t.dim() > 0 and t.shape[0] == rows
                                                                 and not tracer._is_derived(t))) for t in leaves))
            tracer.inside += 1

    def post(module, args, kwargs, output):
        if module in tracked:
            tracer.inside -= 1
            graph.edges.setdefault(module, [])
            graph.calls[module] = graph.calls.get(module, 0) + 1
            batch = reads_batch.pop() if reads_batch else True
            if isinstance(output, Tensor) and torch.is_grad_enabled() and module in followed:
                own = tuple(id(p) for p in module.parameters(recurse=False) if id(p) in tracer.trainable)
                if not batch and own:  # and the trainable parameters its inputs were computed from (an MLP on a
                    # constant table: Swin V2's continuous position bias), as the guessing step keys the op they reach
                    own = tuple(dict.fromkeys((*tracer._sources(tree_flatten((args, kwargs))[0]), *own)))
                if batch or not own:
                    tracer.track(output, {module: Chain()})
                else:
                    tracer.derived[id(output)] = (weakref.ref(output), own)
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

