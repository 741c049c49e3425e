"""Optimizers bundled with guess_optim, usable with guessed gradients and with ordinary backprop alike."""

from guess_optim.optim.stable_adamw import StableAdamW, stable_adamw

__all__ = ["StableAdamW", "stable_adamw"]
