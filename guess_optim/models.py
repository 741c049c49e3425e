"""Models of the paper's experiments: the MLP of §3 / Appendix A.4 and a small ConvNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_choice, check_int

__all__ = ["ACTIVATIONS", "MLP", "ConvNet", "MODELS", "build_model"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
MODELS: tuple[str, ...] = ("mlp", "convnet")


class MLP(nn.Module):
    """Multi-layer perceptron of Singhal et al., "How to Guess a Gradient" (arXiv 2312.04709).

    As in §3 and Appendix A.4: ``depth`` linear layers of ``width`` units with ReLU between them.
    ``layers`` is ``Flatten, Linear(in_features, width), act, Linear(width, width), act, ...,
    Linear(width, num_classes)``: ``depth - 2`` hidden ``width x width`` layers, an activation between
    consecutive linears and none after the last; ``depth == 1`` is a single
    ``Linear(in_features, num_classes)``. Parameters use PyTorch's default initialization.

    Args:
        in_features: Number of input features after flattening (e.g. 784 for ``[1, 28, 28]``).
        num_classes: Number of outputs (logits).
        depth: Number of linear layers, >= 1 (default: 3).
        width: Units of every hidden layer, >= 1 (default: 128).
        activation: One of ``ACTIVATIONS``: relu, leaky_relu, gelu, tanh, silu (default: "relu").

    Raises:
        ValueError: An argument is out of range or ``activation`` is unknown.

    Shape:
        Input ``[B, *]`` with ``prod(*) == in_features``; output ``[B, num_classes]``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int = 3,
        width: int = 128,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        in_features = check_int("in_features", in_features, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        depth, width = check_int("depth", depth, low=1), check_int("width", width, low=1)
        check_choice("activation", activation, ACTIVATIONS)
        self.in_features, self.num_classes = in_features, num_classes
        self.depth, self.width, self.activation = depth, width, activation
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        modules: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            if i > 0:
                modules.append(ACTIVATIONS[activation]())
            modules.append(nn.Linear(sizes[i], sizes[i + 1]))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten ``x`` (``[B, ...]``) and return the logits ``[B, num_classes]``."""
        return self.layers(x)


class ConvNet(nn.Module):
    """Small ConvNet for ``[B, C, H, W]`` images.

    ``Conv2d(C, 16, 3, padding=1), ReLU, MaxPool2d(2), Conv2d(16, 32, 3, padding=1), ReLU,
    AdaptiveAvgPool2d(4), Flatten, Linear(32 * 16, num_classes)``; any ``H, W >= 2`` works.

    Args:
        in_channels: Number of input channels ``C``.
        num_classes: Number of outputs (logits).

    Raises:
        ValueError: An argument is < 1.

    Shape:
        Input ``[B, C, H, W]``; output ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.layers(x)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: object) -> nn.Module:
    """Build a model by name for inputs of shape ``input_shape``: ``(C, H, W)`` images or ``(C, L)`` sequences.

    Args:
        name: One of ``MODELS``: "mlp" (``in_features`` = the product of ``input_shape``, any shape) or "convnet"
            (``in_channels = C``; images ``(C, H, W)`` only).
        input_shape: Shape of one input, without the batch dimension.
        num_classes: Number of outputs.
        **kwargs: Passed on to the model (e.g. ``depth``, ``width``, ``activation`` for "mlp").

    Returns:
        The model, freshly initialized (PyTorch defaults; seed the global RNG beforehand to fix it).

    Raises:
        ValueError: Unknown ``name``, or ``input_shape`` not ``(C, H, W)`` for "convnet".
    """
    shape = tuple(int(s) for s in input_shape)
    if name == "mlp":
        in_features = 1
        for s in shape:
            in_features *= s
        return MLP(in_features, num_classes, **kwargs)
    if name == "convnet":
        if len(shape) != 3:
            kind = "a 1-D dataset such as mnist1d, " if len(shape) == 2 else ""
            raise ValueError(f"model 'convnet' is a 2-D ConvNet for images (C, H, W), but input_shape is {shape} "
                             f"({kind}not an image); use model 'mlp' (--model mlp) instead")
        return ConvNet(shape[0], num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
