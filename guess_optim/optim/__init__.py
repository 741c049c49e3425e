"""Optimizers bundled with guess_optim, usable with guessed gradients and with ordinary backprop alike, the factory
that builds any supported optimizer by name, and :class:`OptimizerInBackward` (one optimizer per parameter, stepped
during ``backward()``)."""

from guess_optim.optim.factory import OPTIMIZERS, build_optimizer, optimizer_cls_and_kwargs
from guess_optim.optim.in_backward import OptimizerInBackward
from guess_optim.optim.stable_adamw import StableAdamW, stable_adamw

__all__ = ["OPTIMIZERS", "OptimizerInBackward", "StableAdamW", "build_optimizer", "optimizer_cls_and_kwargs",
           "stable_adamw"]
