"""How many downstream layers? (paper Appendix A.1 "Why more layers are not always better", Fig. 5).

``downstream`` guessing with ``l`` downstream layers (``attach(..., downstream_layers=l)``): the guess is a random
``ε`` at the post-activation ``l`` layers below, pulled back through those layers. More layers confine the guess to
a smaller subspace but add bias (A.1: ``(J J^T - I) g`` grows with ``l``). The paper (6 x 1024 MLP, CIFAR-10): 2-layer
downstream has no advantage over 1-layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import (
    OPTIMIZERS,
    DatasetConfig,
    arg,
    build_optimizer,
    derive_seed,
    figure,
    finish,
    is_oracle,
    load,
    make_mlp,
    mean_std,
    method_color,
    oracle_method,
    prepare_out_dir,
    text_table,
    train,
    windowed_mean,
)

__all__ = ["DownstreamDepthConfig", "run_downstream_depth"]


@dataclass
class DownstreamDepthConfig(DatasetConfig):
    """Configuration of :func:`run_downstream_depth` (defaults: reduced; paper: ``--depth 6 --width 1024`` on
    CIFAR-10)."""

    depth: int = arg(4, "linear layers of the MLP (paper: 6; at 6 our short runs stay near chance)")
    width: int = arg(128, "hidden units per layer (paper: 1024)")
    layers: tuple[int, ...] = arg((1, 2), "downstream_layers values l to compare")
    references: tuple[str, ...] = arg(lambda: (oracle_method(), "wt"),
                                      "other methods trained alongside (empty: none)")
    epochs: int = arg(10, "training epochs")
    optimizer: str = arg("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = arg(1e-3, "learning rate")
    measure_every: int = arg(16, "record accuracies every that many steps; the cosine is averaged over each such "
                             "window")
    cosine_every: int = arg(4, "measure the cosine of the step's estimate every that many steps")
    seeds: int = arg(2, "seeds per run (mean ± std)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "epochs", "measure_every", "cosine_every", "seeds")
        self.check_positive("lr", kind=float)
        self.check_ints("layers")
        self.check_choice("optimizer", OPTIMIZERS)
        if self.references:
            self.check_methods("references")


def run_downstream_depth(config: DownstreamDepthConfig, *, out_dir: str | os.PathLike | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``downstream-depth.json`` and ``downstream-depth.png``.

    Returns:
        The record; ``results["runs"][name]`` (``"downstream l=<l>"`` and the references) holds ``steps``,
        ``train_acc``/``test_acc`` (mean over seeds, in ``[0, 1]``), ``cos_steps``/``cosine`` (cosine of the step's
        estimate with the true gradient, averaged over windows of ``measure_every`` steps and over seeds) and
        ``final`` (mean ± std over seeds of the final train and test accuracy and of the mean cosine).
    """
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    steps = config.epochs * -(-len(splits.train) // config.batch_size)
    variants = [(f"downstream l={n}", "downstream", {"downstream_layers": n}) for n in config.layers]
    variants += [(m, m, {}) for m in config.references]
    runs: dict[str, Any] = {}
    for name, method, kwargs in variants:
        logs = []
        for s in range(config.seeds):
            seed = derive_seed(config.seed, s)
            model = make_mlp(splits, config.depth, config.width, seed)
            opt = build_optimizer(config.optimizer, model.parameters(), lr=config.lr)
            logs.append(train(model, method, splits, opt, steps=steps, batch_size=config.batch_size,
                              seed=derive_seed(seed, 1), eval_every=config.measure_every,
                              cosine_every=0 if is_oracle(method) else config.cosine_every,
                              attach_kwargs=kwargs, progress=progress, desc=name))
        windows = [windowed_mean(lg.cos_steps, lg.cosine, config.measure_every) for lg in logs]
        runs[name] = {
            "steps": logs[0].eval_steps,
            "train_acc": np.mean([lg.train_acc for lg in logs], axis=0).tolist(),
            "test_acc": np.mean([lg.test_acc for lg in logs], axis=0).tolist(),
            "cos_steps": windows[0][0],
            "cosine": np.mean([w[1] for w in windows], axis=0).tolist() if logs[0].cosine else [],
            "final": {
                "train_acc": mean_std([lg.train_acc[-1] for lg in logs]),
                "test_acc": mean_std([lg.test_acc[-1] for lg in logs]),
                "mean_cosine": mean_std([float(np.mean(lg.cosine)) for lg in logs]) if logs[0].cosine else None,
            },
        }
    return finish("downstream-depth", "Fig. 5, A.1", config, {"runs": runs}, started, plot_downstream_depth,
                  out_dir)


def plot_downstream_depth(record: dict[str, Any]) -> Any:
    """Fig. 5: train accuracy (and cosine) along training for each ``l`` and the references."""
    runs = record["results"]["runs"]
    fig, axes = figure(3, size=(4.2, 3.3))
    shades = ["tab:orange", "tab:red", "tab:pink", "tab:olive"]
    for i, (k, r) in enumerate(runs.items()):
        color = shades[i % len(shades)] if k.startswith("downstream l=") else method_color(k)
        axes[0, 0].plot(r["steps"], [100 * v for v in r["train_acc"]], color=color, label=k)
        axes[0, 1].plot(r["steps"], [100 * v for v in r["test_acc"]], color=color, label=k)
        if r["cosine"]:
            axes[0, 2].plot(r["cos_steps"], [v if v and v > 0 else np.nan for v in r["cosine"]], color=color,
                            label=k)
    axes[0, 2].set_yscale("log")
    for ax, ylabel in zip(axes[0], ("train accuracy (%)", "test accuracy (%)", "cosine to the true gradient"),
                          strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"MLP {cfg['depth']}x{cfg['width']}, {cfg['dataset']}", fontsize=9)
    return fig


def summarize_downstream_depth(record: dict[str, Any]) -> str:
    """The text table of :func:`run_downstream_depth`'s record: final accuracies and mean cosine, mean ± std."""
    rows = [(k, r["final"]["train_acc"], r["final"]["test_acc"], r["final"]["mean_cosine"])
            for k, r in record["results"]["runs"].items()]
    return text_table(("run", "train acc", "test acc", "mean cosine"), rows,
                      title=f"downstream depth, mean ± std over {record['config']['seeds']} seeds")
