"""The errors and warnings of guessing."""

from __future__ import annotations

from .graph import GraphError

__all__ = ["GraphError", "GuessingNotSupportedError", "NonFiniteEstimateWarning"]


class GuessingNotSupportedError(RuntimeError):
    """The model contains an op through which forward-mode AD (and so guessing) cannot go, or a pattern the engine
    cannot estimate correctly; the message names it and the fix."""


class NonFiniteEstimateWarning(RuntimeWarning):
    """A step's directional derivatives or estimates were not finite; the estimate was not written."""
