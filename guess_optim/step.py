"""One guessing step: the forward that injects the guesses, and the backward that turns them into estimates.

How a step runs (paper §2 and A.4; README "How it works"):

1. :meth:`GuessingStep.open` (from the model's forward pre-hook, in training mode with grad enabled) opens a
   :mod:`torch.autograd.forward_ad` dual level and makes the trainable parameters briefly not require grad: no
   reverse graph is recorded, while grad mode stays on so that the model's own ``no_grad`` regions are seen (ops run
   there get no tangent). With ``num_guesses=K`` every batch-shaped input is repeated ``K`` times along dim 0.
2. :meth:`GuessingStep.guess_point` (each guess point's forward hook) asks the estimator for a guess, adds it to the
   output's tangent and records what the estimate needs.
3. :meth:`GuessingStep.boundary` (the forward hook of the root, or of ``head=``) reads the output tangent ``ż``,
   closes everything the step opened (one :class:`~contextlib.ExitStack`, one exit path) and returns the output
   through :class:`_GuessedGradient`, whose inputs are the output and the trainable parameters.
4. ``loss.backward()`` reaches :meth:`_GuessedGradient.backward` with ``∂L/∂z``; :meth:`GuessingStep.estimate` forms the
   per-example directional derivatives ``d_b = <∂L/∂z_b, ż_b>`` and returns the estimates as the parameters'
   gradients, which autograd accumulates into ``p.grad`` (loss scaling, accumulation, DDP and clipping all work).

With ``store="recompute"`` the records keep nothing of the batch; during ``backward()`` a second step in *replay*
mode runs the forward again (same generator and RNG states) and each guess point adds its estimate at once
(:mod:`guess_optim.replay`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from .contexts import NoGradRegions, load_jvp_decompositions, parameters_frozen, primal
from .graph import Graph, GraphError
from .local_grad import product_tangent, weight_space_jvp
from .records import ActivationRecord, ExactHeadRecord, Record, WeightRecord
from .site import Site

if TYPE_CHECKING:
    from .handle import GuessHandle

__all__ = ["GuessingStep"]

_NO_REPEAT_KWARGS = frozenset({"labels", "label", "targets"})


class GuessingStep:
    """The state of one guessing forward and its backward; it owns everything it opens.

    Attributes:
        batch: ``B``, the rows of the user's batch (the forward runs on ``N = K·B`` rows).
        graph: the discovered graph (estimators that need it, or ``exact_head``), else ``None``.
        replaying: the second forward of ``store="recompute"``, driven by ``backward()``: nothing is injected and
            each guess point adds its estimate to :attr:`grads` at once.
        closed: the forward-AD level and every context of the step have been left.
    """

    def __init__(self, handle: GuessHandle, *, batch: int, graph: Graph | None, trainable: frozenset[int],
                 replaying: bool = False):
        self.handle = handle
        self.estimator = handle.estimator
        self.k = handle.num_guesses
        self.batch = batch
        self.graph = graph
        self.graph_uses = handle.graphs.uses(graph, handle.guess_points, handle.exact_head)
        self.trainable = trainable
        self.replaying = replaying
        self.closed = False
        self.records: list[Record] = []
        self.params: dict[int, Tensor] = {}  # the parameters the step estimates, in the order first met
        self.input_tangents: list[tuple[nn.Module, Tensor]] = []
        self.saved: dict[str, Any] | None = None  # store="recompute": input batch, RNG and generator states
        self.tangent: Tensor | None = None
        self.d: Tensor | None = None  # [N] directional derivatives, set in backward
        self.grad_rep: Tensor | None = None  # ∂L/∂z repeated to N rows
        self.grads: dict[int, Tensor] = {}
        self._stack = contextlib.ExitStack()

    # -------------------------------------------------------------------------------------------------- lifetime
    @classmethod
    def open(cls, handle: GuessHandle, args: tuple, kwargs: dict) -> tuple[GuessingStep, tuple, dict]:
        """Start a guessing forward on the model's inputs; returns the step and the inputs to run (repeated ``K``
        times along dim 0 when ``num_guesses=K``).

        Raises:
            RuntimeError: a BatchNorm in training mode, or a forward-AD level already open.
            ValueError: no batch-shaped input, or inputs and parameters on different device types.
        """
        batch, args, kwargs = _batch_inputs(handle, args, kwargs)
        if fwAD._current_level >= 0:
            raise RuntimeError(
                "guess_optim opens its own forward-AD dual level; the model was called inside another "
                "torch.autograd.forward_ad.dual_level(), which PyTorch does not nest"
            )
        needs_graph = handle.estimator.needs is not None or handle.exact_head
        graph = handle.graphs.get(args, kwargs) if needs_graph else None
        trainable = [p for p in handle.model.parameters() if p.requires_grad]
        step = cls(handle, batch=batch, graph=graph, trainable=frozenset(map(id, trainable)))
        if handle.store == "recompute":
            step.saved = handle.save_for_replay(args, kwargs)
        load_jvp_decompositions()
        stack = step._stack
        try:
            stack.callback(fwAD.exit_dual_level, level=fwAD.enter_dual_level())
            stack.callback(torch.set_grad_enabled, torch.is_grad_enabled())
            # No reverse graph, yet grad mode stays on so that the model's own no_grad regions are seen; fused
            # attention kernels have no forward-AD formula.
            stack.enter_context(parameters_frozen(handle.model, trainable))
            stack.enter_context(NoGradRegions())
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            step.draw_raw_tangents()
        except BaseException:
            step.close()
            raise
        return step, args, kwargs

    def close(self) -> None:
        """Leave everything the step entered (raw parameters put back, contexts, grad mode, the dual level), once."""
        if not self.closed:
            self.closed = True
            self._stack.close()

    # ----------------------------------------------------------------------------------------------- the forward
    def draw_raw_tangents(self) -> None:
        """Weight-space guesses for trainable parameters outside guess-point modules (``raw_parameters=
        "directional"``): each is swapped for a dual tensor for the duration of the forward."""
        handle = self.handle
        for module, name, p in handle.layout.raw:
            v = handle.directional_guess(p)
            record = WeightRecord(module, {name: p}, (), tangents=[{name: v}] * self.k)
            self.params.setdefault(id(p), p)
            if self.replaying:
                self.accumulate(record)
                continue
            self.records.append(record)
            module._parameters[name] = fwAD.make_dual(p.detach(), v)
            self._stack.callback(module._parameters.__setitem__, name, p)

    def guess_point(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        """A guess point's forward hook: draw the guess, record what the estimate needs, inject the tangent."""
        if not isinstance(output, Tensor):
            raise TypeError(f"guess point {self.handle.names[module]!r} returned {type(output).__name__}, not a Tensor")
        out, tangent = fwAD.unpack_dual(output)
        out = out.detach() if tangent is not None else out  # see contexts.primal
        params = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in self.trainable}
        graph = self.graph
        record, contribution = self._record(module, params, tuple(primal(a) for a in args), out)
        self._release_graph(module)
        self.handle.captured(module, record, graph)
        for p in params.values():
            self.params.setdefault(id(p), p)
        if self.replaying:
            self.accumulate(record)
            return None
        if self.handle.store == "activations":  # with recompute, keep nothing of the batch
            self.records.append(record)
        if contribution is None:
            return None
        if 0 in out.stride():  # a broadcast view (PromptTokens): a dual tensor needs its own memory
            out = out.contiguous()
        new_tangent = contribution if tangent is None else tangent + contribution
        return fwAD.make_dual(out, new_tangent.to(out.dtype))

    def _record(self, module: nn.Module, params: dict, inputs: tuple, out: Tensor) -> tuple[Record, Tensor | None]:
        handle, graph = self.handle, self.graph
        edges = graph.next_edges(module) if graph is not None else []
        if handle.exact_head and graph is not None and not edges:
            boundary_edges = graph.boundary_edges(module)
            if not boundary_edges:
                raise GraphError(
                    f"exact_head=True, but the output of {handle.names[module]!r} neither reaches another "
                    "parametrized module nor the output of the guessing region"
                )
            return ExactHeadRecord(module, params, inputs, edge=boundary_edges[0], output=out), None
        if self.estimator.space == "weight":
            tangents = [{n: self.estimator.weight_guess(p, handle.generator(p.device)) for n, p in params.items()}
                        for _ in range(self.k)]
            record = WeightRecord(module, params, inputs, tangents=tangents)
            jvp = None if self.replaying else weight_space_jvp(module, inputs, tangents, out.shape[0], handle.internal)
            return record, jvp
        site = Site(out, handle.generator(out.device), self.k, module, handle.names[module], edges, graph,
                    handle.internal, streamed=handle.store == "recompute")
        guess = self.estimator.guess(site)
        return ActivationRecord(module, params, inputs, guess=guess), guess

    def _release_graph(self, module: nn.Module) -> None:
        """A volatile graph holds this batch's activations: drop it after its last reader."""
        uses = self.graph_uses
        if uses is not None and module in uses:
            uses[module] -= 1
            if not any(n > 0 for n in uses.values()):
                self.graph = self.graph_uses = None

    def strip_input_tangent(self, module: nn.Module, args: tuple) -> tuple | None:
        """Pre-hook of a Linear/convolution: run its primal alone; :meth:`add_output_tangent` adds ``ẋ Wᵀ``."""
        if self.replaying or not args or not isinstance(args[0], Tensor):
            return None
        x, tangent = fwAD.unpack_dual(args[0])
        if tangent is None:
            return None
        self.input_tangents.append((module, tangent))
        return (x.detach(), *args[1:])  # detached: see contexts.primal

    def add_output_tangent(self, module: nn.Module, output: Tensor) -> Tensor | None:
        if not self.input_tangents or self.input_tangents[-1][0] is not module:
            return None
        _, tangent = self.input_tangents.pop()
        return fwAD.make_dual(output, product_tangent(module, tangent).to(output.dtype))

    def match_tangent_dtype(self, output: Any) -> Tensor | None:
        """Under CPU autocast, LayerNorm returns a bfloat16 value with a float32 tangent, which the next Linear
        rejects: give the tangent the value's dtype."""
        if self.replaying or not isinstance(output, Tensor):
            return None
        out, tangent = fwAD.unpack_dual(output)
        if tangent is None or tangent.dtype == out.dtype:
            return None
        return fwAD.make_dual(out, tangent.to(out.dtype))

    def boundary(self, module: nn.Module, output: Any) -> Tensor | None:
        """The end of the guessing region: close the step, return the output through :class:`_GuessedGradient`."""
        if self.replaying:
            return None
        name = self.handle.names.get(module) or "<root>"
        if not isinstance(output, Tensor):
            self.close()
            raise TypeError(
                f"the guessing region ends at {name!r}, whose output is a {type(output).__name__}, not a Tensor; "
                "pass head=<the module that produces the logits> to attach()"
            )
        out, tangent = fwAD.unpack_dual(output)
        tangent = torch.zeros_like(out) if tangent is None else tangent
        if self.k > 1:
            if out.dim() == 0 or out.shape[0] != self.k * self.batch:
                self.close()
                raise ValueError(
                    f"num_guesses={self.k} needs the output's dim 0 to be the batch ({self.k} x {self.batch}), "
                    f"got shape {tuple(out.shape)}"
                )
            out = out[: self.batch]
        out, self.tangent = out.detach(), tangent.detach()
        self.close()
        if self.handle.store == "recompute" and self.graph is not None and self.graph.volatile:
            self.graph = None  # it holds this batch's activations; the second forward rediscovers
        return _GuessedGradient.apply(self, out, *self.params.values())

    # ----------------------------------------------------------------------------------------------- the backward
    def accumulate(self, record: Record) -> None:
        """Add one record's estimate to :attr:`grads` (keyed by parameter identity: tied weights sum)."""
        for name, g in record.estimate(self.d, self.grad_rep, self.k, self.handle.internal).items():
            key = id(record.params[name])
            self.grads[key] = g if key not in self.grads else self.grads[key] + g

    def estimate(self, grad_z: Tensor) -> list[Tensor | None]:
        """The estimate of every parameter the step met, from ``∂L/∂z`` (``[B, *S_z]``); ``None`` where none."""
        k = self.k
        grad_rep = grad_z.repeat(k, *([1] * (grad_z.dim() - 1))) if k > 1 else grad_z
        tangent = self.tangent
        prod = grad_rep * tangent
        self.d = prod.reshape(tangent.shape[0], -1).sum(1) if tangent.dim() > 0 else prod.reshape(1)
        self.grad_rep = grad_rep
        if self.handle.store == "recompute":
            from .replay import replay

            self.grads = replay(self)
        else:
            for r in self.records:
                self.accumulate(r)
        params = list(self.params.values())
        out = [self.grads.get(id(p)) for p in params]
        self.records, self.grads, self.saved = [], {}, None
        return self.handle.nonfinite.apply(self.d, out, params)


class _GuessedGradient(torch.autograd.Function):
    """Identity on the boundary output ``z``; its backward returns the parameters' estimates."""

    @staticmethod
    def forward(ctx, step, z, *params):  # noqa: D401
        ctx.step = step
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad_z):
        step = ctx.step
        if step is None:
            raise RuntimeError(
                "guess_optim: a second backward through the same guessing forward (retain_graph=True) is not "
                "supported: its guesses were freed by the first backward. Sum the losses and call backward() "
                "once, or run the forward again."
            )
        ctx.step = None  # free the batch's tensors as soon as the estimate is made
        return (None, None, *step.estimate(grad_z))


def _batch_inputs(handle: GuessHandle, args: tuple, kwargs: dict) -> tuple[int, tuple, dict]:
    """Check the model's inputs and repeat the batch-shaped ones ``K`` times along dim 0 (``num_guesses=K``)."""
    for bn in handle.layout.batchnorms:
        if bn.training:
            raise RuntimeError(
                f"{type(bn).__name__} {handle.names[bn]!r} is in training mode: it mixes the examples of a "
                "batch, which breaks the per-example directional derivatives of guessed gradients (frozen or "
                "not). Put it in eval mode (bn.eval()) or use GroupNorm/LayerNorm instead."
            )
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise ValueError("guessed gradients need at least one batch-shaped tensor input to the model")
    devices = {t.device for t in leaves} | {p.device for p in handle.model.parameters()}
    if len({d.type for d in devices}) > 1:
        raise ValueError(
            f"the model's parameters and inputs are on different devices ({sorted(map(str, devices))}); "
            "move the inputs to the model's device"
        )
    batch, k = leaves[0].shape[0], handle.num_guesses
    if k > 1:
        def rep(t):
            return t.repeat(k, *([1] * (t.dim() - 1))) if (
                isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch) else t

        args = tree_map(rep, args)
        kwargs = {key: (v if key in _NO_REPEAT_KWARGS else tree_map(rep, v)) for key, v in kwargs.items()}
    return batch, args, kwargs
