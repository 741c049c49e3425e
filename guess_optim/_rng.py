"""The global RNG, captured and replayed: a second forward that must draw the dropout masks of the first.

Used by ``store="recompute"`` (the backward replays the forward), the Hugging Face callback's cosine logging (a
micro-batch replayed with backprop) and the MeZO-style peer of the benchmark (two forwards, one mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["capture_rng", "cuda_devices", "replayed_rng"]


def cuda_devices(tensors: Iterable[Any]) -> list[int]:
    """Sorted indices of the CUDA devices that the tensors among ``tensors`` live on."""
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.device.type == "cuda"})


def capture_rng(devices: Iterable[int] = ()) -> dict[str, Any]:
    """The state of the global CPU generator and of the CUDA generators of ``devices``.

    Returns:
        ``{"cpu": ByteTensor, "cuda": {index: ByteTensor}}``, for :func:`replayed_rng`.
    """
    return {"cpu": torch.get_rng_state(), "cuda": {i: torch.cuda.get_rng_state(i) for i in devices}}


@contextlib.contextmanager
def replayed_rng(state: dict[str, Any]) -> Iterator[None]:
    """Run the block with the global RNG set to ``state`` (from :func:`capture_rng`), then put every generator back
    exactly as it was before the block (``torch.random.fork_rng``): the block draws what the captured code drew, and
    the caller's stream is not moved."""
    cuda = state.get("cuda", {})
    with torch.random.fork_rng(devices=list(cuda)):
        torch.set_rng_state(state["cpu"])
        for i, s in cuda.items():
            torch.cuda.set_rng_state(s, i)
        yield
