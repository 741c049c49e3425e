"""Cosine similarity along backprop (paper §3 "Cosine similarity along backprop", Fig. 1 left).

An MLP is trained with backprop (AdamW); every ``every`` steps, on that step's batch, every method's estimate is
computed with the same per-step guess seed and compared with the true gradient. The paper's claim: on a 6 x 1024 MLP
(CIFAR-10), ``W^T`` and the other structured guesses have "hundreds of times" (Fig. 1: ~100x) the average cosine
similarity of directional descent.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_device
from ..diagnostics import cosine_similarity
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
    load,
    make_mlp,
    mean_std,
    method_color,
    method_label,
    prepare_out_dir,
    text_table,
)

__all__ = ["CosineConfig", "run_cosine"]


@dataclass
class CosineConfig(DatasetConfig):
    """Configuration of :func:`run_cosine` (defaults: the reduced CPU size; paper: ``--width 1024`` on CIFAR-10).

    ``guess-optim cosine`` and ``guess-optim reproduce cosine`` are this experiment, with these defaults.
    """

    depth: int = arg(6, "linear layers of the MLP (paper: 6)")
    width: int = arg(256, "hidden units per layer (paper: 1024)")
    steps: int = arg(300, "backprop (AdamW) training steps")
    lr: float = arg(1e-3, "AdamW learning rate of the backprop trajectory")
    every: int = arg(25, "measure every that many steps (and at step 0)")
    repeats: int = arg(3, "independent guesses per method and measurement, cosines averaged")
    methods: tuple[str, ...] = arg(guessed_methods, "methods to measure (every registered one but backprop by default)")
    device: str = arg("cpu", "torch device of the model and batches, e.g. cuda")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "steps", "every", "repeats")
        self.check_positive("lr", kind=float)
        self.check_methods("methods", guessed_methods())
        check_device("device", self.device)


def run_cosine(config: CosineConfig, *, out_dir: str | os.PathLike | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``cosine.json`` and ``cosine.png``.

    Returns:
        The record of :func:`~guess_optim.reproduce._common.finish`; ``results`` holds ``steps`` (measurement steps),
        ``curves`` (``{method: [mean cosine of the repeats at each step]}``, in ``[-1, 1]``), ``per_layer``
        (``{method: {layer: trajectory mean}}``), ``mean``/``std`` (over the trajectory) and ``ratio_to_directional``.
    """
    from tqdm.auto import tqdm

    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)
    model = make_mlp(splits, config.depth, config.width, derive_seed(config.seed, 0)).to(config.device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    data = batches(splits, config.batch_size, derive_seed(config.seed, 1), device=config.device)
    steps: list[int] = []
    curves: dict[str, list[float]] = {m: [] for m in config.methods}
    layers: dict[str, dict[str, list[float]]] = {m: {} for m in config.methods}
    model.train()
    for step in tqdm(range(config.steps + 1), desc="cosine", disable=not progress):
        batch = next(data)
        if step % config.every == 0 or step == config.steps:
            steps.append(step)
            for m in config.methods:
                reports = [cosine_similarity(model, m, batch, cross_entropy,
                                             seed=derive_seed(config.seed, 2, step, r))
                           for r in range(config.repeats)]
                curves[m].append(float(np.mean([r.total for r in reports])))
                for name in reports[0].per_layer:
                    layers[m].setdefault(name, []).append(float(np.mean([r.per_layer[name] for r in reports])))
        if step == config.steps:
            break
        opt.zero_grad(set_to_none=True)
        cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    stats = {m: mean_std(c) for m, c in curves.items()}
    base = stats[RATIO_BASELINE][0] if RATIO_BASELINE in stats else math.nan
    results = {
        "steps": steps,
        "curves": curves,
        "per_layer": {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in layers.items()},
        "mean": {m: s[0] for m, s in stats.items()},
        "std": {m: s[1] for m, s in stats.items()},
        "ratio_to_directional": {m: s[0] / base if math.isfinite(base) and base != 0 else math.nan
                                 for m, s in stats.items()},
    }
    return finish("cosine", "Fig. 1 (left), §3", config, results, started, plot_cosine, out_dir)


def plot_cosine(record: dict[str, Any]) -> Any:
    """Fig. 1 (left): cosine to the true gradient along the backprop trajectory, log-y, one curve per method."""
    res, cfg = record["results"], record["config"]
    fig, axes = figure(2, size=(4.6, 3.4))
    ax = axes[0, 0]
    for m, curve in res["curves"].items():
        y = np.asarray([np.nan if v is None or v <= 0 else v for v in curve], dtype=float)
        ax.plot(res["steps"], y, marker=".", label=method_label(m), color=method_color(m))
    ax.set_yscale("log")
    ax.set_xlabel("backprop training step")
    ax.set_ylabel("cosine similarity to the true gradient")
    ax.set_title(f"MLP {cfg['depth']}x{cfg['width']}, {cfg['dataset']}")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ms = list(res["mean"])
    ax.bar(range(len(ms)), [res["mean"][m] or np.nan for m in ms], yerr=[res["std"][m] or 0 for m in ms],
           color=[method_color(m) for m in ms])
    for i, m in enumerate(ms):
        r = res["ratio_to_directional"][m]
        if r is not None:
            ax.text(i, res["mean"][m] or 0, f"{r:.0f}x", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ms)), [method_label(m) for m in ms], rotation=35, ha="right", fontsize=7)
    ax.set_title("trajectory mean (label: ratio to directional)")
    return fig


def summarize_cosine(record: dict[str, Any]) -> str:
    """The text table of :func:`run_cosine`'s record: mean cosine per method and its ratio to directional's."""
    res, cfg = record["results"], record["config"]
    rows = [(m, res["mean"][m], res["std"][m], res["ratio_to_directional"][m]) for m in res["mean"]]
    return text_table(("method", "mean cosine", "std", f"x {RATIO_BASELINE}"), rows,
                      title=f"cosine similarity to backprop, MLP {cfg['depth']}x{cfg['width']} on {cfg['dataset']}, "
                            f"{len(res['steps'])} measurements over {cfg['steps']} backprop steps")
