"""Gradients and activations lie in nearly the same subspace (paper §2.2, Appendix A.2, Fig. 6 right / Fig. 7).

For each layer, the per-example gradient ``g_b = ∂L_b/∂x`` of the loss with respect to that layer's activations
``x`` (the flattened input image, and each hidden post-activation) is projected onto the span of the top-``k``
principal components of the activations of *other* training examples (centered PCA), and onto a random
``k``-dimensional subspace (orthonormalized Gaussian vectors). The cosine between ``g_b`` and its projection,
``|P_k^T g_b| / |g_b|``, is averaged over examples. The paper (MLPs of depth 3, 4, 6 and width 1024 on MNIST, all 20
epochs): fewer than 10 principal components give a cosine as high as 0.5, where a random subspace gives ~0.1. This
is what activation mixing (§2.2) exploits. The images of Fig. 6 (left) are not reproduced.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._common import (
    DatasetConfig,
    arg,
    batches,
    derive_seed,
    figure,
    finish,
    load,
    make_mlp,
    prepare_out_dir,
    text_table,
)

__all__ = ["SubspaceConfig", "projection_cosine", "run_subspace"]


@dataclass
class SubspaceConfig(DatasetConfig):
    """Configuration of :func:`run_subspace` (defaults: reduced; paper: ``--width 1024 --depths 3,4,6``)."""

    depths: tuple[int, ...] = arg((3, 6), "MLP depths (paper: 3, 4, 6)")
    width: int = arg(256, "hidden units per layer (paper: 1024)")
    ks: tuple[int, ...] = arg((1, 2, 5, 10, 20, 50, 100), "subspace dimensions k")
    epochs: tuple[int, ...] = arg((0, 1, 4), "measure after these many backprop epochs (paper: all 20)")
    lr: float = arg(1e-3, "AdamW learning rate of the backprop training")
    pca_examples: int = arg(1000, "training examples whose activations give the principal components")
    grad_examples: int = arg(256, "other training examples whose gradients are projected")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_ints("depths", low=2)
        self.check_ints("ks")
        self.check_ints("epochs", low=0)
        self.check_positive("width", "pca_examples", "grad_examples")
        self.check_positive("lr", kind=float)
        if list(self.epochs) != sorted(set(self.epochs)):
            raise ValueError(f"Invalid epochs: {self.epochs!r}; expected increasing distinct epoch counts")


def projection_cosine(grads: Tensor, basis: Tensor) -> Tensor:
    """Cosine between each gradient and its projection onto the span of an orthonormal ``basis``.

    Args:
        grads: ``[B, d]`` gradients (a zero row gives 0).
        basis: ``[d, k]`` with orthonormal columns.

    Returns:
        ``[B]`` values ``|basis^T g| / |g|`` in ``[0, 1]``.
    """
    norms = torch.linalg.vector_norm(grads, dim=1)
    proj = torch.linalg.vector_norm(grads @ basis, dim=1)
    return torch.where(norms > 0, proj / norms.clamp_min(1e-300), torch.zeros_like(norms))


def _activations_and_grads(model: nn.Module, x: Tensor, y: Tensor | None) -> tuple[list[str], list[Tensor],
                                                                                 list[Tensor] | None]:
    """Names, activations ``[B, d]`` (input and every hidden post-activation) and, with ``y``, per-example gradients
    of the loss with respect to them (the summed loss: examples do not interact, so row ``b`` is ``∂L_b/∂x_b``)."""
    acts: list[Tensor] = []
    names: list[str] = ["input"]
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out))
             for m in model.layers if isinstance(m, (nn.ReLU,))]
    try:
        with torch.enable_grad():
            inp = x.reshape(x.shape[0], -1).detach().requires_grad_(y is not None)
            out = model(inp)
            names += [f"hidden {i + 1}" for i in range(len(acts))]
            tensors = [inp, *acts]
            grads = None
            if y is not None:
                loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
                grads = list(torch.autograd.grad(loss, tensors))
    finally:
        for h in hooks:
            h.remove()
    flat = [t.detach().reshape(t.shape[0], -1).double() for t in tensors]
    return names, flat, None if grads is None else [g.reshape(g.shape[0], -1).double() for g in grads]


def run_subspace(config: SubspaceConfig, *, out_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``subspace.json`` and ``subspace.png``.

    Returns:
        The record; ``results["curves"]["depth <D>"]["epoch <E>"][layer]`` holds ``ks`` and ``pca``/``random``
        (mean cosine per ``k``, in ``[0, 1]``); ``results["at_k"]`` averages them over layers, epochs and depths per
        ``k``.
    """
    from tqdm.auto import tqdm

    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    xs, ys = splits.train.tensors
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(derive_seed(config.seed, 0)))
    pca_idx = order[:config.pca_examples]
    grad_idx = order[config.pca_examples:config.pca_examples + config.grad_examples]
    if len(grad_idx) == 0:
        raise ValueError(f"pca_examples={config.pca_examples} leaves no training example for the gradients")
    curves: dict[str, Any] = {}
    table: dict[int, dict[str, list[float]]] = {}
    steps_per_epoch = -(-len(ys) // config.batch_size)
    bar = tqdm(total=len(config.depths) * len(config.epochs), desc="subspace", disable=not progress)
    for depth in config.depths:
        seed = derive_seed(config.seed, 1, depth)
        model = make_mlp(splits, depth, config.width, seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        data = batches(splits, config.batch_size, derive_seed(seed, 1))
        done = 0
        per_depth: dict[str, Any] = {}
        for epoch in config.epochs:
            for _ in range((epoch - done) * steps_per_epoch):
                xb, yb = next(data)
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            done = epoch
            names, acts, _ = _activations_and_grads(model, xs[pca_idx], None)
            _, _, grads = _activations_and_grads(model, xs[grad_idx], ys[grad_idx])
            per_epoch: dict[str, Any] = {}
            for li, (name, a, g) in enumerate(zip(names, acts, grads, strict=True)):
                d = a.shape[1]
                ks = [k for k in config.ks if k <= min(d, a.shape[0])]
                _, _, vh = torch.linalg.svd(a - a.mean(0, keepdim=True), full_matrices=False)
                gen = torch.Generator().manual_seed(derive_seed(config.seed, 2, depth, epoch, li))
                rand, _ = torch.linalg.qr(torch.randn(d, max(ks), generator=gen, dtype=torch.float64))
                pca = [float(projection_cosine(g, vh[:k].T).mean()) for k in ks]
                rnd = [float(projection_cosine(g, rand[:, :k]).mean()) for k in ks]
                per_epoch[name] = {"ks": ks, "pca": pca, "random": rnd}
                for k, p, r in zip(ks, pca, rnd, strict=True):
                    table.setdefault(k, {"pca": [], "random": []})
                    table[k]["pca"].append(p)
                    table[k]["random"].append(r)
            per_depth[f"epoch {epoch}"] = per_epoch
            bar.update(1)
        curves[f"depth {depth}"] = per_depth
    bar.close()
    at_k = {str(k): {"pca": float(np.mean(v["pca"])), "random": float(np.mean(v["random"]))}
            for k, v in sorted(table.items())}
    return finish("subspace", "Fig. 6 (right) / Fig. 7, §2.2, A.2", config, {"curves": curves, "at_k": at_k},
                  started, plot_subspace, out_dir)


def plot_subspace(record: dict[str, Any]) -> Any:
    """Fig. 6 (right) / 7: cosine of the gradient with its projection vs ``k``; PCA solid, random dashed. One row
    per depth, one column per epoch."""
    curves = record["results"]["curves"]
    ncols = max(len(per) for per in curves.values())
    fig, axes = figure(ncols, len(curves), size=(3.4, 3.0))
    for row, (d, per) in enumerate(curves.items()):
        for col, (e, layers) in enumerate(per.items()):
            ax = axes[row, col]
            for i, (name, c) in enumerate(layers.items()):
                color = f"C{i % 10}"
                ax.plot(c["ks"], c["pca"], color=color, marker=".", label=name)
                ax.plot(c["ks"], c["random"], color=color, ls="--")
            ax.set_xscale("log")
            ax.set_ylim(0, 1)
            ax.set_xlabel("subspace dimension k")
            ax.set_title(f"{d}, {e}", fontsize=9)
        axes[row, 0].set_ylabel("cos(gradient, its projection)")
        axes[row, 0].legend(fontsize=6, title="solid: activation PCA\ndashed: random", title_fontsize=6)
    return fig


def summarize_subspace(record: dict[str, Any]) -> str:
    """The text table of :func:`run_subspace`'s record: per ``k``, the mean cosine of the gradients with their
    projection on the top-``k`` activation principal components and on a random ``k``-dimensional subspace."""
    rows = [(k, v["pca"], v["random"]) for k, v in record["results"]["at_k"].items()]
    return text_table(("k", "PCA subspace", "random subspace"), rows,
                      title="cosine of the gradient with its projection (mean over layers, epochs and depths)")
