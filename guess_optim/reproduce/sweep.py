"""Learning rate x optimizer sweep (paper Appendix A.3, Fig. 8).

Every method trains a 3 x 128 MLP with every learning rate of ``{1e-2, 1e-3, 1e-4, 1e-5}`` and every optimizer of
``{AdamW, SGD, StableAdamW}``; per (method, optimizer) the learning rate with the highest final train accuracy is
kept, and its train-accuracy curve plotted. The paper (CIFAR-10, 1000 epochs): backprop converges much faster, and
directional descent and the structured guesses "benefit greatly from Adam".
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from .._checks import check_float
from ._common import (
    OPTIMIZERS,
    DatasetConfig,
    all_methods,
    arg,
    build_optimizer,
    derive_seed,
    figure,
    finish,
    load,
    make_mlp,
    method_color,
    method_label,
    prepare_out_dir,
    text_table,
    train,
)

__all__ = ["PAPER_OPTIMIZERS", "SweepConfig", "run_sweep"]

PAPER_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "stable-adamw")
"""The optimizers of the paper's sweep (App. A.3)."""


@dataclass
class SweepConfig(DatasetConfig):
    """Configuration of :func:`run_sweep` (defaults: reduced; paper: CIFAR-10, 1000 epochs)."""

    depth: int = arg(3, "linear layers of the MLP (paper: 3)")
    width: int = arg(128, "hidden units per layer (paper: 128)")
    methods: tuple[str, ...] = arg(all_methods, "methods (every registered one by default)")
    optimizers: tuple[str, ...] = arg(PAPER_OPTIMIZERS, f"optimizers, from {', '.join(OPTIMIZERS)} (paper: AdamW, SGD, "
                                      "StableAdamW)")
    lrs: tuple[float, ...] = arg((1e-2, 1e-3, 1e-4, 1e-5), "learning rates (paper: 1e-2..1e-5)")
    momentum: float = arg(0.0, "SGD momentum")
    epochs: int = arg(8, "training epochs (paper: 1000)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "epochs")
        self.check_methods("methods")
        self.check_floats("lrs")
        self.check_choices("optimizers", OPTIMIZERS)
        check_float("momentum", self.momentum, low=0.0, high=1.0, high_strict=True)


def run_sweep(config: SweepConfig, *, out_dir: str | os.PathLike | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run the sweep; with ``out_dir``, write ``sweep.json`` and ``sweep.png``.

    Returns:
        The record; ``results["runs"][method][optimizer][lr]`` holds ``epochs`` and ``train_acc`` (full train split
        after each epoch, in ``[0, 1]``); ``results["best"][method][optimizer]`` the best ``lr`` and its final train
        and test accuracy (ties go to the larger learning rate; a diverged run counts as accuracy -inf).
    """
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    per_epoch = -(-len(splits.train) // config.batch_size)
    seed = derive_seed(config.seed, 0)
    runs: dict[str, Any] = {}
    best: dict[str, Any] = {}
    for method in config.methods:
        runs[method], best[method] = {}, {}
        for opt_name in config.optimizers:
            per_lr = {}
            for lr in config.lrs:
                model = make_mlp(splits, config.depth, config.width, seed)
                opt = build_optimizer(opt_name, model.parameters(), lr=lr, momentum=config.momentum)
                log = train(model, method, splits, opt, steps=config.epochs * per_epoch, batch_size=config.batch_size,
                            seed=derive_seed(seed, 1), eval_every=per_epoch, progress=progress,
                            desc=f"{method} {opt_name} lr={lr:g}")
                per_lr[f"{lr:g}"] = {"epochs": [s // per_epoch for s in log.eval_steps], "train_acc": log.train_acc,
                                     "test_acc": log.test_acc, "skipped_steps": log.skipped_steps}
            runs[method][opt_name] = per_lr

            def score(key: str, per_lr: dict = per_lr) -> float:
                acc = per_lr[key]["train_acc"][-1]
                return acc if math.isfinite(acc) else -math.inf

            top = max(per_lr, key=lambda k: (score(k), float(k)))
            best[method][opt_name] = {"lr": float(top), "train_acc": per_lr[top]["train_acc"][-1],
                                      "test_acc": per_lr[top]["test_acc"][-1]}
    return finish("sweep", "A.3, Fig. 8", config, {"runs": runs, "best": best}, started, plot_sweep, out_dir)


def plot_sweep(record: dict[str, Any]) -> Any:
    """Fig. 8: one panel per optimizer; each method's train-accuracy curve at its best learning rate."""
    res = record["results"]
    optimizers = list(next(iter(res["best"].values())))
    fig, axes = figure(len(optimizers), size=(4.2, 3.3))
    for ax, opt_name in zip(axes[0], optimizers, strict=True):
        for method, per_opt in res["best"].items():
            lr = per_opt[opt_name]["lr"]
            r = res["runs"][method][opt_name][f"{lr:g}"]
            ax.plot(r["epochs"], [100 * v for v in r["train_acc"]], marker=".", color=method_color(method),
                    label=f"{method_label(method)} (lr {lr:g})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train accuracy (%)")
        ax.set_title(opt_name, fontsize=9)
        ax.legend(fontsize=6)
    cfg = record["config"]
    fig.suptitle(f"best learning rate per method, MLP {cfg['depth']}x{cfg['width']}, {cfg['dataset']}", fontsize=9)
    return fig


def summarize_sweep(record: dict[str, Any]) -> str:
    """The text table of :func:`run_sweep`'s record: the best learning rate per method and optimizer."""
    rows = [(m, opt, b["lr"], b["train_acc"], b["test_acc"]) for m, per_opt in record["results"]["best"].items()
            for opt, b in per_opt.items()]
    return text_table(("method", "optimizer", "best lr", "train acc", "test acc"), rows,
                      title="best learning rate per method and optimizer (final train accuracy)")
