"""Which modules of a model are guess points, and what else the engine must know about them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from .local_grad import has_product_tangent
from .prompts import PromptTokens

__all__ = ["GUESS_POINT_TYPES", "Layout", "is_fast_path", "unsupported_parameters"]

GUESS_POINT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    PromptTokens,
)
"""Module types that can hold trainable parameters under guessing. Each is linear in its parameters, so its
weight-space JVP is the module evaluated with the tangents in place of the parameters."""

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, *_BATCHNORM)


@dataclass
class Layout:
    """The modules of an attached model, sorted by what the engine does with them.

    Attributes:
        names: module → qualified name.
        guess_points: modules with trainable parameters of :data:`GUESS_POINT_TYPES`.
        tracked: guess points and frozen modules of those types (what graph discovery records edges between).
        frozen_norms: frozen normalization layers, traced through like parameter-free ops (paper A.6: a prompt's
            ``Wᵀ`` guess is built from the modules that consume it, through the frozen LayerNorm).
        product_modules: Linear and zero-padded convolutions, whose tangent is computed apart from the primal.
    """

    names: dict[nn.Module, str]
    guess_points: list[nn.Module] = field(default_factory=list)
    tracked: list[nn.Module] = field(default_factory=list)
    frozen_norms: list[nn.Module] = field(default_factory=list)
    product_modules: list[nn.Module] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        layout = cls(names={m: n for n, m in model.named_modules()})
        for m in model.modules():
            if has_product_tangent(m) and _plain_parameters(m):
                layout.product_modules.append(m)
            if is_fast_path(m):
                if any(p.requires_grad for p in m.parameters(recurse=False)):
                    layout.guess_points.append(m)
                    layout.tracked.append(m)
                elif isinstance(m, _NORMS):
                    layout.frozen_norms.append(m)
                else:
                    layout.tracked.append(m)
        return layout


def is_fast_path(m: nn.Module) -> bool:
    """Whether ``m`` is a guess point of :data:`GUESS_POINT_TYPES` whose parameters are its own ``weight`` and
    ``bias`` as its ``forward`` reads them: not parametrized (``torch.nn.utils.parametrize``), no hook-based
    ``weight_norm``/``spectral_norm`` (``weight_g``/``weight_v``/``weight_orig``). Other modules are guessed op by op
    (:mod:`guess_optim.ops`)."""
    return isinstance(m, GUESS_POINT_TYPES) and _plain_parameters(m)


def _plain_parameters(m: nn.Module) -> bool:
    return not parametrize.is_parametrized(m) and all(n in ("weight", "bias") for n, _ in m.named_parameters(
        recurse=False)) and isinstance(getattr(m, "weight", None), (nn.Parameter, type(None)))


def unsupported_parameters(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """``(module name, module, [parameter names])`` of trainable parameters outside the fast paths (guessed op by op,
    or refused with ``raw_parameters="error"``)."""
    out = []
    for name, mod in model.named_modules():
        own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if own and not is_fast_path(mod):
            out.append((name, mod, own))
    return out
