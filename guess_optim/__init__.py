"""guess_optim: train PyTorch models with guessed gradients.

Implements Singhal et al., "How to Guess a Gradient" (arXiv 2312.04709): guess a direction for the gradient,
measure the directional derivative with forward-mode AD, and write the estimate into ``p.grad``.
"""

from .engine import (
    GUESS_POINT_TYPES,
    GuessHandle,
    GuessingNotSupportedError,
    NonFiniteEstimateWarning,
    attach,
    handle_of,
)
from .graph import GraphError
from .guesses import METHODS, Method
from .optim import StableAdamW
from .prompts import PromptTokens
from .trainer import GuessedGradientTrainer

__all__ = [
    "GUESS_POINT_TYPES",
    "METHODS",
    "GraphError",
    "GuessHandle",
    "GuessedGradientTrainer",
    "GuessingNotSupportedError",
    "Method",
    "NonFiniteEstimateWarning",
    "PromptTokens",
    "StableAdamW",
    "attach",
    "handle_of",
]

__version__ = "0.1.0.dev0"
