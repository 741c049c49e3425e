"""Optimizers bundled with guess_optim, usable with guessed gradients and with ordinary backprop alike, and the
factory that builds any supported optimizer by name."""

from guess_optim.optim.factory import OPTIMIZERS, build_optimizer, optimizer_cls_and_kwargs
from guess_optim.optim.stable_adamw import StableAdamW, stable_adamw

__all__ = ["OPTIMIZERS", "StableAdamW", "build_optimizer", "optimizer_cls_and_kwargs", "stable_adamw"]
