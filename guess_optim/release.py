"""``gradient_release=True``: each parameter's estimate goes to autograd as soon as it is complete, so that an optimizer
stepped from the parameter's post-accumulate-grad hook applies it and frees it before the next one is formed (what
PyTorch calls "optimizer step in backward" and optimi "gradient release").

A step counts, during its forward, the records (guess-point calls) that will contribute to each trainable parameter's
estimate. During ``backward()`` the estimates are formed record by record (from the kept records with
``store="activations"``, one layer at a time during the replayed forward with ``store="recompute"``); once the last
record of a parameter is in, its estimate is checked for non-finite values and accumulated into ``p.grad`` through a
one-node autograd graph (:class:`_Deliver`), so that autograd runs the parameter's hooks (the optimizer step) at once
and takes the tensor without a copy. The boundary (:class:`~guess_optim.boundary.Estimate`) then returns ``None`` for
the parameters already delivered.

With ``store="recompute"`` a structured guess replayed in backward reads its next modules' weights (``wt``'s ``Wᵀ``,
``downstream``'s forward through them), as the first forward's did: a parameter is delivered only once its last record
is in and the last replayed guess that reads it has been drawn. Both usually come in that order (a guess reads the
modules after it); a module called twice is the exception (``shared → mid → shared``: ``mid``'s only record comes
before the guess of ``shared``'s second call, which reads it again: a module's edges are those of all its calls).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .contexts import user_stacklevel
from .records import Record

if TYPE_CHECKING:
    from .handle import GuessHandle

__all__ = ["GradientRelease", "refuse_distributed"]


class _Deliver(torch.autograd.Function):
    """A scalar zero whose backward returns the estimate in ``box`` as the gradient of ``param``: backward through it
    runs ``param``'s AccumulateGrad (and its hooks) with the estimate as the only reference, so it is not copied."""

    @staticmethod
    def forward(ctx, box, param):  # noqa: D401
        ctx.box = box
        return param.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        box, ctx.box = ctx.box, None
        return None, box.pop()


def refuse_distributed(where: str) -> None:
    """Stepping in backward applies each rank's own estimate before DDP/FSDP could average it across ranks.

    Raises:
        RuntimeError: a ``torch.distributed`` process group with more than one rank is initialised.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"gradient_release=True is refused ({where}): a torch.distributed process group with "
            f"{dist.get_world_size()} ranks is initialised, and stepping each parameter in backward would apply each "
            "rank's own estimate before DistributedDataParallel/FSDP average them. Train with gradient_release=False "
            "(the estimates are then all-reduced like ordinary gradients) and a regular optimizer.step()."
        )


class GradientRelease:
    """One step's release: how many records of each parameter are still to come, and the delivery of each estimate.

    Args:
        handle: the handle (its names, its non-finite policy and its one-time warnings).
        trainable: ``{id(p): p}`` of the parameters to release.

    Attributes:
        skipped: names of the parameters whose estimate was not finite and was not delivered (``on_nonfinite="skip"``).
        started: the step's backward has begun (it delivers, or skips the step, or raised).

    Raises:
        RuntimeError: several ranks (:func:`refuse_distributed`), or the previous guessing forward's estimates are
            still to be delivered (two forwards, one backward: its replay would see parameters the first backward
            already stepped, and each parameter would be stepped twice).
    """

    def __init__(self, handle: GuessHandle, trainable: dict[int, Tensor]):
        refuse_distributed("at the forward")
        previous = handle._release() if handle._release is not None else None
        if previous is not None and not previous.started:
            del previous
            gc.collect()  # (in case a reference cycle alone keeps a dropped forward's step)
            previous = handle._release()
        if previous is not None and not previous.started:
            raise RuntimeError(
                "gradient_release=True: a second guessing forward before the backward of the first, whose output is "
                "still alive. Stepping in backward needs one backward per forward (two losses summed into one "
                "backward would step each parameter twice, the second time from a forward replayed on already "
                "stepped weights). Call backward() after each forward, run forwards that are not trained on under "
                "torch.no_grad() or model.eval(), or use gradient_release=False."
            )
        handle._release = weakref.ref(self)
        self.handle = handle
        self.trainable = trainable
        self.expected: dict[int, int] = {}
        self.reads: dict[int, int] = {}  # store="recompute": replayed guesses still to read each parameter
        self.waiting: set[int] = set()  # every record in, some guess still to read it
        self.delivered: set[int] = set()
        self.skipped: list[str] = []
        self.started = False

    def anchored(self) -> list[Tensor]:
        """What the boundary takes instead of the parameters: a leaf that requires grad (so that the loss does) and
        receives no gradient. With the parameters themselves as its inputs, autograd would run their hooks a second
        time at the end of ``backward()``, with ``p.grad`` ``None``."""
        first = next(iter(self.trainable.values()))
        return [first.new_zeros((), requires_grad=True)]

    @staticmethod
    def aliases(out: Tensor, params: Iterable[Tensor]) -> bool:
        """Whether a guess point's output shares memory with one of its parameters (``PromptTokens`` returns its
        parameter expanded to the batch): stepped in place during the replay, the parameter would change the output
        under the ops that read it later, so the replay reads a copy."""
        ptr = out.untyped_storage().data_ptr()
        return any(p.untyped_storage().data_ptr() == ptr for p in params)

    def expect(self, record: Record) -> None:
        """The forward: ``record`` will contribute to its parameters' estimates."""
        for key in {id(p) for p in record.params.values()}:
            if key in self.trainable:
                self.expected[key] = self.expected.get(key, 0) + 1

    def expect_reads(self, keys: Iterable[int]) -> None:
        """The forward (``store="recompute"``): a guess read these parameters (:attr:`Site.read
        <guess_optim.site.Site.read>`); its replay in backward will read them again."""
        for key in keys:
            if key in self.trainable:
                self.reads[key] = self.reads.get(key, 0) + 1

    def read(self, keys: Iterable[int], grads: dict[int, Tensor]) -> None:
        """The backward: a replayed guess read these parameters; deliver those it was the last to read and whose
        records are all in."""
        for key in keys:
            n = self.reads.get(key)
            if n is None:
                continue
            if n > 1:
                self.reads[key] = n - 1
                continue
            del self.reads[key]
            if key in self.waiting:
                self.waiting.discard(key)
                self.deliver(key, grads)

    def start(self, d: Tensor) -> bool:
        """The backward, before any estimate: whether the directional derivatives ``d`` are finite (when they are
        not, every estimate would be: the step is skipped by the handle's policy, nothing is delivered).

        Raises:
            RuntimeError: a parameter stepped in backward already holds a gradient (accumulation).
            FloatingPointError: ``d`` not finite, with ``on_nonfinite="raise"``.
        """
        self.started = True
        for key in self.expected:
            p = self.trainable[key]
            if p.grad is not None and getattr(p, "_post_accumulate_grad_hooks", None):
                raise RuntimeError(
                    f"gradient_release=True: parameter {self.handle.param_names.get(key, '?')!r} is stepped from its "
                    "post-accumulate-grad hook, but its .grad already holds a gradient (accumulation over "
                    "micro-batches, or zero_grad(set_to_none=False)): the step would apply the sum. Stepping in "
                    "backward cannot accumulate gradients: call backward() once per optimizer step (with "
                    "OptimizerInBackward, p.grad is freed after each step), or use gradient_release=False and a "
                    "regular optimizer to accumulate."
                )
        if bool(torch.isfinite(d).all()):
            return True
        self.handle.nonfinite.apply(d, [], [])  # counts the step, warns or raises
        return False

    def arrived(self, record: Record, grads: dict[int, Tensor]) -> None:
        """The backward: ``record``'s estimates were added to ``grads``; deliver those of the parameters it completes.

        Raises:
            RuntimeError: a parameter got more records in backward than in the forward (the replayed forward took
                another path).
        """
        for key in {id(p) for p in record.params.values()}:
            if key not in self.trainable:
                continue
            if key in self.delivered or key not in self.expected:
                raise RuntimeError(
                    f"gradient_release=True: parameter {self.handle.param_names.get(key, '?')!r} was used again after "
                    "its estimate was delivered: the replayed forward (store='recompute') took another path than the "
                    "first (data-dependent control flow?). Use gradient_release=False for this model."
                )
            self.expected[key] -= 1
            if self.expected[key] == 0:
                del self.expected[key]
                if key in self.reads:  # a later replayed guess reads it: stepped after that guess is drawn
                    self.waiting.add(key)
                else:
                    self.deliver(key, grads)

    def finish(self, grads: dict[int, Tensor]) -> None:
        """The backward, after the last record: deliver what is left (parameters whose records did not all come)."""
        for key in [k for k in grads if k in self.trainable and k not in self.delivered]:
            self.deliver(key, grads)
        self.expected.clear()
        self.reads.clear()
        self.waiting.clear()

    def deliver(self, key: int, grads: dict[int, Tensor]) -> None:
        """Accumulate ``grads[key]`` (removed from it) into the parameter's ``.grad``; autograd runs its hooks.

        Raises:
            FloatingPointError: the estimate is not finite, with ``on_nonfinite="raise"``.
        """
        self.delivered.add(key)
        g = grads.pop(key, None)
        if g is None:
            return
        p = self.trainable[key]
        # its norm is finite exactly when every element is (barring overflow of the norm itself, as in the policy's
        # own check); a reduction, much cheaper than isfinite's element-wise mask
        if not bool(torch.isfinite(torch.linalg.vector_norm(g))):
            name = self.handle.param_names.get(key, "?")
            if self.handle.nonfinite.mode == "raise":
                raise FloatingPointError(
                    f"non-finite estimate of parameter {name!r} (gradient_release=True: the parameters released "
                    "before it have been stepped)")
            self.skipped.append(name)
            return
        box = [g if g.dtype == p.dtype else g.to(p.dtype)]
        del g
        frozen = not p.requires_grad  # the replayed forward runs with the parameters frozen
        if frozen:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                torch.autograd.backward(_Deliver.apply(box, p))
        finally:
            if frozen:
                p.requires_grad_(False)
        if p.grad is not None and not self.handle._warned_release:
            self.handle._warned_release = True
            warnings.warn(
                f"gradient_release=True, but the estimate of {self.handle.param_names.get(key, '?')!r} stayed in "
                "p.grad after its post-accumulate-grad hooks ran: no optimizer stepped it in backward, so the memory "
                "saving is lost (the estimates are still correct for a regular optimizer.step()). Step in backward "
                "with guess_optim.optim.OptimizerInBackward(model, factory).",
                stacklevel=user_stacklevel(),
            )
