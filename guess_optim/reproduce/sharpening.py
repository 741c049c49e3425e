"""Self-sharpening (paper §3 "Self-sharpening effect", Fig. 4, Appendix A.4).

``W^T`` guesses built from ``U diag(S^p) V^T`` of the next layer's weight (``attach(..., wt_power=p)``): a larger
``p`` lets a few singular directions dominate the guess. Along training we record the cosine of the step's estimate
with the true gradient and the effective rank (Roy & Vetterli 2007) of the weight matrices. The paper (6 x 128 MLP,
CIFAR-10, batch 128, lr 1e-4, no weight decay, 50,000 iterations): higher powers make the weights lower-rank and the
cosine rise over training. We also run the ``self-sharpening`` method (1-layer downstream with uniform guesses and the
exact head gradient) with ``U[0, 1)`` against ``U(-1, 1)`` guesses: the paper's "random uniform guessing" (A.4) is
ambiguous, and the non-zero mean of ``torch.rand`` may itself be what sharpens.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from .._checks import check_float
from ..estimators import get_estimator
from ._common import (
    OPTIMIZERS,
    DatasetConfig,
    arg,
    build_optimizer,
    derive_seed,
    effective_rank,
    figure,
    finish,
    load,
    make_mlp,
    mean_std,
    prepare_out_dir,
    text_table,
    train,
    windowed_mean,
)

__all__ = ["SelfSharpeningConfig", "run_self_sharpening"]

SELF_SHARPENING = "self-sharpening"
"""The method this experiment is about (paper §3, A.4), run with each of ``distributions``."""


@dataclass
class SelfSharpeningConfig(DatasetConfig):
    """Configuration of :func:`run_self_sharpening` (defaults: reduced; paper size by flags, see RESULTS.md)."""

    depth: int = arg(6, "linear layers of the MLP (paper: 6)")
    width: int = arg(128, "hidden units per layer (paper: 128)")
    powers: tuple[float, ...] = arg((0.1, 0.5, 1.0, 2.0, 4.0), "powers p of the singular values (paper: 0.1..4)")
    distributions: tuple[str, ...] = arg(("uniform", "symmetric-uniform"),
                                         "guess laws of the self-sharpening method runs (empty: none)")
    steps: int = arg(600, "training steps (paper: 50,000)")
    optimizer: str = arg("stable-adamw", "optimizer (paper A.4: StableAdamW for self-sharpening)", choices=OPTIMIZERS)
    lr: float = arg(1e-3, "learning rate (paper: 1e-4 over 50,000 steps)")
    weight_decay: float = arg(0.0, "weight decay (paper: 0)")
    measure_every: int = arg(25, "record effective rank and accuracy every that many steps; the cosine is "
                             "averaged over each such window")
    cosine_every: int = arg(5, "measure the cosine of the step's estimate every that many steps")
    seeds: int = arg(1, "seeds per run (paper: 64 replicates)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "steps", "measure_every", "cosine_every", "seeds")
        self.check_positive("lr", kind=float)
        self.check_floats("powers")
        self.check_choice("optimizer", OPTIMIZERS)
        if not isinstance(self.distributions, tuple):
            raise ValueError(f"Invalid distributions: {self.distributions!r}; expected a list of guess laws")
        for law in self.distributions:  # the method validates its own option
            try:
                get_estimator(SELF_SHARPENING)(distribution=law)
            except ValueError as err:
                raise ValueError(f"Invalid distributions: {law!r} ({err})") from None
        check_float("weight_decay", self.weight_decay, low=0.0)


def _ranks(model: nn.Module) -> list[float]:
    return [effective_rank(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]


def run_self_sharpening(config: SelfSharpeningConfig, *, out_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``self-sharpening.json`` and ``self-sharpening.png``.

    Returns:
        The record; ``results["runs"][name]`` (names ``"wt p=<p>"`` and ``"self-sharpening <law>"``) holds ``steps``,
        ``cos_steps``/``cosine`` (the cosine of the step's estimate with the true gradient, averaged over each window
        of ``measure_every`` steps and over seeds, in ``[-1, 1]``), ``effective_rank`` (mean over the Linear weights
        and seeds, each in ``[1, min(shape)]``), ``layer_ranks`` (per Linear at the end, seed 0),
        ``train_acc``/``test_acc`` (in ``[0, 1]``) and the final ``summary`` values.
    """
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    variants = [(f"wt p={p:g}", "wt", {"wt_power": float(p)}) for p in config.powers]
    variants += [(f"{SELF_SHARPENING} {d}", SELF_SHARPENING, {"distribution": d}) for d in config.distributions]
    runs: dict[str, Any] = {}
    for name, method, kwargs in variants:
        per_seed = []
        for s in range(config.seeds):
            seed = derive_seed(config.seed, s)
            model = make_mlp(splits, config.depth, config.width, seed)
            opt = build_optimizer(config.optimizer, model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            ranks: list[list[float]] = []
            log = train(model, method, splits, opt, steps=config.steps, batch_size=config.batch_size,
                        seed=derive_seed(seed, 1), eval_every=config.measure_every,
                        cosine_every=config.cosine_every, attach_kwargs=kwargs,
                        on_measure=lambda step, m, ranks=ranks: ranks.append(_ranks(m)), progress=progress, desc=name)
            per_seed.append((log, ranks))
        logs = [lg for lg, _ in per_seed]
        erank = [[float(np.mean(r)) for r in ranks] for _, ranks in per_seed]
        windows = [windowed_mean(lg.cos_steps, lg.cosine, config.measure_every) for lg in logs]
        run = {
            "steps": logs[0].eval_steps,
            "cos_steps": windows[0][0],
            "cosine": np.mean([w[1] for w in windows], axis=0).tolist(),
            "cosine_std": np.std([w[1] for w in windows], axis=0).tolist(),
            "effective_rank": np.mean(erank, axis=0).tolist(),
            "layer_ranks": per_seed[0][1][-1],
            "layer_shapes": [list(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)],
            "train_acc": np.mean([lg.train_acc for lg in logs], axis=0).tolist(),
            "test_acc": np.mean([lg.test_acc for lg in logs], axis=0).tolist(),
            "skipped_steps": sum(lg.skipped_steps for lg in logs),
        }
        tail = max(1, len(run["cosine"]) // 5)  # the last fifth of the cosine measurements
        run["summary"] = {
            "cosine_first": run["cosine"][0], "cosine_last_fifth": float(np.mean(run["cosine"][-tail:])),
            "effective_rank_first": run["effective_rank"][0], "effective_rank_last": run["effective_rank"][-1],
            "train_acc": mean_std([lg.train_acc[-1] for lg in logs]),
            "test_acc": mean_std([lg.test_acc[-1] for lg in logs]),
        }
        runs[name] = run
    return finish("self-sharpening", "Fig. 4, §3 'Self-sharpening effect', A.4", config, {"runs": runs}, started,
                  plot_self_sharpening, out_dir)


def plot_self_sharpening(record: dict[str, Any]) -> Any:
    """Fig. 4: cosine, effective rank and train accuracy along training, one curve per power / law."""
    runs = record["results"]["runs"]
    fig, axes = figure(3, size=(4.3, 3.3))
    powers = [k for k in runs if k.startswith("wt")]
    try:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
    except ImportError:  # pragma: no cover - matplotlib is there if figure() worked
        cmap = None
    for k, r in runs.items():
        if k in powers:
            color = cmap(powers.index(k) / max(1, len(powers) - 1)) if cmap else None
            style = "-"
        else:
            color, style = ("tab:red" if "symmetric" in k else "tab:orange"), "--"
        axes[0, 0].plot(r["cos_steps"], r["cosine"], ls=style, color=color, label=k)
        axes[0, 1].plot(r["steps"], r["effective_rank"], ls=style, color=color, label=k)
        axes[0, 2].plot(r["steps"], [100 * v for v in r["train_acc"]], ls=style, color=color, label=k)
    for ax, ylabel in zip(axes[0], ("cosine similarity", "effective rank (mean over layers)", "train accuracy (%)"),
                          strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"MLP {cfg['depth']}x{cfg['width']}, {cfg['dataset']}, {cfg['optimizer']} lr {cfg['lr']:g}",
                 fontsize=9)
    return fig


def summarize_self_sharpening(record: dict[str, Any]) -> str:
    """The text table of :func:`run_self_sharpening`'s record: cosine and effective rank at the start and the end."""
    summaries = {k: r["summary"] for k, r in record["results"]["runs"].items()}
    rows = [(k, s["cosine_first"], s["cosine_last_fifth"], s["effective_rank_first"], s["effective_rank_last"],
             s["train_acc"], s["test_acc"]) for k, s in summaries.items()]
    return text_table(("run", "cosine first", "cosine last 1/5", "eff. rank first", "eff. rank last", "train acc",
                       "test acc"), rows, title="self-sharpening: cosine to backprop and effective rank of the weights")
