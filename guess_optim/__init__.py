"""guess_optim: train PyTorch models with guessed gradients.

Implements Singhal et al., "How to Guess a Gradient" (arXiv 2312.04709): guess a direction for the gradient,
measure the directional derivative with forward-mode AD, and write the estimate into ``p.grad``.
"""

from .attach import attach, handle_of
from .check import CheckReport, check
from .errors import GraphError, GuessingNotSupportedError, NonFiniteEstimateWarning
from .estimators import METHODS, Estimator, get_estimator, register_estimator, unregister_estimator
from .handle import GuessHandle
from .layout import GUESS_POINT_TYPES
from .optim import StableAdamW
from .prompts import PromptTokens
from .site import Site
from .trainer import GuessedGradientTrainer

__all__ = [
    "GUESS_POINT_TYPES",
    "METHODS",
    "CheckReport",
    "Estimator",
    "GraphError",
    "GuessHandle",
    "GuessedGradientTrainer",
    "GuessingNotSupportedError",
    "Method",
    "NonFiniteEstimateWarning",
    "PromptTokens",
    "Site",
    "StableAdamW",
    "attach",
    "check",
    "get_estimator",
    "handle_of",
    "register_estimator",
    "unregister_estimator",
]

Method = Estimator  # the registry's entries were ``Method`` records before estimators became classes

__version__ = "0.1.0.dev0"
