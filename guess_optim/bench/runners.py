"""Models, batches and runners: one way to take a training step on a private copy of a model.

Every runner takes the same step: ``optimizer.zero_grad()``, an estimate written into ``p.grad``,
``optimizer.step()``, with ``torch.optim.AdamW(lr=1e-4, weight_decay=0)`` (a store that steps in backward,
``@release``: one such AdamW per parameter, stepped from its post-accumulate-grad hook during ``backward()``). Only the
estimate differs: backprop's ``loss.backward()``, a guessed method's ``loss.backward()`` after
:func:`guess_optim.attach` (which writes guessed gradients), or a peer's estimator (:mod:`guess_optim.bench.peers`).
Each runner owns a copy of the model with the same initial weights; all use the same batch.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import attach
from ..models import MLP, ConvNet
from ..optim import OptimizerInBackward
from .floors import STORES, parse_runner
from .peers import Unavailable
from .suite import Config

__all__ = ["IMAGE", "LR", "NUM_CLASSES", "Built", "Runner", "build"]

LR = 1e-4
IMAGE = (3, 32, 32)  # CIFAR-10-shaped inputs for the MLPs and the ConvNet (paper §3)
NUM_CLASSES = 10


@dataclass
class Built:
    """A model with its batch.

    Attributes:
        model: in train mode.
        x: the inputs, ``[B, 3, 32, 32]`` (MLP, ConvNet) or ``[B, 3, H, W]`` (ViT).
        y: the class labels, ``[B]``.
        head: attribute name of the logits module for models whose output is not a tensor (``attach(head=...)``).
        logits: ``logits(model, x)`` → ``[B, NUM_CLASSES]``.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    head: str | None
    logits: Callable[[nn.Module, Tensor], Tensor]


def _vit(config: Config) -> tuple[nn.Module, int]:
    """A frozen, randomly initialised ViT with 10 trained prompt tokens and head, and its image size."""
    try:
        from transformers import ViTConfig, ViTForImageClassification

        from ..integrations.vpt import VisualPromptTuning, VPTConfig
    except ImportError as err:
        raise Unavailable(f"ViT prompt tuning needs transformers: pip install \"guess-optim[hf]\" ({err})") from err
    vit_config = ViTConfig(num_labels=NUM_CLASSES) if config.model == "vpt-vit-b16" else ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = VisualPromptTuning(ViTForImageClassification(vit_config),
                                   VPTConfig(num_prompt_tokens=10, prompt_dropout=0.0))
    return model, vit_config.image_size


def build(config: Config, device: torch.device, seed: int) -> Built:
    """The model of ``config`` (train mode, initialised from ``seed``), a random batch, and how to get logits.

    Raises:
        Unavailable: a ViT without ``transformers`` installed.
    """
    torch.manual_seed(seed)
    if config.model == "mlp":
        model, x = MLP(math.prod(IMAGE), NUM_CLASSES, config.depth, config.width), torch.randn(config.batch, *IMAGE)
        head, logits = None, _call
    elif config.model == "convnet":
        model, x = ConvNet(IMAGE[0], NUM_CLASSES), torch.randn(config.batch, *IMAGE)
        head, logits = None, _call
    else:
        model, size = _vit(config)
        x = torch.randn(config.batch, 3, size, size)
        head, logits = "classifier", _logits_attribute
    y = torch.randint(0, NUM_CLASSES, (config.batch,))
    return Built(model.to(device).train(), x.to(device), y.to(device), head, logits)


def _call(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _logits_attribute(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).logits


class Runner:
    """One way to take a training step, on a private copy of the model (module docstring).

    Args:
        name: a runner name (:func:`~guess_optim.bench.floors.parse_runner`).
        built: the model and batch; the model is copied.
        seed: seed of the guesses or of the peer's perturbations.

    Raises:
        ValueError: unknown runner.
        Unavailable: the runner cannot run here (an optional dependency is missing).
    """

    def __init__(self, name: str, built: Built, *, seed: int):
        parsed = parse_runner(name)
        self.name = name
        self.model = copy.deepcopy(built.model)
        self.x, self.y, self._logits = built.x, built.y, built.logits
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.in_backward = parsed.peer is None and STORES[parsed.store].in_backward
        adamw = functools.partial(torch.optim.AdamW, lr=LR, weight_decay=0.0)
        self.optimizer = OptimizerInBackward(self.params, adamw) if self.in_backward else adamw(self.params)
        self.handle = None
        if parsed.peer is not None:
            self._estimate = parsed.peer.make(self.params, self.loss, seed)
            return
        if parsed.space != "backprop":
            head = getattr(self.model, built.head) if built.head else None
            self.handle = attach(self.model, parsed.method, seed=seed, head=head, **STORES[parsed.store].attach)
        self._estimate = self._backward

    def loss(self) -> Tensor:
        """The cross-entropy of the batch at the current parameters (a scalar)."""
        return F.cross_entropy(self._logits(self.model, self.x), self.y)

    def _backward(self) -> None:
        self.loss().backward()

    def step(self) -> None:
        """One training step: ``zero_grad``, the estimate into ``p.grad``, ``AdamW.step`` (in backward, per parameter,
        for a store that steps there)."""
        self.optimizer.zero_grad()
        self._estimate()
        if not self.in_backward:
            self.optimizer.step()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the resident training state: ``weights_bytes`` (parameters and buffers), ``grad_bytes`` and
        ``optimizer_bytes`` (tensors of the optimizer state that are not parameters), each storage counted once."""
        weights, seen = _storage_bytes([*self.model.parameters(), *self.model.buffers()], set())
        grads, seen = _storage_bytes([p.grad for p in self.params if p.grad is not None], seen)
        opt, _ = _storage_bytes(_tensors(self.optimizer.state_dict()), seen)
        return {"weights_bytes": weights, "grad_bytes": grads, "optimizer_bytes": opt}


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _storage_bytes(tensors: list[Tensor], exclude: set[int]) -> tuple[int, set[int]]:
    """Bytes of the storages of ``tensors`` not in ``exclude``, and ``exclude`` with them added."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    storages = {k: v for k, v in storages.items() if k and k not in exclude}
    return sum(storages.values()), exclude | set(storages)
