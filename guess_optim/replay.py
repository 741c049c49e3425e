"""``store="recompute"``: the second forward, run from ``backward()``, that regenerates each guess point's input and
guess and forms its estimate at once, so no activation outlives its layer (the memory-lean mode)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from ._rng import capture_rng, cuda_devices, replayed_rng
from .contexts import parameters_frozen, primal
from .ops import GuessingMode

if TYPE_CHECKING:
    from .handle import GuessHandle
    from .step import GuessingStep

__all__ = ["replay", "save_for_replay"]


def save_for_replay(handle: GuessHandle, args: tuple, kwargs: dict) -> dict[str, Any]:
    """What the second forward needs: the inputs (values), the global RNG, the handle's generators, the buffers as
    the forward found them (a forward that updates a buffer, e.g. an EMA or a queue, must be replayed on the values it
    read) and every module's training mode (a ``model.eval()`` before ``backward()`` must not replay without the
    dropout masks)."""
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim() > 0]
    return {"args": tree_map(primal, args), "kwargs": tree_map(primal, kwargs),
            "rng": capture_rng(cuda_devices(leaves[:1])),
            "generators": {d: g.get_state() for d, g in handle._generators.items()},
            "buffers": [b.detach().clone() for b in handle.model.buffers()],
            "training": [m.training for m in handle.model.modules()]}


def replay(step: GuessingStep) -> dict[int, Tensor]:
    """Run the model again on the step's saved inputs, with the generator and global RNG states of its forward (so
    the guesses and dropout masks are the same), in replay mode: each guess point adds its estimate to the replay's
    ``grads`` as soon as it is called. Buffers the forward updates (running statistics) and every generator are put
    back as they were before the replay.

    Returns:
        ``{id(parameter): estimate}``.
    """
    from .step import GuessingStep, repeat_labels

    handle, saved = step.handle, step.saved
    model = handle.model
    again = GuessingStep(handle, batch=step.batch, graph=step.graph, trainable=step.trainable, replaying=True)
    again.d, again.grad_rep, again.release = step.d, step.grad_rep, step.release
    trainable = [p for p in model.parameters() if id(p) in step.trainable]
    needs_graph = handle.estimator.needs is not None or handle.exact_head
    buffers = [b.detach().clone() for b in model.buffers()]  # the user's forward already updated them
    with torch.no_grad():
        for b, value in zip(model.buffers(), saved["buffers"], strict=True):
            b.copy_(value)  # the replay reads what the forward read
    modes = [m.training for m in model.modules()]  # the user's, now: put back after the replay
    for m, mode in zip(model.modules(), saved["training"], strict=True):
        m.training = mode
    try:
        # the same attention kernel as the first forward, so attention dropout draws the same masks
        with handle.generators_at(saved["generators"]), replayed_rng(saved["rng"]), \
                parameters_frozen(model, trainable), sdpa_kernel([SDPBackend.MATH]):
            if again.graph is None and needs_graph:
                # as the first forward discovered: labels repeated, the step's trainable parameters (frozen here)
                again.graph = handle.graphs.get(saved["args"], repeat_labels(saved["kwargs"], step.batch,
                                                                             handle.num_guesses), trainable,
                                                step.rows)
                again.graph_uses = handle.graphs.uses(again.graph, handle.guess_points, handle.exact_head)
            handle._step = again
            with GuessingMode(again):
                with handle.internal():
                    args, kwargs = again.guess_inputs(saved["args"], saved["kwargs"], saved["needing_grad"])
                model(*args, **kwargs)
    finally:
        again.closed = True
        handle._step = None
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
        with torch.no_grad():
            for b, value in zip(model.buffers(), buffers, strict=True):
                b.copy_(value)
    grads, again.grads = again.grads, {}  # the only reference left: autograd then takes the tensors without a copy
    return grads
