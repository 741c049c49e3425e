"""Step each parameter inside ``backward()``: one optimizer per parameter, stepped from its post-accumulate-grad hook.

This is PyTorch's "optimizer step in backward" (the tutorial "How to save memory by fusing the optimizer step into the
backward pass") and optimi's "gradient release": a parameter's gradient is applied and freed as soon as autograd has
accumulated it, so the gradients of the whole model never coexist. With guessed gradients, pair it with
``attach(..., gradient_release=True)`` (each estimate is then delivered as soon as it is complete; with
``store="recompute"`` a step peaks at about one layer above the weights and optimizer state). It works with plain
backprop as well.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["OptimizerInBackward"]


class OptimizerInBackward:
    """One optimizer per trainable parameter, each stepped (then its ``p.grad`` freed) from the parameter's
    post-accumulate-grad hook, i.e. during ``backward()``.

    Example::

        handle = attach(model, "wt", store="recompute", gradient_release=True)
        opt = OptimizerInBackward(model, lambda params: torch.optim.AdamW(params, lr=1e-3))
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()  # every parameter is stepped here; no opt.step()
        opt.remove()                                  # back to a model without hooks

    Element-wise optimizers (SGD, Adam, AdamW, :class:`~guess_optim.optim.StableAdamW`, whose update clipping is per
    tensor) give exactly the parameters of one optimizer over all of them. What needs every gradient at once cannot run
    in backward: global-norm clipping (``clip_grad_norm_`` over the model; use ``max_grad_norm``, which clips each
    parameter on its own), gradient accumulation over micro-batches, ``GradScaler``, DDP/FSDP's averaging across
    ranks. A parameter that gets no gradient in a step is not stepped (no hook runs), as a regular optimizer skips a
    ``None`` grad.

    Args:
        params: a module (its parameters that require grad) or an iterable of parameters, each once.
        factory: called once per parameter with a one-element list ``[p]``; returns that parameter's optimizer, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.1)`` or ``lambda ps: StableAdamW(ps, lr=1e-3)``. Several
            hyper-parameter groups: one :class:`OptimizerInBackward` per group.
        max_grad_norm: clip each parameter's gradient to this 2-norm before its step. (default: ``None``, no
            clipping)

    Attributes:
        optimizers: ``{parameter: its optimizer}`` (in the order of ``params``).

    Raises:
        ValueError: no parameter, a parameter given twice or not requiring grad, an invalid ``max_grad_norm``, or an
            optimizer whose ``step`` requires a closure (``LBFGS``: it re-evaluates the loss, which cannot be done
            from inside ``backward()``).
        TypeError: ``factory`` is not callable or returns something other than a ``torch.optim.Optimizer``.
    """

    def __init__(self, params: nn.Module | Iterable[Tensor], factory: Callable[[list[Tensor]], Optimizer], *,
                 max_grad_norm: float | None = None):
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        params = list(params)
        if not callable(factory):
            raise TypeError(f"factory must be callable ([p] -> torch.optim.Optimizer), got {type(factory).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; expected None or a float > 0")
        if not params:
            raise ValueError("OptimizerInBackward got no parameters (none requires grad?)")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is given twice (tied weights?): pass each parameter once")
        for p in params:
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise ValueError("every parameter must be a tensor that requires grad (freeze parameters by leaving "
                                 "them out)")
        self.max_grad_norm = max_grad_norm
        self.optimizers: dict[Tensor, Optimizer] = {}
        for p in params:
            opt = factory([p])
            if not isinstance(opt, Optimizer):
                raise TypeError(f"factory returned {type(opt).__name__}, expected a torch.optim.Optimizer")
            if _requires_closure(opt):
                raise ValueError(
                    f"{type(opt).__name__}.step() requires a closure (it re-evaluates the loss), which cannot run "
                    "inside backward(): OptimizerInBackward steps with step() alone. Use an optimizer whose closure is "
                    "optional (SGD, Adam, AdamW, StableAdamW), or step this one in a plain loop "
                    "(optimizer.step(closure) after backward(), without OptimizerInBackward and gradient_release)"
                )
            self.optimizers[p] = opt
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def _step(self, p: Tensor) -> None:
        """The hook: clip (``max_grad_norm``), step this parameter's optimizer, free ``p.grad``."""
        if p.grad is None:  # autograd runs the hook for an undefined gradient too
            return
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm, foreach=False)
        opt = self.optimizers[p]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every optimizer's parameter groups (set ``g["lr"]`` on each to change the learning rate)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's ``.grad`` (the hooks already free it after each step)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": [each optimizer's state_dict()]}``, in the order of the parameters."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same parameters, same order).

        Raises:
            ValueError: a different number of parameters.
        """
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(states)} optimizers, this OptimizerInBackward has "
                             f"{len(self.optimizers)} parameters")
        for opt, s in zip(self.optimizers.values(), states, strict=True):
            opt.load_state_dict(s)

    def remove(self) -> None:
        """Remove the hooks (a later ``backward()`` writes ``p.grad`` again); safe to call more than once."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> OptimizerInBackward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __iter__(self) -> Iterator[Optimizer]:
        return iter(self.optimizers.values())

    def __len__(self) -> int:
        return len(self.optimizers)

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self.optimizers.values()})
        return f"OptimizerInBackward({len(self)} parameters, {'/'.join(kinds)}, hooks={'on' if self._hooks else 'off'})"


def _requires_closure(opt: Optimizer) -> bool:
    """Whether ``opt.step`` has a ``closure`` parameter without a default (``LBFGS``): it cannot step in backward."""
    try:
        closure = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read (a builtin): assume step() alone works
        return False
    return (closure is not None and closure.default is inspect.Parameter.empty
            and closure.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
