"""Estimators: one class per way to guess a gradient, in one registry.

The built-ins, registered in this order: ``backprop`` (the oracle), ``directional`` and ``activation`` (unbiased,
paper A.4), ``mixing`` (§2.2), ``wt`` (§2.1), ``downstream`` (§2.1) and ``self-sharpening`` (§3). Add your own with
:func:`register_estimator` (see :class:`Estimator`).
"""

from .activation import Activation  # noqa: I001  (registration order: the registry lists the built-ins so)
from .backprop import Backprop
from .base import METHODS, Estimator, get_estimator, make_estimator, register_estimator, unregister_estimator
from .directional import Directional
from .downstream import Downstream
from .mixing import Mixing
from .self_sharpening import SelfSharpening
from .wt import WT

__all__ = [
    "METHODS",
    "WT",
    "Activation",
    "Backprop",
    "Directional",
    "Downstream",
    "Estimator",
    "Mixing",
    "SelfSharpening",
    "get_estimator",
    "make_estimator",
    "register_estimator",
    "unregister_estimator",
]
