"""Optimizers by name: the one factory behind ``guess-optim train --optimizer``, the reproductions' ``optimizer=``
fields and the Hugging Face trainer's ``guess_optimizer=``.

Defaults differ from torch's in one place: ``weight_decay`` is 0 for every optimizer (torch's AdamW defaults to 0.01),
so a name alone gives the plain method. The paper's optimizers are AdamW, SGD and StableAdamW (App. A.3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .._checks import check_choice
from .stable_adamw import StableAdamW

__all__ = ["OPTIMIZERS", "build_optimizer", "optimizer_cls_and_kwargs"]

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam", "stable-adamw")
"""Names accepted by :func:`build_optimizer`: ``torch.optim.AdamW``, ``SGD``, ``Adam`` and
:class:`~guess_optim.optim.StableAdamW`."""

_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "stable-adamw": StableAdamW,
}
_ADAM_FAMILY = ("adamw", "adam", "stable-adamw")


def optimizer_cls_and_kwargs(
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and constructor keyword arguments of optimizer ``name`` (what ``transformers.Trainer`` takes as
    ``optimizer_cls_and_kwargs``); :func:`build_optimizer` calls the class with them.

    Args:
        name: one of :data:`OPTIMIZERS`.
        lr: learning rate.
        momentum: SGD momentum; ignored by the others. (default: 0.0)
        weight_decay: decoupled (AdamW, StableAdamW) or L2 (SGD, Adam) weight decay. (default: 0.0)
        betas: ``(beta1, beta2)`` of the Adam family; ignored by SGD. (default: ``None``, the class's own)
        eps: ``eps`` of the Adam family; ignored by SGD. (default: ``None``, the class's own)

    Raises:
        ValueError: unknown ``name`` (``Invalid optimizer: ...``).
    """
    check_choice("optimizer", name, OPTIMIZERS)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = momentum
    if name in _ADAM_FAMILY:
        kwargs.update({k: v for k, v in (("betas", betas), ("eps", eps)) if v is not None})
    return _CLASSES[name], kwargs


def build_optimizer(
    name: str,
    params: ParamsT,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params`` (parameters or parameter groups).

    Example::

        opt = build_optimizer("stable-adamw", model.parameters(), lr=1e-3)

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: the parameters to optimize, or a list of parameter-group dicts.
        lr, momentum, weight_decay, betas, eps: as in :func:`optimizer_cls_and_kwargs`.

    Returns:
        The optimizer.

    Raises:
        ValueError: unknown ``name``, or a hyper-parameter the optimizer rejects.
    """
    cls, kwargs = optimizer_cls_and_kwargs(name, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas,
                                           eps=eps)
    return cls(params, **kwargs)
