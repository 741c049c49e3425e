"""One guessing step: the forward that injects the guesses, and the backward that turns them into estimates.

How a step runs (paper §2 and A.4; README "How it works"):

1. :meth:`GuessingStep.open` (from the model's forward pre-hook, in training mode with grad enabled) opens a
   :mod:`torch.autograd.forward_ad` dual level and makes the trainable parameters briefly not require grad: no
   reverse graph is recorded, while grad mode stays on so that the model's own ``no_grad`` regions are seen. The
   forward runs under :class:`~guess_optim.ops.GuessingMode`. With ``num_guesses=K`` every batch-shaped input is
   repeated ``K`` times along dim 0.
2. Guess points — the modules with fast paths (:meth:`GuessingStep.guess_point`, from their forward hooks) and every
   other op where a trainable parameter meets the batch (:mod:`guess_optim.ops`) — ask the estimator for a guess,
   add it to the output's tangent and record what the estimate needs.
3. Every output of the guessing region that carries a tangent (the head's, and what the model returns) leaves
   through :mod:`guess_optim.boundary`; the step then closes everything it opened (one
   :class:`~contextlib.ExitStack`, one exit path).
4. ``loss.backward()`` hands ``∂L/∂z`` of each output to the step; :meth:`GuessingStep.estimate` forms the
   per-example directional derivatives ``d_b = Σ_i <∂L/∂z_{i,b}, ż_{i,b}>`` and returns the estimates as the
   parameters' gradients, which autograd accumulates into ``p.grad`` (loss scaling, accumulation, DDP and clipping
   all work).

With ``store="recompute"`` the records keep nothing of the batch; during ``backward()`` a second step in *replay*
mode runs the forward again (same generator and RNG states) and each guess point adds its estimate at once
(:mod:`guess_optim.replay`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .boundary import Estimate, collect
from .contexts import load_jvp_decompositions, parameters_frozen, primal, user_stacklevel
from .errors import GuessingNotSupportedError
from .estimators import Directional
from .graph import Graph, GraphError, op_key
from .guesses import isotropic_guess, zero_padding
from .local_grad import product_tangent, weight_space_jvp
from .ops import ROWS, GuessingMode, Rows, Tracker, from_rows, to_rows
from .prompts import PromptTokens
from .records import ActivationRecord, ExactHeadRecord, InputRecord, Record, WeightRecord
from .release import GradientRelease
from .replay import save_for_replay
from .site import Site

if TYPE_CHECKING:
    from .handle import GuessHandle

__all__ = ["GuessingStep", "ProductTangents"]

REGENERATE_MIN_BYTES = 1 << 18
"""A regenerable estimator's guess at least this large (256 KiB) is drawn again in backward from the generator state
instead of kept: memory where it matters; a smaller one is kept (drawing twice costs more than it saves on small
layers). The estimate is the same either way."""

_NO_REPEAT_KWARGS = frozenset({"labels", "label", "targets"})
_RAW_ESTIMATOR = Directional()  # raw_parameters="directional" with an activation-space method


class GuessingStep:
    """The state of one guessing forward and its backward; it owns everything it opens.

    Attributes:
        batch: ``B``, the rows of the user's batch; ``rows``: ``N = K·B``, the rows the forward runs on.
        graph: the discovered graph (estimators that need it, or ``exact_head``), else ``None``.
        replaying: the second forward of ``store="recompute"``, driven by ``backward()``: nothing is injected and
            each guess point adds its estimate to :attr:`grads` at once.
        closed: the forward-AD level and every context of the step have been left.
    """

    def __init__(self, handle: GuessHandle, *, batch: int, graph: Graph | None, trainable: dict[int, Tensor],
                 replaying: bool = False):
        self.handle = handle
        self.estimator = handle.estimator
        self.k = handle.num_guesses
        self.batch, self.rows = batch, batch * handle.num_guesses
        self.graph = graph
        self.cached_graph = graph if graph is not None and not graph.volatile else None  # checked after the forward
        self.graph_uses = handle.graphs.uses(graph, handle.guess_points, handle.exact_head)
        self.trainable = trainable
        self.weight_space_ops = self.estimator.space == "weight" or handle.raw_parameters == "directional"
        self.replaying = replaying
        self.closed = False
        self.head_called = False
        self.tracker = Tracker(self.rows)
        self.fast_active: dict[int, int] = {}  # parameters of fast-path modules being called
        self.fast_calls: list[bool] = []
        self._input_rows_dim = 0  # where the rows are in the current fast-path guess point's input (_rows)
        self.module_calls: dict[nn.Module, int] = {}  # calls of each fast-path guess point (a cached graph's check)
        self.op_counts: dict[tuple, int] = {}  # occurrences of each op-level guess point (graph.op_nodes' keys)
        self.records: list[Record] = []
        self.params: dict[int, Tensor] = {}  # what the step may estimate: trainable parameters, inputs needing grad
        self.inputs: list[tuple[Tensor, InputRecord]] = []
        self.products = ProductTangents(self)
        self.saved: dict[str, Any] | None = None  # store="recompute": input batch, RNG and generator states
        self.anchor: Tensor | None = None
        self.tangents: list[Tensor] = []  # the tangents of the collected outputs
        self.grad_z: dict[int, Tensor] = {}  # ∂L/∂z of the collected outputs, set in backward
        self.d: Tensor | None = None  # [N] directional derivatives, set in backward
        self.grad_rep: Tensor | None = None  # ∂L/∂z of the first collected output, repeated to N rows
        self.grads: dict[int, Tensor] = {}
        self.release: GradientRelease | None = None  # gradient_release=True: delivers each estimate once complete
        self._stack = contextlib.ExitStack()

    # -------------------------------------------------------------------------------------------------- lifetime
    @classmethod
    def open(cls, handle: GuessHandle, args: tuple, kwargs: dict) -> tuple[GuessingStep, tuple, dict]:
        """Start a guessing forward on the model's inputs; returns the step and the inputs to run (repeated ``K``
        times along dim 0 when ``num_guesses=K``; inputs that require grad become guess points).

        Raises:
            RuntimeError: a forward-AD level already open.
            ValueError: no batch-shaped input, or inputs and parameters on different device types.
        """
        batch, args, kwargs, needing_grad = _batch_inputs(handle, args, kwargs)
        if fwAD._current_level >= 0:
            raise RuntimeError(
                "guess_optim opens its own forward-AD dual level; the model was called inside another "
                "torch.autograd.forward_ad.dual_level(), which PyTorch does not nest"
            )
        needs_graph = handle.estimator.needs is not None or handle.exact_head
        trainable = {id(p): p for p in handle.model.parameters() if p.requires_grad}
        graph = handle.graphs.get(args, repeat_labels(kwargs, batch, handle.num_guesses),
                                  list(trainable.values()), batch * handle.num_guesses) if needs_graph else None
        computed = [n for n, p in handle.model.named_parameters() if p.requires_grad and not p.is_leaf]
        if computed:
            raise GuessingNotSupportedError(
                f"the model's parameter {computed[0]!r} is a computed tensor, not a leaf (torch.func.functional_call "
                "with fast weights, as in MAML): its gradient needs derivatives through the computation that made it, "
                "which guessed gradients do not give. Call the model with its own parameters, or use "
                "method='backprop' (or handle.paused()) for this step."
            )
        step = cls(handle, batch=batch, graph=graph, trainable=trainable)
        if handle.gradient_release:
            step.release = GradientRelease(handle, trainable)
        if handle.store == "recompute":
            step.saved = save_for_replay(handle, args, kwargs)
            step.saved["needing_grad"] = needing_grad
        load_jvp_decompositions()
        stack = step._stack
        try:
            # released parameters get their estimates apart (guess_optim.release): one leaf stands for them all
            anchored = trainable.values() if step.release is None else step.release.anchored()
            step.anchor = Estimate.apply(step, *anchored, *needing_grad.values())
            step.params = {id(t): t for t in (*trainable.values(), *needing_grad.values())}
            stack.callback(fwAD.exit_dual_level, level=fwAD.enter_dual_level())
            stack.callback(torch.set_grad_enabled, torch.is_grad_enabled())
            stack.callback(step.tracker.clear)
            # No reverse graph, yet grad mode stays on so that the model's own no_grad regions are seen; fused
            # attention kernels have no forward-AD formula.
            stack.enter_context(parameters_frozen(handle.model, list(trainable.values())))
            stack.enter_context(GuessingMode(step))
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            with handle.internal():
                args, kwargs = step.guess_inputs(args, kwargs, needing_grad)
        except BaseException:
            step.close()
            raise
        return step, args, kwargs

    def close(self) -> None:
        """Leave everything the step entered (contexts, grad mode, the dual level), once."""
        if not self.closed:
            self.closed = True
            self.anchor = None  # its node holds the step: no cycle, the step goes with the graph (or at once, unused)
            self._stack.close()

    # ----------------------------------------------------------------------------------------------- the forward
    def guess_inputs(self, args: tuple, kwargs: dict, needing_grad: dict[int, Tensor]) -> tuple[tuple, dict]:
        """Mark the batch-shaped inputs; an input that requires grad (``needing_grad``: leaf position → the user's
        tensor) becomes a guess point: its estimate goes to ``x.grad``, and no reverse graph is recorded through the
        network."""
        leaves, spec = tree_flatten((args, kwargs))
        for i, t in enumerate(leaves):
            if not isinstance(t, Tensor):
                continue
            source = needing_grad.get(i)
            if source is None:
                if t.dim() > 0 and t.shape[0] == self.rows:
                    self.tracker.mark(t, Rows(), False)
                continue
            u = isotropic_guess(t, self.handle.generator(t.device))
            self.add_record(InputRecord(None, {"input": source}, (), guess=u))
            if not self.replaying:
                leaves[i] = self.tracker.mark(fwAD.make_dual(t, u.to(t.dtype, copy=True)), Rows(), True)
        return tree_unflatten(leaves, spec)

    def add_record(self, record: Record, guessed: bool = True) -> None:
        """Keep a record for the backward (``store="activations"``), or, replaying, add its estimate now."""
        for p in record.params.values():
            self.params.setdefault(id(p), p)
        if self.replaying:
            self.accumulate(record)
            if self.release is not None and guessed:
                self.release.arrived(record, self.grads)
            return
        if self.release is not None and guessed:
            self.release.expect(record)
        if self.handle.store == "activations" and guessed:
            self.records.append(record)

    def weight_guesses(self, param: Tensor) -> Tensor:
        """Weight-space guesses ``[K, *shape]`` for one use of a parameter outside the fast paths."""
        gen = self.handle.generator(param.device)
        estimator = self.estimator if self.estimator.space == "weight" else _RAW_ESTIMATOR  # raw_parameters=...
        return estimator.weight_guesses(param, gen, self.k)

    def draw_guess(self, output: Tensor, rows: Rows, name: str, module: nn.Module | None = None,
                   edges: list | None = None) -> Tensor:
        """The estimator's guess at a guess point's output, drawn on its ``[N, *S]`` view (one row per example)."""
        handle = self.handle
        value = to_rows(fwAD.unpack_dual(output)[0].detach(), rows, self.rows)
        # One edge's replayed values alive at a time when the graph holds captured activations (a residual stream:
        # a prompt's or an early layer's edges reach every later block) or nothing is kept: compute for memory.
        streamed = handle.store == "recompute" or self.graph_uses is not None
        layout = None if rows == ROWS else functools.partial(from_rows, rows=rows, shape=output.shape)
        site = Site(value, handle.generator(value.device), self.k, module, name, edges or [], self.graph,
                    handle.internal, streamed=streamed, layout=layout)
        guess = self.estimator.guess(site)
        release = self.release
        if release is not None and handle.store == "recompute" and site.read:
            # the replay draws this guess again in backward: the weights it read must not be stepped before then
            if self.replaying:
                release.read(site.read, self.grads)
            else:
                release.expect_reads(site.read)
        return from_rows(guess, rows, output.shape)

    def op_name(self, func: Any, params: list[Tensor]) -> str:
        names = self.handle.param_names
        used = []
        for t in params:
            for p in (t,) if id(t) in self.trainable else (self.tracker.derived(t) or ()):
                used.append(names.get(id(p), "?"))
        params_text = ", ".join(sorted(set(used)))
        return params_text if func is None else f"{getattr(func, '__name__', func)!s}({params_text})"

    def enter_module(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook of a fast-path module: a guess point if it reads the batch (``PromptTokens`` always); else its
        parameters are read by parameter-only ops (position embeddings of ``(1, L)`` ids, a prompt embedded once)."""
        tracker = self.tracker
        self.module_calls[module] = self.module_calls.get(module, 0) + 1
        guess = isinstance(module, PromptTokens) or any(
            tracker.batch(a) is not None or fwAD.unpack_dual(a).tangent is not None
            # an op the mode does not see (a custom autograd Function) may hide where a tensor came from: rows
            or (a.dim() > 0 and a.shape[0] == self.rows and tracker.derived(a) is None)
            for a in args if isinstance(a, Tensor))
        self.fast_calls.append(guess)
        if guess:
            for p in module.parameters(recurse=False):
                self.fast_active[id(p)] = self.fast_active.get(id(p), 0) + 1

    def leave_module(self, module: nn.Module) -> bool:
        guess = self.fast_calls.pop() if self.fast_calls else False
        if guess:
            for p in module.parameters(recurse=False):
                n = self.fast_active.pop(id(p), 1) - 1
                if n > 0:
                    self.fast_active[id(p)] = n
        return guess

    def guess_point(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        """A fast-path module's forward hook: draw the guess, record what the estimate needs, inject the tangent."""
        if not isinstance(output, Tensor):
            raise TypeError(f"guess point {self.handle.names[module]!r} returned {type(output).__name__}, not a Tensor")
        out, tangent = fwAD.unpack_dual(output)
        out = out.detach() if tangent is not None else out  # see contexts.primal
        rows = self._rows(module, args, out)
        params = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in self.trainable}
        graph = self.graph
        record, contribution = self._record(module, params, tuple(primal(a) for a in args), out, rows)
        copied = None
        if self.replaying:
            contribution = None  # (the guess: the record alone holds it, and lets go of it with its estimate)
            if self.release is not None and self.release.aliases(out, params.values()):
                copied = self.tracker.mark(out.clone(), rows, False)  # a view of a parameter stepped in place below
        self.release_graph(module)
        self.handle.captured(self.handle.names[module], record, graph, module)
        self.add_record(record)
        if self.replaying or contribution is None:
            return copied if self.replaying else self.tracker.mark(output, rows, True)
        if 0 in out.stride():  # a broadcast view (PromptTokens): a dual tensor needs its own memory
            out = out.contiguous()
        # its own memory: an in-place op after the guess point (Hardswish(inplace=True), Dropout(inplace=True))
        # updates the tangent in place, which must not change the guess the record keeps
        if tangent is None:
            new_tangent = contribution.clone() if getattr(record, "guess", None) is contribution else contribution
        else:
            new_tangent = tangent + contribution
        return self.tracker.mark(fwAD.make_dual(out, new_tangent.to(out.dtype)), rows, True)

    def _rows(self, module: nn.Module, args: tuple, out: Tensor) -> Rows:
        """Where the examples are in a fast-path module's output, from its input's (dim 0 unless moved)."""
        rows = Rows(0, 1) if out.dim() and out.shape[0] == self.rows else Rows(None, 1)
        self._input_rows_dim = 0
        for a in args:
            entry = self.tracker.batch(a) if isinstance(a, Tensor) else None
            if entry is not None:
                rows = self.tracker.out_rows(None, (), {}, entry[0], a.shape, out)
                self._input_rows_dim = entry[0].dim or 0
                break
        if rows.dim is None or out.shape[rows.dim] != self.rows * rows.fold or (rows != (0, 1) and (
                self.estimator.space == "weight" and rows.dim != 0 and rows.fold != 1 or self.handle.exact_head)):
            raise GuessingNotSupportedError(
                f"guess point {self.handle.names[module]!r} returned shape {tuple(out.shape)} without the batch "
                f"({self.rows} rows) on dim 0: guessed gradients need each example's values apart. A sequence-first "
                "tensor is the usual cause (nn.MultiheadAttention(batch_first=False), an RNN without batch_first): "
                "keep dim 0 the batch (batch_first=True)"
                + (". An unbatched input (one example, no batch dim) is another: give it one (x.unsqueeze(0))."
                   if out.dim() <= 1 else ".")
                + (f" With exact_head=True (or method {self.estimator.name!r}) every guess point needs the batch on "
                   "dim 0; the batch is on another dim here, which the other methods follow."
                   if self.handle.exact_head and rows.dim is not None and rows.dim != 0 else "")
            )
        return rows

    def _record(self, module: nn.Module, params: dict, inputs: tuple, out: Tensor,
                rows: Rows) -> tuple[Record, Tensor | None]:
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
            stacks = {n: self._module_weight_guesses(module, n, p) for n, p in params.items()}
            record = WeightRecord(module, params, (), stacks=stacks,  # (Σ d) V needs none of the batch
                                  owned=handle._captured is None)
            # the blocks of K guesses along the rows' dim (a sequence-first tensor: dim 1)
            jvp = None if self.replaying else weight_space_jvp(module, inputs, stacks, self.rows, handle.internal,
                                                               dim=self._input_rows_dim, out_dim=rows.dim)
            return record, jvp
        regenerate = (self.estimator.regenerable and handle.store == "activations" and not self.replaying
                      and handle._captured is None and out.numel() * out.element_size() >= REGENERATE_MIN_BYTES)
        state = handle.generator(out.device).get_state() if regenerate else None
        # an embedding's padding positions get no guess (guesses.zero_padding)
        padding = (inputs[0], module.padding_idx) if isinstance(module, nn.Embedding) else (None, None)
        guess = zero_padding(self.draw_guess(out, rows, handle.names[module], module, edges), *padding)
        record = ActivationRecord(module, params, inputs, guess=guess, rows=tuple(rows))
        if regenerate:  # keep the generator's state, not the guess: drawn again in backward, one layer at a time
            record.guess, record.redraw = None, self._redraw(out, rows, handle.names[module], state, padding)
        return record, guess

    def _redraw(self, out: Tensor, rows: Rows, name: str, state: Tensor,
                padding: tuple[Tensor | None, int | None]) -> Callable[[], Tensor]:
        """The guess of a regenerable estimator (its guess depends on the output's shape, dtype and device and on the
        generator only), drawn again from the generator state it was first drawn from; ``padding``: an embedding's
        ``(ids, padding_idx)``, zeroed there as when first drawn (:func:`~guess_optim.guesses.zero_padding`)."""
        handle, like = self.handle, out.new_empty(()).expand(out.shape)
        gen = handle.generator(out.device)

        def redraw() -> Tensor:
            current = gen.get_state()
            gen.set_state(state)
            try:
                return zero_padding(self.draw_guess(like, rows, name), *padding)
            finally:
                gen.set_state(current)

        return redraw

    def _module_weight_guesses(self, module: nn.Module, name: str, p: Tensor) -> Tensor:
        v = self.estimator.weight_guesses(p, self.handle.generator(p.device), self.k)
        if isinstance(module, nn.Embedding) and name == "weight" and module.padding_idx is not None:
            v[:, module.padding_idx] = 0  # backprop's gradient of the padding row is zero: so is its guess
        return v

    def op_site(self, func: Any, sources: tuple[int, ...]) -> tuple[Any, list]:
        """The graph's node of an op-level guess point (:class:`~guess_optim.graph.OpNode`) and its edges to the next
        nodes, or ``(None, [])`` when discovery did not see it (its guess is then isotropic)."""
        key = op_key(func, sources)
        n = self.op_counts.get(key, 0)
        self.op_counts[key] = n + 1
        graph = self.graph
        node = graph.op_nodes.get((key, n)) if graph is not None else None
        handle = self.handle
        if node is None and graph is not None and self.estimator.needs is not None and not handle._warned_unseen:
            handle._warned_unseen = True
            warnings.warn(
                f"guess_optim: graph discovery did not see the op-level guess point "
                f"'{getattr(func, '__name__', func)}({', '.join(handle.param_names.get(i, '?') for i in sources)})' "
                f"(occurrence {n}): its {self.estimator.name!r} guess falls back to an isotropic one (an "
                "'activation' guess). Please report the model; guess_optim.check() shows the estimate's quality.",
                stacklevel=user_stacklevel())
        return node, (graph.next_edges(node) if node is not None else [])

    def release_graph(self, module: nn.Module) -> None:
        """A volatile graph holds this batch's activations: drop it after its last reader."""
        uses = self.graph_uses
        if uses is not None and module in uses:
            uses[module] -= 1
            if not any(n > 0 for n in uses.values()):
                self.graph = self.graph_uses = None

    def collect(self, output: Any, where: str, primary: bool) -> Any:
        """Outputs of the guessing region that carry a tangent leave through the boundary (:mod:`.boundary`)."""
        if self.replaying:  # as the first forward: with K guesses, the head's output cut back to the batch's rows
            return output if self.k == 1 else tree_map(
                lambda t: t[:self.batch] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.rows else t,
                output)
        return collect(self, output, where, primary)

    # ----------------------------------------------------------------------------------------------- the backward
    def accumulate(self, record: Record) -> None:
        """Add one record's estimate to :attr:`grads` (keyed by parameter identity: tied weights sum)."""
        for name, g in record.estimate(self.d, self.grad_rep, self.k, self.handle.internal).items():
            key = id(record.params[name])
            self.grads[key] = g if key not in self.grads else self.grads[key] + g

    def _projected(self, d: Tensor) -> Tensor:
        grams = [g for g in (r.gram(self.k, self.batch) for r in self.records) if g is not None]
        if not grams:
            return d
        return _project(d, sum(grams[1:], grams[0]), self.k)

    def estimate(self) -> list[Tensor | None]:
        """The estimate of every parameter (and input needing grad) of the step, from the collected ``∂L/∂z``;
        ``None`` where there is none. Called by :class:`~guess_optim.boundary.Estimate` in ``backward()``."""
        k, d = self.k, None
        for index, tangent in enumerate(self.tangents):
            g = self.grad_z.get(index)
            if g is None:
                g = tangent.new_zeros((self.batch, *tangent.shape[1:]))
            rep = g.repeat(k, *([1] * (g.dim() - 1))) if k > 1 else g
            part = (rep * tangent).reshape(tangent.shape[0], -1).sum(1)
            d = part if d is None else d + part
            if index == 0:
                self.grad_rep = rep
        self.d = d if d is not None else next(iter(self.params.values())).new_zeros(self.rows)
        if self.handle.combine == "project":
            self.d = self._projected(self.d)
        release = self.release
        if release is not None and not release.start(self.d):  # not finite: the policy skipped (or raised)
            self.records, self.saved, self.grad_z = [], None, {}
            return [None] * (1 + len(self.params) - len(self.trainable))
        if self.handle.store == "recompute":
            from .replay import replay

            self.grads = replay(self)
        else:
            records, self.records = self.records, []
            for i, r in enumerate(records):
                records[i] = None  # the record's saved input goes as soon as its estimate is made (as in backprop)
                self.accumulate(r)
                if release is not None:
                    release.arrived(r, self.grads)
                del r
        if release is not None:
            release.finish(self.grads)
        params = list(self.params.values())
        out = [self.grads.get(id(p)) for p in params]
        self.grads = {}  # the list is the estimates' only holder: autograd takes them without a copy
        self.records, self.grads, self.saved, self.grad_z = [], {}, None, {}
        if release is None:
            return self.handle.nonfinite.apply(self.d, out, params)
        grads = self.handle.nonfinite.apply(self.d, out, params, release.skipped)
        return [None, *grads[len(self.trainable):]]  # the leaf standing for the released parameters, inputs


class ProductTangents:
    """The tangents the module hooks carry apart from forward-mode AD: a Linear's or convolution's output tangent as a
    separate product (cheaper than forward AD through ``F.linear``), and a frozen norm's tangent in its value's
    dtype under autocast."""

    def __init__(self, step: GuessingStep):
        self.step = weakref.proxy(step)  # no reference cycle: a step's memory goes as soon as the step does
        self.pending: list[tuple] = []  # (module, input tangent, its rows, input shape) of calls in progress

    def strip(self, module: nn.Module, args: tuple) -> tuple | None:
        """Pre-hook of a Linear/convolution: run its primal alone; :meth:`add` adds ``ẋ Wᵀ``."""
        if self.step.replaying or not args or not isinstance(args[0], Tensor):
            return None
        x, tangent = fwAD.unpack_dual(args[0])
        if tangent is None:
            return None
        entry = self.step.tracker.batch(args[0])
        rows = entry[0] if entry else Rows()
        self.pending.append((module, tangent, rows, args[0].shape))
        return (self.step.tracker.mark(x.detach(), rows, False), *args[1:])  # detached: see contexts.primal

    def add(self, module: nn.Module, output: Tensor) -> Tensor | None:
        if not self.pending or self.pending[-1][0] is not module:
            return None
        _, tangent, rows, shape = self.pending.pop()
        out = fwAD.make_dual(output, product_tangent(module, tangent).to(output.dtype))
        return self.step.tracker.mark(out, self.step.tracker.out_rows(None, (), {}, rows, shape, output), True)

    def match_dtype(self, output: Any) -> Tensor | None:
        """Under CPU autocast, LayerNorm returns a bfloat16 value with a float32 tangent, which the next Linear
        rejects: give the tangent the value's dtype."""
        if self.step.replaying or not isinstance(output, Tensor):
            return None
        out, tangent = fwAD.unpack_dual(output)
        if tangent is None or tangent.dtype == out.dtype:
            return None
        entry = self.step.tracker.batch(output)
        return self.step.tracker.mark(fwAD.make_dual(out, tangent.to(out.dtype)), entry[0] if entry else Rows(), True)


def _project(d: Tensor, gram: Tensor, k: int) -> Tensor:
    """``K · G_b⁺ d_b`` per example (``d`` of ``K`` blocks of ``B`` rows; ``gram`` ``[B, K, K]``): the coefficients
    of the projection of each example's gradient onto the span of its ``K`` guesses (Flügel et al. 2025), times
    ``K`` because the records average over the blocks."""
    batch = gram.shape[0]
    rhs = d.reshape(k, batch).T.unsqueeze(-1).to(gram.dtype)  # [B, K, 1]
    coeffs = torch.linalg.lstsq(gram, rhs, driver="gelsd" if gram.device.type == "cpu" else None).solution
    return (k * coeffs.squeeze(-1)).T.reshape(-1).to(d.dtype)


def repeat_labels(kwargs: dict, batch: int, k: int) -> dict:
    """The keyword arguments with the labels repeated like the batch, for graph discovery: its forward is not cut at
    the head, so a loss computed inside forward sees ``K x B`` logits there."""
    if k == 1:
        return kwargs
    return {key: tree_map(lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if isinstance(t, Tensor) and t.dim() > 0
                          and t.shape[0] == batch else t, v) if key in _NO_REPEAT_KWARGS else v
            for key, v in kwargs.items()}


def _batch_inputs(handle: GuessHandle, args: tuple, kwargs: dict) -> tuple[int, tuple, dict, dict[int, Tensor]]:
    """Check the model's inputs and repeat the batch-shaped ones ``K`` times along dim 0 (``num_guesses=K``).

    Returns:
        ``(B, args, kwargs, needing_grad)``; ``needing_grad`` maps the position of each input that requires grad (in
        the flattened ``(args, kwargs)``) to the user's tensor (it is detached here and guessed as a guess point).
    """
    leaves, spec = tree_flatten((args, kwargs))
    shaped = [t for t in leaves if isinstance(t, Tensor) and t.dim() > 0]
    if not shaped:
        raise ValueError("guessed gradients need at least one batch-shaped tensor input to the model")
    devices = {t.device for t in shaped} | {p.device for p in handle.model.parameters()}
    if len({d.type for d in devices}) > 1:
        raise ValueError(
            f"the model's parameters and inputs are on different devices ({sorted(map(str, devices))}); "
            "move the inputs to the model's device"
        )
    batch, k = shaped[0].shape[0], handle.num_guesses
    keys = [None] * len(leaves)  # the kwarg each leaf belongs to (labels are not repeated)
    offset = len(tree_flatten(args)[0])
    for key, v in kwargs.items():
        n = len(tree_flatten(v)[0])
        keys[offset:offset + n] = [key] * n
        offset += n
    needing_grad: dict[int, Tensor] = {}
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor):
            continue
        if t.requires_grad and t.is_floating_point():
            if t.dim() == 0 or t.shape[0] != batch:
                raise GuessingNotSupportedError(
                    f"an input of shape {tuple(t.shape)} requires grad but its dim 0 is not the batch ({batch}): "
                    "only batch-shaped inputs can be guess points; detach it or make it a parameter of the model"
                )
            needing_grad[i] = t
            t = t.detach()
        if k > 1 and t.dim() > 0 and t.shape[0] == batch and keys[i] not in _NO_REPEAT_KWARGS:
            t = t.repeat(k, *([1] * (t.dim() - 1)))
        leaves[i] = t
    args, kwargs = tree_unflatten(leaves, spec)
    return batch, args, kwargs, needing_grad
