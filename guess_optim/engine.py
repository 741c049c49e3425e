"""The engine: forward hooks inject guesses as tangents, autograd writes the estimates into ``p.grad``.

How one training step runs (DESIGN.md §4):

1. The root forward pre-hook (only when ``model.training`` and grad mode is on, outside inference mode) opens a
   :mod:`torch.autograd.forward_ad` dual level and makes the trainable parameters briefly not require grad: no
   reverse graph is recorded, while grad mode stays on so that the model's own ``no_grad`` regions are seen (ops run
   there get no tangent, :class:`_NoGradRegions`). With ``num_guesses=K`` it repeats every batch-shaped input ``K``
   times along dim 0.
2. Each guess point's forward hook draws its guess from what is known then (the output, the next modules' weights,
   the batch's post-activations), adds it to the output's tangent, and records what the estimate needs.
3. The boundary (the root, or ``head=``) forward hook reads the output tangent ``ż``, restores the parameters and
   closes the dual level, and returns the output through :class:`_GuessedGradient`, whose inputs are the output and
   the trainable parameters.
4. The user's ``loss.backward()`` reaches :meth:`_GuessedGradient.backward` with ``∂L/∂z`` (exact and cheap:
   autograd only went through the loss), which forms the per-example directional derivatives
   ``d_b = <∂L/∂z_b, ż_b>`` and returns the estimates as the parameters' gradients, so autograd accumulates them
   into ``p.grad`` like backprop's gradients (loss scaling, gradient accumulation, DDP, clipping all work).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .estimators import Estimator as Method
from .estimators import get_estimator as get_method
from .graph import BOUNDARY, Edge, Graph, GraphError, discover
from .guesses import (
    directional_guess,
    downstream_guess,
    isotropic_guess,
    mixing_guess,
    wt_guess,
)
from .prompts import PromptTokens

__all__ = [
    "GUESS_POINT_TYPES",
    "GuessHandle",
    "GuessingNotSupportedError",
    "NonFiniteEstimateWarning",
    "attach",
    "handle_of",
]

GUESS_POINT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    PromptTokens,
)
"""Module types that can hold trainable parameters under guessing. Each is linear in its parameters, so its
weight-space JVP is the module evaluated with the tangents in place of the parameters."""

# torch loads its forward-AD decompositions with torch.jit.script on the first make_dual, which warns on 2.14.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, *_BATCHNORM)
_NO_REPEAT_KWARGS = frozenset({"labels", "label", "targets"})
_ATTR = "_guess_optim_handle"


class GuessingNotSupportedError(RuntimeError):
    """The model contains an op through which forward-mode AD (and so guessing) cannot go."""


class NonFiniteEstimateWarning(RuntimeWarning):
    """A step's directional derivatives or estimates were not finite; the estimate was not written."""


@dataclass
class _Record:
    """What one call of a guess point contributes to the step's estimate."""

    module: nn.Module
    params: dict[str, Tensor]  # trainable parameters of the module, by local name
    inputs: tuple  # primal positional inputs of the call
    guess: Tensor | None = None  # activation space: u, [N, *S]
    tangents: list[dict[str, Tensor]] | None = None  # weight space: one {name: V} per guess block
    exact: Edge | None = None  # exact head: the edge to the boundary
    output: Tensor | None = None  # exact head: s (primal), [N, *S]
    output_rows: int = 0  # weight space: N


@dataclass
class _Step:
    """State of one guessing forward, from the root pre-hook to the boundary hook.

    In the second forward of ``store="recompute"`` (run from backward), ``level`` is ``None``: nothing is injected,
    and each guess point adds its estimate to ``grads`` at once, from ``d`` and ``grad_rep``.
    """

    level: int | None
    grad_was_enabled: bool
    graph: Graph | None
    batch: int
    records: list[_Record] = field(default_factory=list)
    closed: bool = False
    contexts: list[Any] = field(default_factory=list)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list)
    d: Tensor | None = None
    grad_rep: Tensor | None = None
    grads: dict[int, Tensor] = field(default_factory=dict)
    input_tangents: list[tuple[nn.Module, Tensor]] = field(default_factory=list)
    saved: dict[str, Any] | None = None  # store="recompute": input batch, RNG and generator states
    trainable: frozenset[int] = frozenset()  # ids of the parameters that require grad outside the forward
    graph_uses: dict[nn.Module, int] | None = None  # a volatile graph's remaining readers; released at zero

    @property
    def recomputing(self) -> bool:
        return self.level is None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device.index or 0, torch.cuda.get_rng_state(device))
    return state


@contextlib.contextmanager
def _forked_rng(state: dict[str, Any]):
    """Run with the global RNG set to ``state`` (so dropout draws the masks of the first forward), then put the
    global RNG back exactly as it was."""
    devices = [state["cuda"][0]] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"][1], state["cuda"][0])
        yield


def _power_singular_values(weight: Tensor, power: float) -> Tensor:
    """``U diag(S^p) V^T`` of ``weight`` (paper §3, Fig. 4: sharpening ``W^T`` guesses by dominant directions)."""
    u, s, vh = torch.linalg.svd(weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight,
                                full_matrices=False)
    return ((u * s.pow(power)) @ vh).to(weight.dtype)


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised from inside ``backward()``: the first frame outside torch and this package
    (the user's ``loss.backward()`` line), counted from the caller of this function."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _primal(x: Any) -> Any:
    """The values of a dual tensor, detached: ``unpack_dual``'s primal is a view that keeps the dual tensor, and so
    its tangent, alive for as long as it is held (a record would pin every layer's tangent until the step ends)."""
    if isinstance(x, Tensor):
        primal, tangent = fwAD.unpack_dual(x)
        return x if tangent is None else primal.detach()
    return x


class _NoGradRegions(TorchFunctionMode):
    """Backprop treats what a model computes under ``torch.no_grad()`` as a constant; forward-mode AD does not
    (tangents ignore grad mode). Under this mode, an op run with grad disabled sees only its inputs' primals, so its
    outputs carry no tangent, as backprop's carry no gradient. The guessing forward runs with grad enabled (and the
    parameters briefly not requiring grad, so no reverse graph is recorded) for the user's regions to be visible."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            args, kwargs = tree_map(_primal, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module, params: list[nn.Parameter]):
    """Grad enabled (the user's ``no_grad`` regions stay visible), but no reverse graph through ``params``; and
    Hugging Face gradient checkpointing off (``module.gradient_checkpointing``): without a reverse graph there is
    nothing to recompute, and a reentrant checkpoint (an autograd Function with no JVP) would stop the tangents."""
    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    for m in checkpointing:
        m.gradient_checkpointing = False
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m in checkpointing:
            m.gradient_checkpointing = True


def _own_autograd():
    """Grad enabled for the engine's own small reverse passes (replays, local VJPs), with their saved tensors kept
    as they are even inside a user's ``torch.utils.checkpoint`` region (whose hooks would defer them to a
    recomputation)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    return stack


class _GuessedGradient(torch.autograd.Function):
    """Identity on the boundary output ``z``; its backward returns the parameters' estimates."""

    @staticmethod
    def forward(ctx, engine, payload, z, *params):  # noqa: D401
        ctx.engine = engine
        ctx.payload = payload
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad_z):
        engine, payload = ctx.engine, ctx.payload
        if payload is None:
            raise RuntimeError(
                "guess_optim: a second backward through the same guessing forward (retain_graph=True) is not "
                "supported: its guesses were freed by the first backward. Sum the losses and call backward() "
                "once, or run the forward again."
            )
        ctx.payload = None  # free the batch's tensors as soon as the estimate is made
        grads = engine._estimate(payload, grad_z)
        return (None, None, None, *grads)


class GuessHandle:
    """Guessed gradients attached to a model; returned by :func:`attach`.

    ``remove()`` (or leaving the ``with`` block) removes every hook and restores the model exactly. While
    attached, every training-mode forward with grad enabled is a guessing forward, and the following
    ``backward()`` writes the estimate into ``p.grad``.

    Attributes:
        model: the attached model.
        method: the :class:`~guess_optim.guesses.Method`.
        seed: the seed of the private generator.
        num_guesses: guesses averaged per step.
        skipped_steps: number of backward passes whose estimate was not finite and was not written.
        last_step_skipped: whether the most recent backward's estimate was not finite (and so not written,
            unless ``on_nonfinite="propagate"``): the optimizer step should be skipped.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        *,
        seed: int,
        exact_head: bool,
        num_guesses: int,
        head: nn.Module | None,
        downstream_layers: int,
        distribution: str,
        on_nonfinite: str,
        store: str,
        raw_parameters: str,
        wt_power: float,
    ):
        self.model = model
        self.method = method
        self.seed = seed
        self.exact_head = exact_head or method.exact_head
        self.num_guesses = num_guesses
        self.head = head if head is not None else model
        self.downstream_layers = downstream_layers
        self.distribution = distribution
        self.on_nonfinite = on_nonfinite
        self.store = store
        self.wt_power = wt_power
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._generators: dict[torch.device, torch.Generator] = {}
        self._hooks: list[Any] = []
        self._graphs: dict[tuple, Graph] = {}
        self._step: _Step | None = None
        self._quiet = 0  # > 0 while the engine itself calls modules (discovery, local VJPs)
        self._paused = False
        self._removed = False
        self._captured: list[dict[str, Any]] | None = None
        self._recompute: _Step | None = None
        names = {m: n for n, m in model.named_modules()}
        self._names = names
        self.guess_points: list[nn.Module] = []
        self._modules: list[nn.Module] = []
        self._batchnorms: list[nn.Module] = []
        self._raw: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._forward: Any = None
        self._frozen_norms: list[nn.Module] = []
        # Modules whose tangent is carried by a separate product (exact types: a subclass may change forward).
        self._product_modules = [m for m in model.modules() if type(m) is nn.Linear or (
            type(m) in (nn.Conv1d, nn.Conv2d) and m.padding_mode == "zeros")]
        for m in model.modules():
            if isinstance(m, GUESS_POINT_TYPES):
                if any(p.requires_grad for p in m.parameters(recurse=False)):
                    self.guess_points.append(m)
                    self._modules.append(m)
                elif isinstance(m, _NORMS):
                    # A frozen normalization is traced through like a parameter-free op, so the next modules of
                    # what feeds it are the weights behind it (paper A.6: a prompt's W^T guess is built from the
                    # modules that consume it, through the frozen LayerNorm).
                    self._frozen_norms.append(m)
                else:
                    self._modules.append(m)
            elif raw_parameters == "directional":
                self._raw += [(m, n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if isinstance(m, _BATCHNORM):
                self._batchnorms.append(m)
        if method.space != "backprop":
            self._install()
        setattr(model, _ATTR, self)

    # ----------------------------------------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        for m in self._product_modules:
            # prepended: the output's tangent must be in place before the guess-point hook reads it
            self._hooks.append(m.register_forward_pre_hook(self._strip_input_tangent))
            self._hooks.append(m.register_forward_hook(self._add_output_tangent, prepend=True))
        for m in self.guess_points:
            self._hooks.append(m.register_forward_hook(self._guess_point_hook))
        for m in self._frozen_norms:
            self._hooks.append(m.register_forward_hook(self._match_tangent_dtype))
        self._hooks.append(self.head.register_forward_hook(self._boundary_hook))
        # Runs even when forward raises, so the dual level and no_grad never stay open.
        self._hooks.append(self.model.register_forward_hook(self._root_post, always_call=True))
        self._forward = self.model.__dict__.get("forward")
        if self._forward is None:
            self._forward = self.model.forward
            self.model.forward = self._forward_guarded

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :func:`attach`.

        Raises:
            RuntimeError: the handle was already removed.
        """
        if self._removed:
            raise RuntimeError("This GuessHandle was already removed; call remove() once")
        self._close_step()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.model.__dict__.get("forward") == self._forward_guarded:
            del self.model.forward
        self._graphs.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self._removed = True

    def __enter__(self) -> GuessHandle:
        return self

    def __exit__(self, *exc) -> None:
        if not self._removed:
            self.remove()

    @contextlib.contextmanager
    def capture(self):
        """Record the guesses drawn inside the block, for inspection and tests.

        Yields a list that receives one dict per guess-point call: ``module`` (qualified name), ``guess``
        (activation space: ``u``, ``[N, *S]``, else ``None``), ``tangents`` (weight space: one
        ``{param name: V}`` per guess, else ``None``) and ``next_modules`` (names of the next modules a structured
        guess was pulled back from, one per edge; empty for an isotropic guess).
        """
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    @property
    def in_internal_forward(self) -> bool:
        """``True`` while the engine runs a forward of its own (graph discovery; the second forward of
        ``store="recompute"``, run from ``backward()``). Like the step's forward, these run with grad enabled (so the
        model's ``no_grad`` regions are seen); a forward hook that records or counts the user's training forwards
        should skip them."""
        return bool(self._quiet) or self._recompute is not None

    def paused(self) -> _Paused:
        """Context manager under which forwards run the plain model and ``backward()`` computes exact gradients."""
        return _Paused(self)

    def __repr__(self) -> str:
        return (
            f"GuessHandle(method={self.method.name!r}, seed={self.seed}, num_guesses={self.num_guesses}, "
            f"exact_head={self.exact_head}, guess_points={len(self.guess_points)})"
        )

    # --------------------------------------------------------------------------------------------- generators
    def generator(self, device: torch.device) -> torch.Generator:
        """The private generator for ``device`` (seeded from :attr:`seed`; one stream per device)."""
        device = torch.device(device)
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    def state_dict(self) -> dict[str, Any]:
        """Generator states and counters, for checkpoints."""
        return {
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = int(state["seed"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        for d, s in state.get("generators", {}).items():
            self.generator(torch.device(d)).set_state(s)

    # ------------------------------------------------------------------------------------------------- hooks
    def _active(self) -> bool:
        return (
            not self._paused
            and not self._quiet
            and self.model.training
            and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
        )

    def _root_pre(self, module, args, kwargs):
        if self._recompute is not None:  # the second forward of store="recompute", driven by backward
            self._step = self._recompute
            self._draw_raw_tangents(self._step)
            return None
        if self._step is not None and not self._step.closed:
            # A previous forward raised before its boundary: never leave a dual level open.
            self._close_step()
        if not self._active():
            return None
        for bn in self._batchnorms:
            if bn.training:
                raise RuntimeError(
                    f"{type(bn).__name__} {self._names[bn]!r} is in training mode: it mixes the examples of a "
                    "batch, which breaks the per-example directional derivatives of guessed gradients (frozen or "
                    "not). Put it in eval mode (bn.eval()) or use GroupNorm/LayerNorm instead."
                )
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim() > 0]
        if not leaves:
            raise ValueError("guessed gradients need at least one batch-shaped tensor input to the model")
        devices = {t.device for t in leaves} | {p.device for p in self.model.parameters()}
        if len({d.type for d in devices}) > 1:
            raise ValueError(
                f"the model's parameters and inputs are on different devices ({sorted(map(str, devices))}); "
                "move the inputs to the model's device"
            )
        batch = leaves[0].shape[0]
        k = self.num_guesses
        if k > 1:
            rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if (  # noqa: E731
                isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch) else t
            args = tree_map(rep, args)
            kwargs = {key: (v if key in _NO_REPEAT_KWARGS else tree_map(rep, v)) for key, v in kwargs.items()}
        if fwAD._current_level >= 0:
            raise RuntimeError(
                "guess_optim opens its own forward-AD dual level; the model was called inside another "
                "torch.autograd.forward_ad.dual_level(), which PyTorch does not nest"
            )
        graph = None
        if self.method.needs is not None or self.exact_head:
            graph = self._graph_for(args, kwargs)
        saved = None
        if self.store == "recompute":
            saved = {
                "args": tree_map(_primal, args),
                "kwargs": tree_map(_primal, kwargs),
                "rng": _rng_state(leaves[0].device),
                "generators": {d: g.get_state() for d, g in self._generators.items()},
            }
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        level = fwAD.enter_dual_level()
        step = _Step(level=level, grad_was_enabled=torch.is_grad_enabled(), graph=graph, batch=batch, saved=saved,
                     trainable=frozenset(map(id, trainable)), graph_uses=self._graph_uses(graph))
        self._step = step
        try:
            # No reverse graph, yet grad mode stays on so that the model's own no_grad regions are seen; fused
            # attention kernels have no forward-AD formula.
            for ctx in (_parameters_frozen(self.model, trainable), _NoGradRegions(), sdpa_kernel([SDPBackend.MATH])):
                ctx.__enter__()
                step.contexts.append(ctx)
            self._draw_raw_tangents(step)
        except BaseException:
            self._close_step()
            raise
        return args, kwargs

    def _draw_raw_tangents(self, step: _Step) -> None:
        """Weight-space guesses for trainable parameters outside guess-point modules (``raw_parameters=
        "directional"``): swap each for a dual tensor for the duration of the forward."""
        for module, name, p in self._raw:
            v = directional_guess(p, self.generator(p.device))
            record = _Record(module, {name: p}, (), tangents=[{name: v}] * self.num_guesses)
            if step.recomputing:
                self._accumulate(step, record)
                continue
            step.records.append(record)
            module._parameters[name] = fwAD.make_dual(p.detach(), v)
            step.swapped.append((module, name, p))

    def _graph_for(self, args, kwargs) -> Graph:
        key = tuple(
            (tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else type(t)
            for t in tree_flatten((args, kwargs))[0]
        )
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        buffers = [b.detach().clone() for b in self.model.buffers()]
        devices = sorted({t.device.index or 0 for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, Tensor) and t.device.type == "cuda"})
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._quiet += 1
        try:
            with torch.random.fork_rng(devices=devices), _parameters_frozen(self.model, trainable):
                # downstream guesses walk on from the next modules' own edges; the others need the guess points'
                sources = None if self.method.needs == "downstream" else self.guess_points
                graph = discover(self.model, lambda: self.model(*args, **kwargs), self._modules, self.head, sources)
        finally:
            self._quiet -= 1
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
        if not graph.volatile:  # a volatile graph holds this batch's activations: rediscover every step
            if len(self._graphs) >= 8:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = graph
        return graph

    def _graph_uses(self, graph: Graph | None) -> dict[nn.Module, int] | None:
        """For a volatile graph: how many guess-point calls will read it (those with next modules, and the head's
        with ``exact_head``), so that the step can drop it, and the activations it captured, after the last."""
        if graph is None or not graph.volatile:
            return None
        return {m: graph.calls.get(m, 0) for m in self.guess_points
                if graph.next_edges(m) or (self.exact_head and graph.boundary_edges(m))}

    def _guess_point_hook(self, module, args, output):
        step = self._step
        if step is None or step.closed or self._quiet or not torch.is_grad_enabled():
            return None  # under the model's own no_grad, a module gets no gradient in backprop either
        if not isinstance(output, Tensor):
            raise TypeError(f"guess point {self._names[module]!r} returned {type(output).__name__}, not a Tensor")
        primal, tangent = fwAD.unpack_dual(output)
        primal = primal.detach() if tangent is not None else primal  # see _primal
        params = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in step.trainable}
        record = _Record(module, params, tuple(_primal(a) for a in args))
        graph = step.graph
        contribution = None
        if self.exact_head and graph is not None and not graph.next_edges(module):
            edges = graph.boundary_edges(module)
            if not edges:
                raise GraphError(
                    f"exact_head=True, but the output of {self._names[module]!r} neither reaches another "
                    "parametrized module nor the output of the guessing region"
                )
            record.exact, record.output = edges[0], primal
        elif self.method.space == "weight":
            record.tangents = [
                {n: directional_guess(p, self.generator(p.device)) for n, p in params.items()}
                for _ in range(self.num_guesses)
            ]
            if not step.recomputing:
                record.output_rows = primal.shape[0]
                contribution = self._weight_space_jvp(module, record)
        else:
            contribution = record.guess = self._activation_guess(module, primal, graph)
        if step.graph_uses is not None and module in step.graph_uses:
            step.graph_uses[module] -= 1
            if not any(n > 0 for n in step.graph_uses.values()):
                step.graph = step.graph_uses = None  # a volatile graph holds activations: free them as soon as possible
        if self._captured is not None:
            nexts = [self._names[e.consumer] for e in graph.next_edges(module)] if (
                graph is not None and record.guess is not None and self.method.needs is not None) else []
            self._captured.append({"module": self._names[module], "guess": record.guess, "tangents": record.tangents,
                                   "next_modules": nexts})
        if step.recomputing:
            self._accumulate(step, record)
            return None
        if self.store == "recompute":  # keep nothing of the batch; the second forward regenerates it
            record = _Record(module, params, ())
        step.records.append(record)
        if contribution is None:
            return None
        if 0 in primal.stride():  # a broadcast view (PromptTokens): a dual tensor needs its own memory
            primal = primal.contiguous()
        new_tangent = contribution if tangent is None else tangent + contribution
        return fwAD.make_dual(primal, new_tangent.to(primal.dtype))

    def _strip_input_tangent(self, module, args):
        """Forward-mode AD through ``F.linear`` costs about twice a primal and a tangent matmul done apart (it
        materializes the weight's zero tangent), and through a convolution about 1.3 times: run the primal here, and
        add the tangent ``ẋ Wᵀ`` (``conv(ẋ, W)``, no bias) in the forward hook."""
        step = self._step
        if step is None or step.closed or self._quiet or step.recomputing or not args or not torch.is_grad_enabled():
            return None
        if not isinstance(args[0], Tensor):
            return None
        primal, tangent = fwAD.unpack_dual(args[0])
        if tangent is None:
            return None
        step.input_tangents.append((module, tangent))
        return (primal.detach(), *args[1:])  # detached: see _primal

    def _add_output_tangent(self, module, args, output):
        step = self._step
        if step is None or step.closed or not step.input_tangents or step.input_tangents[-1][0] is not module:
            return None
        _, tangent = step.input_tangents.pop()
        if type(module) is nn.Linear:
            out_tangent = F.linear(tangent, module.weight)
        else:
            conv = F.conv1d if type(module) is nn.Conv1d else F.conv2d
            out_tangent = conv(tangent, module.weight, None, module.stride, module.padding, module.dilation,
                               module.groups)
        return fwAD.make_dual(output, out_tangent.to(output.dtype))

    def _match_tangent_dtype(self, module, args, output):
        """Under CPU autocast, LayerNorm returns a bfloat16 value with a float32 tangent, which the next Linear
        rejects: give the tangent the value's dtype."""
        step = self._step
        if step is None or step.closed or self._quiet or step.recomputing or not isinstance(output, Tensor):
            return None
        primal, tangent = fwAD.unpack_dual(output)
        if tangent is None or tangent.dtype == primal.dtype:
            return None
        return fwAD.make_dual(primal, tangent.to(primal.dtype))

    def _weight_space_jvp(self, module, record: _Record) -> Tensor:
        """The output tangent of weight perturbations ``V_j`` (one per guess block of rows): the module evaluated
        with ``V`` in place of its parameters, as every guess-point type is linear in its parameters."""
        k = self.num_guesses
        rows = record.output_rows
        # Split batch-shaped inputs into the K guess blocks; an int input equal to the number of rows is a batch
        # size (PromptTokens(batch_size)) and becomes the block's size.
        chunks = [
            torch.chunk(a, k, dim=0) if isinstance(a, Tensor)
            else [a // k if isinstance(a, int) and not isinstance(a, bool) and a == rows else a] * k
            for a in record.inputs
        ]
        zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters(recurse=False) if n not in record.params}
        blocks = []
        self._quiet += 1
        try:
            for j in range(k):
                inputs = tuple(c[j] for c in chunks)
                params = {**zeros, **record.tangents[j]}
                if type(module) is nn.Linear and len(inputs) == 1:  # skips functional_call's per-call overhead
                    blocks.append(F.linear(inputs[0], params["weight"], params.get("bias")))
                else:
                    blocks.append(functional_call(module, params, inputs))
        finally:
            self._quiet -= 1
        return torch.cat(blocks, dim=0)

    def _activation_guess(self, module, primal: Tensor, graph: Graph | None) -> Tensor:
        gen = self.generator(primal.device)
        target = self.method.needs
        edges = graph.next_edges(module) if graph is not None else []
        if target is None or not edges:
            # activation perturbation; and the output layer of every method (paper A.4)
            return isotropic_guess(primal, gen)
        if self.store == "recompute" and self.method.name == "wt":
            streamed = self._streamed_wt_guess(primal, edges, gen)
            if streamed is not None:
                return streamed
        leaf = primal.detach().requires_grad_(True)
        self._quiet += 1
        try:
            with _own_autograd():
                outputs, lifts = self._targets(module, leaf, graph, target)
        finally:
            self._quiet -= 1
        # A target whose lift is a weight W stands for F.linear(x, W): its VJP is ε @ W, so the next layer's
        # forward is never computed for W^T guesses (one matmul, not two).
        targets = [o.detach() if w is None else o.new_empty(()).expand(*o.shape[:-1], w.shape[0])
                   for o, w in zip(outputs, lifts, strict=True)]

        def pullback(cotangents):
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
            with _own_autograd():
                (g,) = torch.autograd.grad([o for o, _ in summed.values()], leaf, [c for _, c in summed.values()],
                                           allow_unused=True)
            return torch.zeros_like(primal) if g is None else g

        if self.method.name == "mixing":
            return mixing_guess(targets, pullback, gen, self.num_guesses)
        if target == "next":
            return wt_guess(targets, pullback, gen)
        return downstream_guess(targets, pullback, gen, self.distribution)

    def _streamed_wt_guess(self, primal: Tensor, edges: list, gen: torch.Generator) -> Tensor | None:
        """``W^T`` guess of ``store="recompute"`` when every next module is a Linear: each edge's chain is replayed,
        given its summed cotangent ``Σ ε_j W_j`` and pulled back on its own, so only one edge's values are alive at a
        time (a prompt's next modules are every layer's projections). Shared prefixes are replayed again per edge:
        compute for memory. Same draws, in the same order, as the one-pass pullback. ``None``: not applicable."""
        if any(type(e.consumer) is not nn.Linear or e.shape is None for e in edges):
            return None
        lifts = [e.consumer.weight.detach() for e in edges]
        if self.wt_power != 1.0:
            lifts = [_power_singular_values(w, self.wt_power) for w in lifts]
        targets = [primal.new_empty((), dtype=e.dtype).expand(*e.shape[:-1], w.shape[0])
                   for e, w in zip(edges, lifts, strict=True)]

        def pullback(cotangents):
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
                self._quiet += 1
                try:
                    with _own_autograd():
                        x = chain(leaf, {})
                        (g,) = torch.autograd.grad(x, leaf, summed.to(x.dtype), allow_unused=True)
                finally:
                    self._quiet -= 1
                if g is not None:
                    total += g
            return total

        return wt_guess(targets, pullback, gen)

    def _targets(self, module, s: Tensor, graph: Graph, target: str) -> tuple[list[Tensor], list[Tensor | None]]:
        """What the guess at ``module`` is pulled back from, as differentiable functions of ``s``.

        Returns the outputs and, per output, ``None`` or a weight ``W``: the target is then ``F.linear(output, W)``
        (a Linear next module, whose forward is not needed for a VJP).
        """
        out, lifts = [], []
        memo: dict[int, Tensor] = {}  # the edges' chains share their prefixes (a residual stream)
        for edge in graph.next_edges(module):
            x = edge.chain(s, memo)
            if target == "post":
                out.append(x)
                lifts.append(None)
            elif target == "next" and type(edge.consumer) is nn.Linear:
                w = edge.consumer.weight.detach()
                out.append(x)
                lifts.append(w if self.wt_power == 1.0 else _power_singular_values(w, self.wt_power))
            elif target == "next":
                out.append(edge.consumer(x))
                lifts.append(None)
            else:
                y = self._downstream(edge.consumer, edge.consumer(x), graph, self.downstream_layers)
                out.extend(y)
                lifts.extend([None] * len(y))
        return out, lifts

    def _downstream(self, module, y: Tensor, graph: Graph, layers: int) -> list[Tensor]:
        """Post-activations ``layers`` modules downstream of the guess point, given ``y`` = next module output."""
        chains = []
        for e in graph.edges.get(module, []):
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
                out.extend(self._downstream(e.consumer, e.consumer(x), graph, layers - 1))
        return out

    def _boundary_hook(self, module, args, output):
        step = self._step
        if step is None or step.closed or self._quiet or step.recomputing:
            return None
        if not isinstance(output, Tensor):
            self._close_step()
            raise TypeError(
                f"the guessing region ends at {self._names.get(module) or '<root>'!r}, whose output is a "
                f"{type(output).__name__}, not a Tensor; pass head=<the module that produces the logits> to attach()"
            )
        primal, tangent = fwAD.unpack_dual(output)
        if tangent is None:
            tangent = torch.zeros_like(primal)
        k, batch = self.num_guesses, step.batch
        if k > 1:
            if primal.dim() == 0 or primal.shape[0] != k * batch:
                self._close_step()
                raise ValueError(
                    f"num_guesses={k} needs the output's dim 0 to be the batch ({k} x {batch}), "
                    f"got shape {tuple(primal.shape)}"
                )
            primal = primal[:batch]
        primal, tangent = primal.detach(), tangent.detach()
        self._close_step()
        if self.store == "recompute" and step.graph is not None and step.graph.volatile:
            step.graph = None  # it holds this batch's activations; the second forward rediscovers
        params = list({id(p): p for r in step.records for p in r.params.values()}.values())
        payload = {"step": step, "tangent": tangent, "params": params}
        return _GuessedGradient.apply(self, payload, primal, *params)

    def _root_post(self, module, args, output):
        if self._recompute is not None:
            return None
        if self._step is not None and not self._step.closed:
            self._close_step()
            if self.head is not self.model:
                raise RuntimeError(
                    f"head module {self._names.get(self.head)!r} was not called during the model's forward"
                )
        return None

    def _close_step(self) -> None:
        step = self._step
        self._step = None
        if step is None or step.closed:
            return
        step.closed = True
        for module, name, p in step.swapped:
            module._parameters[name] = p
        for ctx in reversed(step.contexts):
            ctx.__exit__(None, None, None)
        torch.set_grad_enabled(step.grad_was_enabled)
        if step.level is not None:
            fwAD.exit_dual_level(level=step.level)

    def _forward_guarded(self, *args, **kwargs):
        """The model's own forward, with forward-AD failures turned into an error that names the op and the fix."""
        try:
            return self._forward(*args, **kwargs)
        except NotImplementedError as e:
            if self._step is None or not re.search(r"forward[ -]?(mode )?AD|forward-mode|jvp", str(e)):
                raise
            self._close_step()
            raise GuessingNotSupportedError(
                f"an op in the model has no forward-mode AD formula, so guessed gradients cannot flow through it "
                f"({e}). Replace the op (e.g. a fused/custom kernel) by an equivalent made of standard PyTorch ops, "
                "freeze the parameters before it, or train with method='backprop'."
            ) from e

    # ------------------------------------------------------------------------------------------- estimates
    def _estimate(self, payload: dict, grad_z: Tensor) -> list[Tensor | None]:
        """Per-example directional derivatives and the estimate of every trainable parameter of the step."""
        k = self.num_guesses
        step: _Step = payload["step"]
        tangent: Tensor = payload["tangent"]
        grad_rep = grad_z.repeat(k, *([1] * (grad_z.dim() - 1))) if k > 1 else grad_z
        d = (grad_rep * tangent).reshape(tangent.shape[0], -1).sum(1) if tangent.dim() > 0 else (
            (grad_rep * tangent).reshape(1))
        step.d, step.grad_rep = d, grad_rep
        if self.store == "recompute":
            self._recompute_estimates(step)
        else:
            for r in step.records:
                self._accumulate(step, r)
        out = [step.grads.get(id(p)) for p in payload["params"]]
        step.records, step.grads, step.saved = [], {}, None
        norms = torch._foreach_norm([g for g in out if g is not None]) if any(g is not None for g in out) else []
        # one device sync per step; a norm is finite exactly when every element is (barring float overflow of the
        # norm itself, which would flag an estimate too large to use anyway)
        finite = bool(torch.isfinite(torch.stack([d.sum(), *norms])).all())
        self.last_step_skipped = not finite
        if not finite and self.on_nonfinite == "propagate":
            self.skipped_steps += 1  # written as is, for a GradScaler to see the overflow and back off
        elif not finite:
            msg = ("non-finite directional derivative or estimate: the estimate was not written to p.grad "
                   f"(skipped steps so far: {self.skipped_steps + 1})")
            if self.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            self.skipped_steps += 1
            warnings.warn(msg, NonFiniteEstimateWarning, stacklevel=_user_stacklevel())
            return [None] * len(out)
        return [None if g is None else g.to(p.dtype) for g, p in zip(out, payload["params"], strict=True)]

    def _accumulate(self, step: _Step, r: _Record) -> None:
        for name, g in self._record_estimate(r, step.d, step.grad_rep, self.num_guesses).items():
            key = id(r.params[name])
            step.grads[key] = g if key not in step.grads else step.grads[key] + g

    def _recompute_estimates(self, step: _Step) -> None:
        """``store="recompute"``: run the forward again with the step's generator and RNG states; each guess point
        regenerates its input and guess and adds its estimate at once, so no activation outlives its layer."""
        saved = step.saved
        again = _Step(level=None, grad_was_enabled=False, graph=step.graph, batch=step.batch, trainable=step.trainable)
        trainable = [p for p in self.model.parameters() if id(p) in step.trainable]
        needs_graph = self.method.needs is not None or self.exact_head
        again.d, again.grad_rep = step.d, step.grad_rep
        current = {d: g.get_state() for d, g in self._generators.items()}
        for d, state in saved["generators"].items():
            self._generators[d].set_state(state)
        for d in set(self._generators) - set(saved["generators"]):
            self._generators[d].manual_seed(self.seed)
        self._recompute = again
        buffers = [b.detach().clone() for b in self.model.buffers()]  # the user's forward already updated them
        try:
            # the same attention kernel as the first forward, so attention dropout draws the same masks
            with _forked_rng(saved["rng"]), _parameters_frozen(self.model, trainable), sdpa_kernel([SDPBackend.MATH]):
                if again.graph is None and needs_graph:
                    self._recompute = None
                    again.graph = self._graph_for(saved["args"], saved["kwargs"])
                    again.graph_uses = self._graph_uses(again.graph)
                    self._recompute = again
                self.model(*saved["args"], **saved["kwargs"])
        finally:
            self._recompute = None
            self._step = None
            for d, state in current.items():
                self._generators[d].set_state(state)
            with torch.no_grad():
                for b, value in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(value)
        step.grads = again.grads

    def _record_estimate(self, r: _Record, d: Tensor, grad_rep: Tensor, k: int) -> dict[str, Tensor]:
        if r.tangents is not None:  # weight space: (Σ_b d_b) V, averaged over the K guesses
            per_block = d.reshape(k, -1).sum(1)
            if k == 1:  # one weight-sized pass
                return {n: per_block[0] * r.tangents[0][n] for n in r.params}
            return {n: sum(per_block[j] * r.tangents[j][n] for j in range(k)) / k for n in r.params}
        if r.exact is not None:  # exact local gradient of the head
            s = r.output.detach().requires_grad_(True)
            with _own_autograd():
                (g_s,) = torch.autograd.grad(r.exact.chain(s), s, grad_rep)
            return self._local_vjp(r, g_s / k if k > 1 else g_s)
        u = r.guess
        scale = d / k if k > 1 else d  # averaging the K guesses, folded into d_b (no weight-sized division)
        grad_out = u * scale.reshape(-1, *([1] * (u.dim() - 1))).to(u.dtype)
        return self._local_vjp(r, grad_out)

    def _local_vjp(self, r: _Record, grad_out: Tensor) -> dict[str, Tensor]:
        """``∂<grad_out, module(x)>/∂θ`` through the single module ``r.module`` (paper A.4's one-layer backward)."""
        m = r.module
        if type(m) is nn.Linear and len(r.inputs) == 1:
            x = r.inputs[0]
            go = grad_out.reshape(-1, grad_out.shape[-1])
            out = {}
            if "weight" in r.params:
                out["weight"] = go.T.to(x.dtype) @ x.reshape(-1, x.shape[-1])
            if "bias" in r.params:
                out["bias"] = go.sum(0)
            return out
        if (type(m) in (nn.Conv1d, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and len(r.inputs) == 1 and r.inputs[0].dim() == m.weight.dim()):
            # the weight (and bias) gradient of the convolution from its input alone: no forward to re-run
            x = r.inputs[0]
            _, g_w, g_b = torch.ops.aten.convolution_backward(
                grad_out.to(x.dtype), x, x.new_empty(1).expand(m.weight.shape),
                [m.out_channels] if "bias" in r.params else None, m.stride, m.padding, m.dilation, False,
                [0] * (x.dim() - 2), m.groups, (False, "weight" in r.params, "bias" in r.params))
            return {n: g for n, g in (("weight", g_w), ("bias", g_b)) if n in r.params}
        names = list(r.params)
        leaves = {n: r.params[n].detach().requires_grad_(True) for n in names}
        self._quiet += 1
        try:
            with _own_autograd():
                y = functional_call(m, leaves, r.inputs)
                gs = torch.autograd.grad(y, [leaves[n] for n in names], grad_out, allow_unused=True)
        finally:
            self._quiet -= 1
        return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs, strict=True)}


def handle_of(model: nn.Module) -> GuessHandle | None:
    """The :class:`GuessHandle` attached to ``model``, or ``None``."""
    return getattr(model, _ATTR, None)


class _Paused:
    def __init__(self, handle: GuessHandle):
        self.handle = handle

    def __enter__(self):
        self.prev = self.handle._paused
        self.handle._paused = True
        return self.handle

    def __exit__(self, *exc):
        self.handle._paused = self.prev


def attach(
    model: nn.Module,
    method: str = "wt",
    *,
    seed: int | None = None,
    exact_head: bool = False,
    num_guesses: int = 1,
    head: nn.Module | None = None,
    downstream_layers: int = 1,
    distribution: str | None = None,
    on_nonfinite: str = "skip",
    store: str = "activations",
    raw_parameters: str = "error",
    wt_power: float = 1.0,
) -> GuessHandle:
    """Train ``model`` with guessed gradients: an unchanged ``loss.backward()`` writes the estimate to ``p.grad``.

    Example::

        handle = attach(model, method="wt", seed=0)
        loss = F.cross_entropy(model(x), y)   # any loss, any reduction
        loss.backward()                       # estimate of ∂loss/∂p in every trainable p.grad
        opt.step()
        handle.remove()                       # the model is exactly as before

    Guessing happens in training-mode forwards with grad enabled; ``eval()``, ``torch.no_grad()`` and
    ``torch.inference_mode()`` run the plain model. Dim 0 of the model's inputs and output must be the batch
    (each example's output may depend only on that example: BatchNorm must be in eval mode).

    Args:
        model: any ``nn.Module`` whose trainable parameters live in modules of :data:`GUESS_POINT_TYPES`
            (``nn.Linear`` on any leading shape, ``nn.Conv1d/2d``, ``nn.LayerNorm``, ``nn.GroupNorm``,
            ``nn.Embedding``, eval-mode BatchNorm) with parameter-free ops (activations, reshapes, pooling,
            dropout) in between.
        method: one of :data:`~guess_optim.guesses.METHODS`: ``"backprop"``, ``"directional"``,
            ``"activation"``, ``"mixing"``, ``"wt"``, ``"downstream"``, ``"self-sharpening"`` (paper §2, A.4;
            definitions in :mod:`guess_optim.guesses`). (default: ``"wt"``)
        seed: seed of the handle's private ``torch.Generator``; the same seed gives bit-identical estimates. The
            global RNG is never used. ``None`` draws a seed from the OS. (default: ``None``)
        exact_head: give the output layer(s) — guess points with no next module — their exact gradient, which is
            local (computed from ``∂L/∂z`` without backprop through the network). Always on for
            ``"self-sharpening"``. (default: ``False``)
        num_guesses: ``K`` independent guesses averaged per step (paper Fig. 3); costs a forward over ``K x`` the
            batch. (default: 1)
        head: the module whose output ends the guessing region, for models whose output is not a tensor (Hugging
            Face ``ModelOutput``) or that compute their loss inside ``forward``. (default: the model itself)
        downstream_layers: ``l`` of ``"downstream"``/``"self-sharpening"`` (paper Fig. 5). (default: 1)
        distribution: law of the downstream guess ``ε``: ``"normal"``, ``"uniform"`` (``U[0, 1)``) or
            ``"symmetric-uniform"`` (``U(-1, 1)``). (default: the method's own: uniform for self-sharpening)
        on_nonfinite: ``"skip"`` (warn with :class:`NonFiniteEstimateWarning`, write no estimate, count it in
            ``handle.skipped_steps``), ``"raise"`` (``FloatingPointError``) or ``"propagate"`` (write it as backprop
            would, and count it: for ``torch.amp.GradScaler``, whose ``step()`` needs to see the overflow to skip
            the step and back off the scale). (default: ``"skip"``)
        store: ``"activations"`` keeps each guess point's input and guess from the forward to the backward (memory
            like backprop's); ``"recompute"`` keeps only the input batch and the generator/RNG states, and runs a
            second forward during ``backward()`` that regenerates them one layer at a time (memory near inference's,
            one extra forward of compute; same estimate). (default: ``"activations"``)
        raw_parameters: what to do with trainable parameters held by modules that are not guess points (e.g. a
            ViT's ``cls_token``): ``"error"`` refuses them at attach time; ``"directional"`` gives them a
            weight-space guess ``V ~ N(0, I)`` (one per step, shared by the ``num_guesses`` blocks) for every
            method. (default: ``"error"``)
        wt_power: research variant of ``"wt"`` (paper §3, Fig. 4): build the guess from ``U diag(S^p) V^T`` of
            each next ``nn.Linear`` weight instead of the weight itself; ``p > 1`` lets a few singular directions
            dominate. (default: 1.0, the plain method)

    Returns:
        The :class:`GuessHandle` (also a context manager).

    Raises:
        ValueError: unknown method, bad ``num_guesses``/``downstream_layers``/``distribution``/``on_nonfinite``,
            a trainable parameter in an unsupported module type, no trainable parameter at all, or a model
            compiled with ``torch.compile``.
        RuntimeError: the model already has a handle attached.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() expects an nn.Module, got {type(model).__name__}")
    m = get_method(method)
    if isinstance(num_guesses, bool) or not isinstance(num_guesses, int) or num_guesses < 1:
        raise ValueError(f"Invalid num_guesses: {num_guesses!r}; expected an int >= 1")
    if isinstance(downstream_layers, bool) or not isinstance(downstream_layers, int) or downstream_layers < 1:
        raise ValueError(f"Invalid downstream_layers: {downstream_layers!r}; expected an int >= 1")
    if m.space == "backprop" and (num_guesses != 1 or exact_head or store != "activations"):
        raise ValueError(
            "num_guesses, exact_head and store apply to guessed methods; method='backprop' computes the exact "
            "gradient (leave them at their defaults)"
        )
    if distribution is None:
        distribution = getattr(m, "distribution", "normal")
    if distribution not in ("normal", "uniform", "symmetric-uniform"):
        raise ValueError(
            f"Invalid distribution: {distribution!r}; expected 'normal', 'uniform' or 'symmetric-uniform'"
        )
    if on_nonfinite not in ("skip", "raise", "propagate"):
        raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r}; expected 'skip', 'raise' or 'propagate'")
    if not isinstance(wt_power, (int, float)) or not math.isfinite(wt_power) or wt_power <= 0:
        raise ValueError(f"Invalid wt_power: {wt_power!r}; expected a finite float > 0")
    if wt_power != 1.0 and method != "wt":
        raise ValueError(f"wt_power applies to method='wt' only, got method={method!r}")
    if store not in ("activations", "recompute"):
        raise ValueError(f"Invalid store: {store!r}; expected 'activations' or 'recompute'")
    if raw_parameters not in ("error", "directional"):
        raise ValueError(f"Invalid raw_parameters: {raw_parameters!r}; expected 'error' or 'directional'")
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed: {seed!r}; expected a non-negative int or None")
    if hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule":
        raise ValueError(
            "attach() got a torch.compile'd model; attach to the original module (model._orig_mod) instead: "
            "forward-mode guessing runs eagerly"
        )
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        raise RuntimeError(
            f"this model already has guessed gradients attached ({existing!r}); call handle.remove() first "
            "(guess_optim.handle_of(model).remove() if you have no handle, e.g. on a deep copy)"
        )
    if head is not None and not any(head is mod for mod in model.modules()):
        raise ValueError("head must be a submodule of the model")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if m.space != "backprop" and raw_parameters == "error":
        for name, mod in model.named_modules():
            own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(mod, GUESS_POINT_TYPES):
                supported = ", ".join(t.__name__ for t in GUESS_POINT_TYPES)
                raise ValueError(
                    f"module {name or '<root>'!r} ({type(mod).__name__}) has trainable parameters {own}, but "
                    f"guessed gradients support trainable parameters only in: {supported}. Freeze it "
                    "(requires_grad_(False)), pass raw_parameters='directional' to guess them in weight space, "
                    "or use method='backprop'."
                )
    return GuessHandle(
        model,
        m,
        seed=seed,
        exact_head=exact_head,
        num_guesses=num_guesses,
        head=head,
        downstream_layers=downstream_layers,
        distribution=distribution,
        on_nonfinite=on_nonfinite,
        store=store,
        raw_parameters=raw_parameters,
        wt_power=float(wt_power),
    )


