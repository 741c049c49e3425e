"""What a guessing forward runs under: no reverse graph, the model's own ``no_grad`` regions kept, the engine's own
small reverse passes kept out of a user's checkpointing (paper A.4: forward-mode AD, no backpropagation through the
network)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["NoGradRegions", "own_autograd", "parameters_frozen", "primal", "load_jvp_decompositions", "user_stacklevel"]


def primal(x: Any) -> Any:
    """The values of a dual tensor, detached: ``unpack_dual``'s primal is a view that keeps the dual tensor, and so
    its tangent, alive for as long as it is held (a record would pin every layer's tangent until the step ends)."""
    if isinstance(x, Tensor):
        p, tangent = fwAD.unpack_dual(x)
        return x if tangent is None else p.detach()
    return x


class NoGradRegions(TorchFunctionMode):
    """Backprop treats what a model computes under ``torch.no_grad()`` as a constant; forward-mode AD does not
    (tangents ignore grad mode). Under this mode, an op run with grad disabled sees only its inputs' primals, so its
    outputs carry no tangent, as backprop's carry no gradient. The guessing forward runs with grad enabled (and the
    parameters briefly not requiring grad, so no reverse graph is recorded) for the user's regions to be visible."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            args, kwargs = tree_map(primal, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_frozen(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Grad enabled (the user's ``no_grad`` regions stay visible), but no reverse graph through ``params``; and
    Hugging Face gradient checkpointing off (``module.gradient_checkpointing``): without a reverse graph there is
    nothing to recompute, and a reentrant checkpoint (an autograd Function with no JVP) would stop the tangents."""
    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    for m in checkpointing:
        m.gradient_checkpointing = False
    before = [p.requires_grad for p in params]  # restored as found: nested (the recompute replay discovers inside)
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
        for m in checkpointing:
            m.gradient_checkpointing = True


def own_autograd() -> contextlib.ExitStack:
    """Grad enabled for the engine's own small reverse passes (replays, local VJPs), with their saved tensors kept
    as they are even inside a user's ``torch.utils.checkpoint`` region (whose hooks would defer them to a
    recomputation)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    return stack


def load_jvp_decompositions() -> None:
    """Import torch's forward-AD decompositions now, quietly. ``make_dual`` imports them on first use, and that import
    runs ``torch.jit.script``, which warns (a ``FutureWarning``) on recent versions: the one warning is silenced
    where it is raised, without touching the user's warning filters."""
    if "torch._decomp.decompositions_for_jvp" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def user_stacklevel() -> int:
    """``stacklevel`` for a warning raised from inside ``backward()``: the first frame outside torch and this package
    (the user's ``loss.backward()`` line), counted from the caller of this function."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level
