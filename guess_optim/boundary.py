"""The boundary of the guessing region: every output that carries a tangent leaves through it.

Each such output ``z_i`` (the head's logits, and whatever else the model returns that depends on the guesses: hidden
states, auxiliary outputs) passes through :class:`GuessedGradient`, which is the identity in the forward and keeps
``∂L/∂z_i`` in the backward. All of them hang from one *anchor*, the output of :class:`Estimate`, whose inputs are
the trainable parameters (and the model inputs that require grad): autograd runs ``Estimate.backward`` only after
every ``GuessedGradient.backward``, so it sees all the ``∂L/∂z_i`` and forms ``d_b = Σ_i <∂L/∂z_{i,b}, ż_{i,b}>``,
then returns the estimates as the parameters' gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

from .errors import GuessingNotSupportedError

if TYPE_CHECKING:
    from .step import GuessingStep

__all__ = ["GuessedGradient", "Estimate", "collect"]


class Estimate(torch.autograd.Function):
    """The anchor: a scalar zero whose backward returns every estimate of the step."""

    @staticmethod
    def forward(ctx, step, *tensors):  # noqa: D401
        ctx.step = step
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        step = ctx.step
        if step is None:
            raise RuntimeError(
                "guess_optim: a second backward through the same guessing forward (retain_graph=True) is not "
                "supported: its guesses were freed by the first backward. Sum the losses and call backward() "
                "once, or run the forward again."
            )
        ctx.step = None  # free the batch's tensors as soon as the estimate is made
        return (None, *step.estimate())


class GuessedGradient(torch.autograd.Function):
    """Identity on one output of the guessing region; its backward keeps ``∂L/∂z`` for the step."""

    @staticmethod
    def forward(ctx, step, index, z, anchor, dim=0):  # noqa: D401
        ctx.step, ctx.index, ctx.dim = step, index, dim
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad_z):
        if torch.is_grad_enabled():  # create_graph=True: the loss differentiates the model's output
            raise GuessingNotSupportedError(
                "a derivative of the model's output is being differentiated again (torch.autograd.grad(..., "
                "create_graph=True) or backward(create_graph=True): a physics-informed loss, a gradient penalty, "
                "input-gradient regularisation). Guessed gradients give first derivatives of the loss only: compute "
                "this loss with exact gradients (method='backprop', or under handle.paused())."
            )
        if ctx.step is not None:  # one row per example on dim 0, as the step keeps the output's tangent
            ctx.step.grad_z[ctx.index] = grad_z.movedim(ctx.dim, 0) if ctx.dim else grad_z
        return None, None, None, grad_z.new_zeros(()), None


def collect(step: GuessingStep, output: Any, where: str, primary: bool) -> Any:
    """``output`` with each tensor that carries a tangent replaced by its value through :class:`GuessedGradient` (and,
    with ``num_guesses=K``, every batch-shaped tensor cut back to the user's ``B`` rows). With ``primary`` (the head's
    output, or the model's when it is its own head), its first batch-shaped floating tensor goes through it even
    without a tangent: ``∂L/∂z`` of the logits is what ``exact_head`` differentiates.

    Raises:
        GuessingNotSupportedError: a tensor that depends on the guesses but has no batch dim (a loss computed inside
            ``forward`` from the guessed activations: the per-example directional derivatives cannot be formed). The
            batch may be on another dim the engine followed (an RNN's final state ``(layers, B, H)``), except in the
            head's output with ``exact_head``.
    """
    leaves, spec = tree_flatten_with_path(output)
    values = [leaf for _, leaf in leaves]
    rows, batch = step.rows, step.batch
    for i, (path, leaf) in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            _refuse_opaque(leaf, f"{where}{keystr(path)}")
            continue
        value, tangent = fwAD.unpack_dual(leaf)
        if tangent is None and primary and not step.tangents and leaf.is_floating_point() and leaf.dim() > 0 and (
                leaf.shape[0] == rows):
            tangent = torch.zeros_like(value)
        if tangent is None:
            if step.k > 1 and leaf.dim() > 0 and leaf.shape[0] == rows:
                values[i] = leaf[:batch]
            continue
        entry = step.tracker.batch(leaf)
        # the batch on another known dim (an RNN's final state (layers, B, H)): moved to dim 0 for the estimate
        dim = entry[0].dim if entry is not None and entry[0].fold == 1 and entry[0].dim else 0
        if dim and (leaf.shape[dim] != rows or (not step.tangents and step.handle.exact_head)):
            dim = -1
        if leaf.dim() == 0 or dim < 0 or (entry is not None and dim == 0 and tuple(entry[0]) != (0, 1)) or (
                leaf.shape[dim] != rows):
            name = f"{where}{keystr(path)}"
            raise GuessingNotSupportedError(
                f"the output {name} (shape {tuple(leaf.shape)}) depends on the guesses but its dim 0 is not the batch "
                f"({rows} rows): each example's directional derivative needs per-example outputs. A loss computed "
                "inside forward is the usual cause: pass head=<the module that produces the logits> to attach() (the "
                "loss after it is then computed as usual), or compute the loss outside forward."
            )
        index = len(step.tangents)
        step.tangents.append(tangent.detach().movedim(dim, 0) if dim else tangent.detach())
        value = value.detach()
        values[i] = GuessedGradient.apply(step, index, value.narrow(dim, 0, batch) if step.k > 1 else value,
                                          step.anchor, dim)
    return tree_unflatten(values, spec)


def _refuse_opaque(leaf: Any, name: str) -> None:
    """An output object that ``torch.utils._pytree`` does not open (a plain ``@dataclass``, a ``SimpleNamespace``, a
    custom class) holding tensors that carry the guesses: they would leave the guessing region unseen (their part of
    the loss dropped from the estimate). Refused, naming the fix."""
    fields = getattr(leaf, "__dict__", None)
    if not isinstance(fields, dict) or isinstance(leaf, type):
        return
    for key, value in fields.items():
        if isinstance(value, Tensor) and fwAD.unpack_dual(value).tangent is not None:
            raise GuessingNotSupportedError(
                f"the output {name} is a {type(leaf).__name__} whose field {key!r} depends on the guesses, but "
                "guess_optim reads outputs through torch.utils._pytree (tensors, tuples, lists, dicts, namedtuples, "
                "Hugging Face ModelOutput): return one of those, register the class "
                "(torch.utils._pytree.register_dataclass), or pass head=<the module producing the logits> to attach()."
            )
