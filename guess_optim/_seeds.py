"""Seeds derived from a base seed: independent, reproducible streams without touching any global RNG.

Used by ``guess-optim train`` (shuffling and guess seeds from ``--seed``) and by every reproduction (model init, data
order and guesses from ``config.seed``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*keys: int) -> int:
    """A seed in ``[0, 2**62)`` derived from integer ``keys`` by ``numpy.random.SeedSequence`` (no global RNG).

    Different key tuples give statistically independent seeds (``derive_seed(seed, 1)`` for the data order,
    ``derive_seed(seed, 2, step)`` for the guesses of one measurement, ...); the same tuple always gives the same seed.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(2))
