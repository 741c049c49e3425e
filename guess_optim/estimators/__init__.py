"""Estimators: one class per way to guess a gradient, in one registry.

The built-ins, registered in this order: ``backprop`` (the oracle), ``directional`` and ``activation`` (unbiased,
paper A.4), ``mixing`` (§2.2), ``wt`` (§2.1), ``downstream`` (§2.1) and ``self-sharpening`` (§3); then the follow-up
estimators (``research/follow-up-estimators.md``; Wang, Markou, Campbell 2025): ``wt-perp`` (``W̃⊥``), ``wt-perp-ns``
(its Newton–Schulz variant) and ``wt-precond`` (the whitened ``Wᵀ``). Add your own with :func:`register_estimator`
(see :class:`Estimator`).
"""

# ruff: noqa: I001  (the import order is the registration order, which is the order METHODS lists the built-ins in)
from .base import METHODS, Estimator, get_estimator, make_estimator, register_estimator, unregister_estimator
from .backprop import Backprop
from .directional import Directional
from .activation import Activation
from .mixing import Mixing
from .wt import WT
from .downstream import Downstream
from .self_sharpening import SelfSharpening
from .wt_perp import WTPerp
from .wt_perp_ns import WTPerpNS
from .wt_precond import WTPrecond

__all__ = [
    "METHODS",
    "WT",
    "WTPerp",
    "WTPerpNS",
    "WTPrecond",
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
