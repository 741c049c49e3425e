"""Explicit tensors as guess points: learnable prompt tokens (visual prompt tuning, Jia et al. ECCV 2022).

A raw ``nn.Parameter`` has no batch dimension, so it cannot carry per-example guesses. :class:`PromptTokens` makes
a parameter a *module* whose output is the parameter expanded to the batch, ``[B, num_tokens, dim]``: that output
is a guess point like a Linear's, so every activation-space method (``wt`` built from the modules that consume the
prompts, paper A.6) applies, and the estimate is the local VJP through the expansion, ``Σ_b d_b u_b``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int

__all__ = ["PromptTokens"]


class PromptTokens(nn.Module):
    """Learnable prompt tokens, expanded to the batch.

    Input: ``batch_size`` (int). Output shape: ``[batch_size, num_tokens, dim]`` (a broadcast view of
    :attr:`weight`; gradients reach :attr:`weight` summed over the batch).

    Args:
        num_tokens: number of prompt tokens ``P`` (>= 1).
        dim: token width ``D`` (>= 1).
        init: ``"vpt"``: uniform on ``[-v, v]`` with ``v = sqrt(6 / (3 * patch_area + dim))`` (Xavier uniform as in
            VPT's code, with ``patch_area = patch_size**2``), or ``"zeros"``, or ``"normal"`` (std 0.02).
            (default: ``"vpt"``)
        patch_size: patch side used by the ``"vpt"`` initialization. (default: 16)

    Raises:
        ValueError: non-positive sizes or an unknown ``init``.
    """

    def __init__(self, num_tokens: int, dim: int, *, init: str = "vpt", patch_size: int = 16):
        super().__init__()
        num_tokens, dim = check_int("num_tokens", num_tokens, low=1), check_int("dim", dim, low=1)
        patch_size = check_int("patch_size", patch_size, low=1)
        check_choice("init", init, ("vpt", "zeros", "normal"))
        self.num_tokens, self.dim = num_tokens, dim
        self.weight = nn.Parameter(torch.empty(num_tokens, dim))
        with torch.no_grad():
            if init == "vpt":
                bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
                self.weight.uniform_(-bound, bound)
            elif init == "zeros":
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, 0.02)

    def forward(self, batch_size: int) -> Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, dim={self.dim}"
