"""One-step loss reduction relative to backprop (paper §3 "One step effectiveness", Fig. 1 right).

At checkpoints along a backprop (AdamW) trajectory, each method's estimate on the checkpoint's batch is used for ONE
plain SGD step ``θ ← θ - η ĝ`` from the current weights, for every step size ``η`` of the grid (paper:
``1e-5 ... 1e-1``); the loss reduction on that batch is measured and the weights are restored exactly (copied back,
not subtracted). The best ``η`` per method counts, relative to backprop's best, so backprop is exactly 1. The paper:
the structured methods are "thousands of times more effective than directional descent" in this regime.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..diagnostics import backprop_gradient, gradient_cosine, guessed_gradient
from ._common import (
    RATIO_BASELINE,
    DatasetConfig,
    arg,
    batches,
    cross_entropy,
    derive_seed,
    figure,
    finish,
    guessed_methods,
    is_oracle,
    load,
    make_mlp,
    mean_std,
    method_color,
    method_label,
    oracle_method,
    prepare_out_dir,
    text_table,
)

__all__ = ["OneStepConfig", "loss_reduction", "run_one_step"]


@dataclass
class OneStepConfig(DatasetConfig):
    """Configuration of :func:`run_one_step` (defaults: reduced; paper: ``--width 1024`` on CIFAR-10)."""

    depth: int = arg(6, "linear layers of the MLP (paper: 6)")
    width: int = arg(256, "hidden units per layer (paper: 1024)")
    steps: int = arg(300, "backprop (AdamW) training steps of the trajectory")
    lr: float = arg(1e-3, "AdamW learning rate of the backprop trajectory")
    checkpoints: int = arg(7, "checkpoints evenly spread over the trajectory (first at step 0)")
    step_sizes: tuple[float, ...] = arg((1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "SGD step sizes tried (paper: 1e-5..1e-1)")
    repeats: int = arg(3, "independent guesses per method and checkpoint; reductions averaged per step size")
    methods: tuple[str, ...] = arg(lambda: (oracle_method(), *guessed_methods()),
                                   "methods (every registered one by default; backprop is always included)")
    scale: str = arg("gradient", "step direction: 'gradient' rescales every estimate to the true gradient's norm "
                     "(the grid then means the same step lengths for all methods); 'raw' steps along the estimate as "
                     "the engine writes it", choices=("gradient", "raw"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "steps", "checkpoints", "repeats")
        self.check_positive("lr", kind=float)
        self.check_floats("step_sizes")
        self.check_methods("methods")
        self.check_choice("scale", ("gradient", "raw"))
        if oracle_method() not in self.methods:
            self.methods = (oracle_method(), *self.methods)


def loss_reduction(model: nn.Module, batch: tuple[Tensor, Tensor], direction: dict[str, Tensor],
                   step_sizes: tuple[float, ...]) -> list[float]:
    """Loss reduction ``L(θ) - L(θ - η d)`` on ``batch`` for each ``η`` of ``step_sizes``; ``θ`` restored exactly.

    Args:
        model: the model at ``θ``.
        batch: ``(inputs, targets)``.
        direction: ``{parameter name: d}`` (a gradient or an estimate).
        step_sizes: the ``η`` to try.

    Returns:
        One reduction per step size (positive: the loss went down).
    """
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    out = []
    with torch.no_grad():
        before = float(cross_entropy(model(batch[0]), batch[1]))
        for eta in step_sizes:
            for n, d in direction.items():
                params[n].add_(d, alpha=-eta)
            out.append(before - float(cross_entropy(model(batch[0]), batch[1])))
            for n, p in params.items():
                p.copy_(saved[n])
    return out


def _norm(grads: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _rescaled(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """``estimate`` scaled to the norm of ``reference`` (all parameters as one vector); a zero estimate stays 0."""
    n = _norm(estimate)
    factor = _norm(reference) / n if n > 0 else 0.0
    return {k: v * factor for k, v in estimate.items()}


def run_one_step(config: OneStepConfig, *, out_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``one-step.json`` and ``one-step.png``.

    Returns:
        The record; ``results`` holds ``checkpoints`` (steps), ``reduction`` (``{method: [[mean reduction per step
        size] per checkpoint]}``, loss units), ``best_step_size``, ``relative`` (``{method: [best reduction / backprop's
        best, per checkpoint]}``: backprop is exactly 1), ``relative_mean``/``relative_std`` over checkpoints,
        ``cosine`` (mean cosine of the estimates at the checkpoints) and ``ratio_to_directional``.
    """
    from tqdm.auto import tqdm

    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    model = make_mlp(splits, config.depth, config.width, derive_seed(config.seed, 0))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    data = batches(splits, config.batch_size, derive_seed(config.seed, 1))
    marks = sorted({int(round(i * config.steps / max(1, config.checkpoints - 1)))
                    for i in range(config.checkpoints)} if config.checkpoints > 1 else {0})
    reduction: dict[str, list[list[float]]] = {m: [] for m in config.methods}
    best_eta: dict[str, list[float]] = {m: [] for m in config.methods}
    best: dict[str, list[float]] = {m: [] for m in config.methods}
    cosine: dict[str, list[float]] = {m: [] for m in config.methods}
    model.train()
    bar = tqdm(total=config.steps + 1, desc="one-step", disable=not progress)
    for step in range(config.steps + 1):
        batch = next(data)
        if step in marks:
            reference = backprop_gradient(model, batch, cross_entropy)
            for m in config.methods:
                reps, coss = [], []
                for r in range(1 if is_oracle(m) else config.repeats):
                    est = guessed_gradient(model, m, batch, cross_entropy, seed=derive_seed(config.seed, 2, step, r))
                    coss.append(gradient_cosine(model, est, reference).total)
                    if config.scale == "gradient":
                        est = _rescaled(est, reference)
                    reps.append(loss_reduction(model, batch, est, config.step_sizes))
                mean = np.mean(reps, axis=0)
                i = int(np.nanargmax(mean)) if np.isfinite(mean).any() else 0
                reduction[m].append([float(v) for v in mean])
                best[m].append(float(mean[i]))
                best_eta[m].append(config.step_sizes[i])
                cosine[m].append(float(np.mean(coss)))
        bar.update(1)
        if step == config.steps:
            break
        opt.zero_grad(set_to_none=True)
        cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    bar.close()
    relative = {m: [b / bp if bp > 0 else math.nan for b, bp in zip(best[m], best[oracle_method()], strict=True)]
                for m in config.methods}
    stats = {m: mean_std(v) for m, v in relative.items()}
    base = stats[RATIO_BASELINE][0] if RATIO_BASELINE in stats else math.nan
    results = {
        "checkpoints": marks,
        "step_sizes": list(config.step_sizes),
        "reduction": reduction,
        "best_reduction": best,
        "best_step_size": best_eta,
        "relative": relative,
        "relative_mean": {m: s[0] for m, s in stats.items()},
        "relative_std": {m: s[1] for m, s in stats.items()},
        "ratio_to_directional": {m: s[0] / base if math.isfinite(base) and base != 0 else math.nan
                                 for m, s in stats.items()},
        "cosine": {m: float(np.mean(v)) for m, v in cosine.items()},
    }
    return finish("one-step", "Fig. 1 (right), §3", config, results, started, plot_one_step, out_dir)


def plot_one_step(record: dict[str, Any]) -> Any:
    """Fig. 1 (right): best one-step loss reduction relative to backprop (log-y), and cosine for comparison."""
    res, cfg = record["results"], record["config"]
    fig, axes = figure(2, size=(4.6, 3.4))
    ms = list(res["relative_mean"])
    for ax, key, title in ((axes[0, 0], "relative_mean", "best 1-step loss reduction / backprop's"),
                           (axes[0, 1], "cosine", "mean cosine at the checkpoints")):
        vals = [res[key][m] for m in ms]
        ax.bar(range(len(ms)), [np.nan if v is None or v <= 0 else v for v in vals],
               yerr=[res["relative_std"][m] or 0 for m in ms] if key == "relative_mean" else None,
               color=[method_color(m) for m in ms])
        for i, v in enumerate(vals):
            if v is not None and v > 0:
                ax.text(i, v, f"{v:.2g}", ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(ms)), [method_label(m) for m in ms], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"MLP {cfg['depth']}x{cfg['width']}, {cfg['dataset']}, {len(res['checkpoints'])} checkpoints",
                 fontsize=9)
    return fig


def summarize_one_step(record: dict[str, Any]) -> str:
    """The text table of :func:`run_one_step`'s record: best one-step loss reduction relative to backprop's."""
    res, cfg = record["results"], record["config"]
    rows = [(m, res["relative_mean"][m], res["relative_std"][m], res["cosine"][m], res["ratio_to_directional"][m])
            for m in res["relative_mean"]]
    return text_table(("method", "reduction / backprop", "std", "mean cosine", f"x {RATIO_BASELINE}"), rows,
                      title=f"best one-step loss reduction relative to backprop, MLP {cfg['depth']}x{cfg['width']} on "
                            f"{cfg['dataset']}, {len(res['checkpoints'])} checkpoints")
