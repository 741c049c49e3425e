"""The engine's public names, importable from here as before the package was split (``guess_optim.engine``).

The engine lives in :mod:`guess_optim.attach` (:func:`attach`), :mod:`guess_optim.handle` (:class:`GuessHandle`),
:mod:`guess_optim.step` (one guessing forward and its backward), :mod:`guess_optim.site`, :mod:`guess_optim.records`,
:mod:`guess_optim.local_grad`, :mod:`guess_optim.replay` and :mod:`guess_optim.graph`.
"""

from .attach import attach, handle_of
from .errors import GuessingNotSupportedError, NonFiniteEstimateWarning
from .handle import GuessHandle
from .layout import GUESS_POINT_TYPES

__all__ = [
    "GUESS_POINT_TYPES",
    "GuessHandle",
    "GuessingNotSupportedError",
    "NonFiniteEstimateWarning",
    "attach",
    "handle_of",
]
