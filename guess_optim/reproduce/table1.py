"""Train and test accuracy of every method against backprop (paper Table 1 / Fig. 2, §3 "Training MLPs").

For each dataset, MLP configuration ``(depth, width)``, method and seed, an MLP is trained from scratch with the
method's estimates, and the final accuracy on the whole train and test splits is reported as mean ± sample std over
seeds. The paper: MNIST / SVHN / CIFAR-10 / CIFAR-100 at (3,128), (6,128), (3,1024), (6,1024); the structured
methods beat directional descent, backprop stays far ahead, and the gap grows with the dataset's difficulty.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_float, check_int
from ..data import DATASETS
from ._common import (
    OPTIMIZERS,
    BaseConfig,
    all_methods,
    arg,
    build_optimizer,
    derive_seed,
    figure,
    finish,
    load,
    make_mlp,
    mean_std,
    method_color,
    method_label,
    prepare_out_dir,
    text_table,
    train,
)

__all__ = ["Table1Config", "run_table1"]


@dataclass
class Table1Config(BaseConfig):
    """Configuration of :func:`run_table1` (defaults: reduced; the paper's grid by flags, see RESULTS.md)."""

    datasets: tuple[str, ...] = arg(("mnist-5k",), "datasets (paper: mnist,svhn,cifar10,cifar100 via --data-dir)")
    configs: tuple[tuple[int, int], ...] = arg(((3, 128), (6, 128)),
                                               "MLP depth x width (paper: 3x128,6x128,3x1024,6x1024)")
    methods: tuple[str, ...] = arg(all_methods, "methods (every registered one by default)")
    seeds: int = arg(2, "seeds per cell (mean ± std over them)")
    epochs: int = arg(15, "training epochs")
    optimizer: str = arg("adamw", "optimizer of every method but self-sharpening", choices=OPTIMIZERS)
    lr: float = arg(1e-3, "learning rate")
    weight_decay: float = arg(0.0, "weight decay")
    self_sharpening_optimizer: str = arg("stable-adamw", "optimizer of self-sharpening (paper A.4: StableAdamW)",
                                         choices=OPTIMIZERS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("seeds", "epochs")
        self.check_positive("lr", kind=float)
        self.check_methods("methods")
        self.check_choice("optimizer", OPTIMIZERS)
        self.check_choice("self_sharpening_optimizer", OPTIMIZERS)
        self.check_choices("datasets", DATASETS)
        if not (isinstance(self.configs, tuple) and self.configs
                and all(isinstance(c, tuple) and len(c) == 2 for c in self.configs)):
            raise ValueError(f"Invalid configs: {self.configs!r}; expected depth x width pairs such as 3x128,6x128")
        for depth, width in self.configs:
            check_int("configs (depth)", depth, low=1)
            check_int("configs (width)", width, low=1)
        check_float("weight_decay", self.weight_decay, low=0.0)


def run_table1(config: Table1Config, *, out_dir: str | os.PathLike | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``table1.json`` and ``table1.png``.

    Returns:
        The record; ``results[dataset]["DxW"][method]`` holds ``train``/``test`` (final accuracies per seed, in
        ``[0, 1]``), ``train_mean``/``train_std``/``test_mean``/``test_std`` and ``params`` (parameter count).
    """
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for dataset in config.datasets:
        splits = load(config, dataset)
        steps = config.epochs * -(-len(splits.train) // config.batch_size)
        per_cfg: dict[str, Any] = {}
        for depth, width in config.configs:
            cell: dict[str, Any] = {}
            for method in config.methods:
                train_accs, test_accs = [], []
                params = 0
                for s in range(config.seeds):
                    seed = derive_seed(config.seed, s)
                    model = make_mlp(splits, depth, width, seed)
                    params = sum(p.numel() for p in model.parameters())
                    opt_name = config.self_sharpening_optimizer if method == "self-sharpening" else config.optimizer
                    opt = build_optimizer(opt_name, model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
                    log = train(model, method, splits, opt, steps=steps, batch_size=config.batch_size,
                                seed=derive_seed(seed, 1), progress=progress,
                                desc=f"{dataset} {depth}x{width} {method} s{s}")
                    train_accs.append(log.train_acc[-1])
                    test_accs.append(log.test_acc[-1])
                tr, te = mean_std(train_accs), mean_std(test_accs)
                cell[method] = {"train": train_accs, "test": test_accs, "train_mean": tr[0], "train_std": tr[1],
                                "test_mean": te[0], "test_std": te[1], "params": params}
            per_cfg[f"{depth}x{width}"] = cell
        results[dataset] = per_cfg
    return finish("table1", "Table 1 / Fig. 2, §3", config, results, started, plot_table1, out_dir)


def plot_table1(record: dict[str, Any]) -> Any:
    """Fig. 2: accuracy per (depth, width) sorted by parameter count; one column per dataset, rows train and test."""
    res = record["results"]
    fig, axes = figure(len(res), 2, size=(4.4, 3.2))
    for j, (dataset, per_cfg) in enumerate(res.items()):
        cfgs = sorted(per_cfg, key=lambda c: next(iter(per_cfg[c].values()))["params"])
        methods = list(per_cfg[cfgs[0]])
        for i, split in enumerate(("train", "test")):
            ax = axes[i, j]
            for m in methods:
                y = [per_cfg[c][m][f"{split}_mean"] for c in cfgs]
                e = [per_cfg[c][m][f"{split}_std"] for c in cfgs]
                ax.errorbar(range(len(cfgs)), [np.nan if v is None else 100 * v for v in y],
                            yerr=[0 if v is None else 100 * v for v in e], marker="o", capsize=3,
                            label=method_label(m), color=method_color(m))
            ax.set_xticks(range(len(cfgs)), [f"({c.replace('x', ', ')})" for c in cfgs])
            ax.set_xlabel("(depth, width), by parameter count")
            ax.set_ylabel(f"{split} accuracy (%)")
            ax.set_title(f"{dataset}: {split}")
    axes[0, 0].legend(fontsize=7)
    return fig


def summarize_table1(record: dict[str, Any]) -> str:
    """The text table of :func:`run_table1`'s record: final accuracies, mean ± std over seeds."""
    rows = [(dataset, cfg, m, (v["train_mean"], v["train_std"]), (v["test_mean"], v["test_std"]))
            for dataset, per_cfg in record["results"].items() for cfg, cell in per_cfg.items()
            for m, v in cell.items()]
    return text_table(("dataset", "MLP", "method", "train acc", "test acc"), rows,
                      title=f"final accuracy, mean ± std over {record['config']['seeds']} seeds")
