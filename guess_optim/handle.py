"""The handle of an attached model: it installs and removes the hooks and holds the options, generators and counters.

Each training-mode forward gets its own :class:`~guess_optim.step.GuessingStep`; the hooks below only find the live
step and hand it the call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .contexts import user_stacklevel
from .errors import GuessingNotSupportedError
from .estimators import Estimator
from .graph import Graph
from .graph_cache import GraphCache
from .layout import Layout
from .nonfinite import NonFinitePolicy
from .records import Record
from .rowwise import refuse_batch_norm
from .step import GuessingStep

__all__ = ["ATTR", "GuessHandle"]

ATTR = "_guess_optim_handle"
"""The attribute of the model that holds its handle (so :func:`~guess_optim.handle_of` finds it, also on a copy)."""
_DYNAMO_EVAL_FRAME = os.path.join("_dynamo", "eval_frame.py")
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the handles not removed yet (attach refuses nesting)


def live_handles() -> list[GuessHandle]:
    """The handles attached and not removed (in this process)."""
    return list(_LIVE)


_REPEATED_BATCH_NOTE = (
    "guess_optim: this forward ran with num_guesses={k}: the model's batch-shaped inputs were repeated {k} times along "
    "dim 0 (all but labels=, label=, targets=), and the head's output was cut back to the batch's rows. Code inside "
    "forward that mixes the two fails like this: pooling or a loss after head= that reads the batch size from the "
    "repeated inputs (transformers' *ForSequenceClassification of decoder models), or labels used before the model "
    "(peft's prompt tuning and P-tuning of a causal LM). Use num_guesses=1 (average guesses over steps instead), or "
    "compute the loss outside forward (do not pass labels=; head=None)."
)


class GuessHandle:
    """Guessed gradients attached to a model; returned by :func:`~guess_optim.attach`.

    ``remove()`` (or leaving the ``with`` block) removes every hook and restores the model exactly; like
    ``torch.utils.hooks.RemovableHandle.remove`` it may be called more than once. While attached, every
    training-mode forward with grad enabled is a guessing forward, and the following ``backward()`` writes the
    estimate into ``p.grad``.

    Attributes:
        model: the attached model.
        estimator: the :class:`~guess_optim.Estimator` (``method`` is the same object).
        seed: the seed of the private generators.
        num_guesses: guesses averaged per step.
        exact_head: whether the output layer gets its exact gradient.
        head: the module whose output ends the guessing region (the model itself by default).
        store: ``"activations"`` or ``"recompute"``.
        combine: how the ``num_guesses`` guesses combine: ``"mean"`` or ``"project"``.
        gradient_release: whether each parameter's estimate goes to autograd as soon as it is complete, for an
            optimizer stepped in backward (:class:`~guess_optim.optim.OptimizerInBackward`).
        guess_points: the modules that draw a guess.
        skipped_steps: number of backward passes whose estimate was not finite and was not written (with
            ``gradient_release``: of which at least one parameter's estimate was not finite and not delivered).
        last_step_skipped: whether the most recent backward's estimate was not finite (and so not written,
            unless ``on_nonfinite="propagate"``): the optimizer step should be skipped.
    """

    def __init__(self, model: nn.Module, estimator: Estimator, *, seed: int, exact_head: bool, num_guesses: int,
                 head: nn.Module | None, on_nonfinite: str, store: str, raw_parameters: str,
                 combine: str = "mean", gradient_release: bool = False):
        self.model = model
        self.estimator = estimator
        self.seed = seed
        self.exact_head = exact_head or estimator.exact_head
        self.num_guesses = num_guesses
        self.head = head if head is not None else model
        self.store = store
        self.raw_parameters = raw_parameters
        self.combine = combine
        self.gradient_release = gradient_release
        self._warned_unseen = False  # the one warning that a structured guess fell back to isotropic
        self._warned_stale = False  # the one warning that a cached graph went stale (control flow changed)
        self._warned_release = False  # the one warning that no hook consumed a released estimate
        self._release: Any = None  # weakref to the last step's GradientRelease (gradient_release)
        self.layout = Layout.of(model)
        self.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.names = self.layout.names
        self.guess_points = self.layout.guess_points
        # downstream guesses walk on from the next modules' own edges; the others need the guess points' only
        sources = None if estimator.needs == "downstream" else self.guess_points
        self.graphs = GraphCache(model, self.layout.tracked, self.head, sources, self.quiet)
        self.nonfinite = NonFinitePolicy(on_nonfinite)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._hooks: list[Any] = []
        self._step: GuessingStep | None = None
        self._opening = False  # while a step opens (graph discovery runs the model)
        self._internal = 0  # > 0 while the engine itself calls modules (discovery, local VJPs, replays)
        self._paused = False
        self._removed = False
        self._captured: list[dict[str, Any]] | None = None
        self._forward: Any = None
        if estimator.space != "backprop":
            self._install()
        setattr(model, ATTR, self)
        _LIVE.add(self)

    @property
    def method(self) -> Estimator:
        """The estimator (the name ``method`` matches :func:`~guess_optim.attach`'s argument)."""
        return self.estimator

    @property
    def skipped_steps(self) -> int:
        return self.nonfinite.skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        return self.nonfinite.last_step_skipped

    # ----------------------------------------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        add, model = self._hooks.append, self.model
        add(model.register_forward_pre_hook(self._on_root_pre, with_kwargs=True))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                add(m.register_forward_pre_hook(self._on_batchnorm_pre, prepend=True))
            if isinstance(m, nn.RNNBase):
                add(m.register_forward_pre_hook(self._on_rnn_pre, with_kwargs=True))
        for m in self.layout.product_modules:
            # prepended: the output's tangent must be in place before the guess-point hook reads it
            add(m.register_forward_pre_hook(self._on_product_pre))
            add(m.register_forward_hook(self._on_product_post, prepend=True))
        for m in self.guess_points:
            # prepended: whether this call reads the batch is decided on its inputs as the caller passed them (but
            # after the step opens, when the model is itself a guess point)
            add(m.register_forward_pre_hook(self._on_fast_pre, prepend=m is not model))
            add(m.register_forward_hook(self._on_guess_point, always_call=True))
        for m in self.layout.frozen_norms:
            add(m.register_forward_hook(self._on_frozen_norm))
        if self.head is not model:
            add(self.head.register_forward_hook(self._on_boundary))
        # Runs even when forward raises, so the dual level and the contexts never stay open.
        add(model.register_forward_hook(self._on_root_post, always_call=True))

        self._forward = model.__dict__.get("forward")
        if self._forward is None:
            self._forward = model.forward
            model.forward = self._forward_guarded

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :func:`~guess_optim.attach`. Safe to call again."""
        if self._removed:
            return
        self._close_step()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.model.__dict__.get("forward") == self._forward_guarded:
            del self.model.forward
        self.graphs.clear()
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)
        _LIVE.discard(self)
        self._removed = True

    def __enter__(self) -> GuessHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"GuessHandle(method={self.estimator.name!r}, seed={self.seed}, num_guesses={self.num_guesses}, "
                f"exact_head={self.exact_head}, guess_points={len(self.guess_points)})")

    @contextlib.contextmanager
    def paused(self) -> Iterator[GuessHandle]:
        """Context manager under which forwards run the plain model and ``backward()`` computes exact gradients."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Context manager under which the engine calls the model itself (graph discovery): every hook stands aside."""
        self._internal += 1
        try:
            yield
        finally:
            self._internal -= 1

    @contextlib.contextmanager
    def internal(self) -> Iterator[None]:
        """:meth:`quiet`, and torch functions skip ``__torch_function__``: the engine's own computations (guesses,
        local VJPs) are not seen by the guessing mode, and cost no Python dispatch per op."""
        with self.quiet(), torch._C.DisableTorchFunction():
            yield

    @property
    def in_internal_forward(self) -> bool:
        """``True`` while the engine runs a forward of its own (graph discovery; the second forward of
        ``store="recompute"``, run from ``backward()``). Like the step's forward, these run with grad enabled (so the
        model's ``no_grad`` regions are seen); a forward hook that records or counts the user's training forwards
        should skip them."""
        return bool(self._internal) or (self._step is not None and self._step.replaying)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[dict[str, Any]]]:
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

    def captured(self, name: str, record: Record, graph: Graph | None, module: nn.Module | None = None) -> None:
        """Called at each guess point: add it to the list of :meth:`capture`, if one is open."""
        if self._captured is None:
            return
        guesses = getattr(record, "guesses", None)
        guess = getattr(record, "guess", None) if not guesses else guesses[0]
        tangents = getattr(record, "tangents", None)
        nexts = [graph.names[e.consumer] for e in graph.next_edges(module)] if (
            graph is not None and module is not None and guess is not None and self.estimator.needs is not None) else []
        self._captured.append({"module": name, "guess": guess, "tangents": tangents, "next_modules": nexts})

    # --------------------------------------------------------------------------------------------- generators
    def generator(self, device: torch.device | str) -> torch.Generator:
        """The private generator for ``device`` (seeded from :attr:`seed`; one stream per device)."""
        device = torch.device(device)
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    @contextlib.contextmanager
    def generators_at(self, states: dict[torch.device, Tensor]) -> Iterator[None]:
        """Run with the generators at ``states`` (those created since: at the seed); put them back after."""
        current = {d: g.get_state() for d, g in self._generators.items()}
        for d, g in self._generators.items():
            if d in states:
                g.set_state(states[d])
            else:
                g.manual_seed(self.seed)
        try:
            yield
        finally:
            for d, state in current.items():
                self._generators[d].set_state(state)

    def state_dict(self) -> dict[str, Any]:
        """Generator states and counters, for checkpoints."""
        return {"seed": self.seed, "skipped_steps": self.skipped_steps,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = int(state["seed"])
        self.nonfinite.skipped_steps = int(state.get("skipped_steps", 0))
        for d, s in state.get("generators", {}).items():
            self.generator(torch.device(d)).set_state(s)

    # ------------------------------------------------------------------------------------------------- hooks
    def _live(self) -> GuessingStep | None:
        """The step a hook acts on: the current forward's, unless the engine itself is calling modules."""
        step = self._step
        return None if step is None or step.closed or self._internal else step

    # The hooks hand the call to the live step; the step's own torch calls run as the engine's (internal), which
    # the guessing mode and the other hooks let through.
    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._internal or (self._step is not None and self._step.replaying):
            return None
        self._close_step()  # a previous forward that raised before its boundary: never leave a level open
        if (self._paused or not self.model.training or not torch.is_grad_enabled()
                or torch.is_inference_mode_enabled()):
            return None
        _refuse_compiled(self.model)
        try:
            self._opening = True
            self._step, args, kwargs = GuessingStep.open(self, args, kwargs)
        except Exception as error:
            if self.num_guesses > 1:
                error.add_note(_REPEATED_BATCH_NOTE.format(k=self.num_guesses))
                error._guess_optim_noted = True
            raise
        finally:
            self._opening = False
        return args, kwargs

    def _on_batchnorm_pre(self, module: nn.Module, args: tuple) -> None:
        """A BatchNorm that normalizes with the batch's statistics (training mode, or no running statistics), called
        while guessing (also by graph discovery and the engine's own VJPs): refused before it runs, so its running
        statistics stay as they were. One that is defined but not called is no concern."""
        step = self._step
        if not (self._opening or step is not None and not step.closed) or not torch.is_grad_enabled():
            return None
        if module.training or (module.running_mean is None and module.running_var is None):
            refuse_batch_norm(f"{self.names.get(module, '?')!r} ({type(module).__name__})", module.training,
                              self.num_guesses)
        return None

    def _on_rnn_pre(self, module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple | None:
        """With ``num_guesses=K``: an initial state ``hx`` of ``(layers, B, H)`` (a tuple of two for an LSTM) passed
        with an input whose batch was repeated to ``K·B`` is repeated along its batch dim (1) too, in the same blocks
        (the model's inputs are repeated along dim 0 only, where ``hx`` holds the layers). Also in the engine's own
        forwards (graph discovery, the ``store="recompute"`` replay), which run on the repeated batch."""
        step, k = self._step, self.num_guesses
        if k == 1 or not (self._opening or step is not None and (not step.closed or step.replaying)):
            return None
        x = args[0] if args else kwargs.get("input")
        hx_in_args = len(args) > 1
        hx = args[1] if hx_in_args else kwargs.get("hx")
        if not isinstance(x, Tensor) or x.dim() != 3 or hx is None:
            return None  # (unbatched inputs; packed sequences are refused where their data loses the batch)
        rows = x.shape[0 if module.batch_first else 1]
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        if not all(isinstance(h, Tensor) and h.dim() == 3 and h.shape[1] * k == rows for h in states):
            return None
        repeated = tuple(h.repeat(1, k, 1) for h in states)
        hx = type(hx)(repeated) if isinstance(hx, (tuple, list)) else repeated[0]
        if hx_in_args:
            return (args[0], hx, *args[2:]), kwargs
        return args, {**kwargs, "hx": hx}

    def _on_product_pre(self, module: nn.Module, args: tuple) -> tuple | None:
        step = self._live()
        if step is None or not torch.is_grad_enabled():
            return None
        with self.internal():
            return step.products.strip(module, args)

    def _on_product_post(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        step = self._live()
        if step is None:
            return None
        with self.internal():
            return step.products.add(module, output)

    def _on_fast_pre(self, module: nn.Module, args: tuple) -> None:
        step = self._live()
        if step is not None:
            with self.internal():
                step.enter_module(module, args if torch.is_grad_enabled() else ())

    def _on_guess_point(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        step = self._live()
        if step is None or not step.leave_module(module) or sys.exc_info()[0] is not None:
            return None  # (the last: forward raised, and this hook runs because it is always called)
        if not torch.is_grad_enabled():  # under the model's own no_grad, no gradient in backprop either
            return None
        with self.internal():
            return step.guess_point(module, args, output)

    def _on_frozen_norm(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        step = self._live()
        if step is None:
            return None
        with self.internal():
            return step.products.match_dtype(output)

    def _on_boundary(self, module: nn.Module, args: tuple, output: Any) -> Any:
        step = self._live()
        if step is None:
            return None
        step.head_called = True
        with self.internal():
            return step.collect(output, f"of {self.names.get(module)!r}", primary=True)

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        step = self._step
        if self._internal or step is None or step.replaying:
            return None
        error = sys.exc_info()[1]
        if error is not None and self.num_guesses > 1 and not getattr(error, "_guess_optim_noted", False):
            error.add_note(_REPEATED_BATCH_NOTE.format(k=self.num_guesses))  # a hook cannot replace the error
            error._guess_optim_noted = True
        try:
            if not step.closed and error is None and output is not None:  # not when forward raised
                if self.head is not self.model and not step.head_called:
                    raise RuntimeError(
                        f"head module {self.names.get(self.head)!r} was not called during the model's forward")
                with self.internal():
                    output = step.collect(output, "of the model", primary=self.head is self.model)
                _refuse_lost(step)
                self._check_graph(step)
                return output
        finally:
            self._close_step()
        return None

    def _check_graph(self, step: GuessingStep) -> None:
        """A cached graph that no longer matches the forward (its control flow changed at the same input signature)
        is discovered again on every step from now on; this step's structured guesses used the old one: warned once.
        """
        graph = step.cached_graph
        if graph is None:
            return
        changed = self.graphs.stale(graph, {m: step.module_calls.get(m, 0) for m in self.guess_points})
        if changed is not None and not self._warned_stale:
            self._warned_stale = True
            warnings.warn(
                f"guess_optim: the model's control flow changed at the same input shapes ({changed}): this step's "
                f"{self.estimator.name!r} guesses were built from the graph of an earlier forward (still a valid "
                "biased guess, but not the next layers this forward used). The graph is now discovered on every step "
                "for these inputs (one extra forward per step).", stacklevel=user_stacklevel())

    def _close_step(self) -> bool:
        """Close the current step; whether it was still open (its boundary never ran)."""
        step, self._step = self._step, None
        if step is None or step.closed:
            return False
        step.close()
        return True

    def _forward_guarded(self, *args: Any, **kwargs: Any) -> Any:
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


def _refuse_lost(step: GuessingStep) -> None:
    """A tensor computed from the guesses without the batch dim that outlives the forward (kept on a module: an
    auxiliary loss, a load-balancing term) would join the loss without a path to the estimate: its contribution would
    be dropped silently. Refused."""
    lost = step.tracker.lost()
    if not lost:
        return
    gc.collect()  # a tensor held only by a reference cycle of the forward's frames is not kept
    lost = step.tracker.lost()
    if lost:
        raise GuessingNotSupportedError(
            f"a tensor of shape {tuple(lost[0].shape)} computed from the guessed activations without the batch dim "
            "outlives the model's forward (stored on a module or in a global: an auxiliary loss, a load-balancing "
            "or activation penalty): its gradient would be dropped from the estimate. Return it from forward per "
            "example (shape [batch, ...]) and reduce it in the loss, or .detach() it if it is only a statistic."
        )


def _refuse_compiled(model: nn.Module) -> None:
    """``torch.compile`` traces the forward into a graph that forward-mode tangents do not pass through: the estimates
    would be zeros. Refuse it, whether the whole model or a submodule was compiled, before or after ``attach``; and
    module backward hooks, which would never run (no gradient flows backward through the modules)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_DYNAMO_EVAL_FRAME):
            raise GuessingNotSupportedError(
                "the model runs under torch.compile, whose compiled graphs drop forward-mode tangents (every estimate "
                "would be zero): call the attached module itself (not torch.compile(model)) while training with "
                "guessed gradients, or use method='backprop'"
            )
        frame = frame.f_back
    from torch.nn.modules import module as _module

    if _module._global_backward_hooks or _module._global_backward_pre_hooks:
        raise GuessingNotSupportedError(
            "a global module backward hook is registered (torch.nn.modules.module.register_module_full_backward_hook "
            "or ..._pre_hook): no gradient flows backward through the modules while guessing, so it would never run "
            "(nor change the estimate). Remove it while training with guessed gradients, or use method='backprop'; "
            "parameter hooks (p.register_hook, p.register_post_accumulate_grad_hook) do run on the estimates"
        )
    for name, m in model.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            raise GuessingNotSupportedError(
                f"module {name or type(m).__name__!r} has a backward hook (register_full_backward_hook / "
                "register_full_backward_pre_hook): no gradient flows backward through the modules while guessing, so "
                "it would never run (nor change the estimate). Remove it while training with guessed gradients (run "
                "it under handle.paused() for exact steps), or use method='backprop'; parameter hooks "
                "(p.register_hook, p.register_post_accumulate_grad_hook) do run on the estimates"
            )
        if isinstance(m, torch.jit.ScriptModule):
            raise GuessingNotSupportedError(
                f"submodule {name!r} is a TorchScript module (torch.jit.script / trace), which runs outside Python's "
                "torch functions: its parameters would get no estimate. Keep it an ordinary nn.Module while training "
                "with guessed gradients"
            )
        if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule":
            raise GuessingNotSupportedError(
                f"submodule {name!r} is compiled (torch.compile / module.compile()), and compiled graphs drop "
                "forward-mode tangents (its estimates would be zero): keep it uncompiled while training with guessed "
                "gradients"
            )
