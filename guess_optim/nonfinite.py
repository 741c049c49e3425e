"""What happens to a step whose directional derivatives or estimates are not finite: it never reaches the weights
silently (``on_nonfinite`` of :func:`~guess_optim.attach`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .contexts import user_stacklevel
from .errors import NonFiniteEstimateWarning

__all__ = ["NONFINITE_POLICIES", "NonFinitePolicy"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")


class NonFinitePolicy:
    """Checks each step's estimate once (one device sync per step) and counts the skipped steps.

    Args:
        mode: ``"skip"`` (warn with :class:`NonFiniteEstimateWarning`, write nothing), ``"raise"``
            (``FloatingPointError``) or ``"propagate"`` (write it as backprop would, for a ``GradScaler`` to see).

    Attributes:
        skipped_steps: steps whose estimate was not finite.
        last_step_skipped: whether the most recent step's estimate was not finite.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.skipped_steps = 0
        self.last_step_skipped = False

    def apply(self, d: Tensor, grads: Sequence[Tensor | None], params: Sequence[Tensor],
              skipped: Sequence[str] = ()) -> list[Tensor | None]:
        """The gradients to return for ``params`` (cast to each parameter's dtype), or ``None``s for a skipped step.

        ``skipped`` names the parameters whose estimate was already found not finite and not delivered
        (``gradient_release=True``, :mod:`guess_optim.release`): the step counts as skipped, and their names are in the
        warning.

        Raises:
            FloatingPointError: not finite, with ``mode="raise"``.
        """
        present = [g for g in grads if g is not None]
        norms = torch._foreach_norm(present) if present else []
        # a norm is finite exactly when every element is (barring float overflow of the norm itself, which would flag
        # an estimate too large to use anyway)
        finite = bool(torch.isfinite(torch.stack([d.sum(), *norms])).all()) and not skipped
        self.last_step_skipped = not finite
        if not finite and self.mode == "propagate":
            self.skipped_steps += 1  # written as is, for a GradScaler to see the overflow and back off
        elif not finite:
            msg = ("non-finite directional derivative or estimate: the estimate was not written to p.grad "
                   f"(skipped steps so far: {self.skipped_steps + 1})")
            if skipped:
                msg = (f"non-finite estimate of {', '.join(skipped)}: not delivered, so the optimizer step of these "
                       "parameters was skipped (gradient_release=True; skipped steps so far: "
                       f"{self.skipped_steps + 1})")
            if self.mode == "raise":
                raise FloatingPointError(msg)
            self.skipped_steps += 1
            warnings.warn(msg, NonFiniteEstimateWarning, stacklevel=user_stacklevel())
            return [None] * len(grads)
        return [None if g is None else g.to(p.dtype) for g, p in zip(grads, params, strict=True)]
