"""Bias of the structured guesses (paper §3 "Bias", Fig. 3, Appendix A.1 and A.4).

Three panels:

* **left**: the cosine similarity of the average of ``N`` guesses (``N = 1 ... 1024``) with the true gradient, on one
  small batch of a briefly trained MLP. Unbiased methods (directional, activation perturbation) keep improving with
  ``N``; biased ones (mixing, ``W^T``, downstream) saturate (A.1: ``E[ĝ] = Cov(y) ∇L ≠ ∇L``).
* **middle**: the *matched-cosine oracle* (A.4, "artificially modifying directional descent's cosine similarity"):
  a guess with exactly the cosine that ``W^T`` achieves but no bias, built from the backprop gradient by
  :func:`matched_cosine_guess`, trained against ``W^T`` itself (AdamW). Paper: a cosine of ~0.02 suffices for high
  accuracy without the bias.
* **right**: the same oracle, without and with ``W^T``'s bias, trained with SGD with and without momentum. Paper: with
  momentum the bias slows training a lot; without momentum the difference is negligible.
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

from .._checks import check_choice, check_float
from ..diagnostics import backprop_gradient, gradient_cosine, guessed_gradient
from ..engine import attach, handle_of
from ._common import (
    DatasetConfig,
    arg,
    batches,
    build_optimizer,
    cross_entropy,
    derive_seed,
    figure,
    finish,
    fmt,
    guessed_methods,
    load,
    make_mlp,
    mean_std,
    method_color,
    method_label,
    oracle_method,
    prepare_out_dir,
    text_table,
    train,
)

__all__ = ["BiasConfig", "matched_cosine_guess", "run_bias"]


def matched_cosine_guess(
    grad: dict[str, Tensor],
    cos_theta: float,
    generator: torch.Generator,
    bias_from: dict[str, Tensor] | None = None,
    *,
    scale: str = "projection",
) -> dict[str, Tensor]:
    """A guess with a prescribed cosine to the true gradient: ``ĝ_θ ∝ cos θ ĝ_∥ + sin θ ĝ_⊥`` (paper A.4).

    All parameters are treated as one vector ``g`` (the concatenation of ``grad``'s tensors, in float64).
    ``ĝ_∥ = g / |g|``; ``ĝ_⊥`` is a unit vector orthogonal to ``g``:

    * ``bias_from=None`` (**without bias**): the normalized component orthogonal to ``g`` of an isotropic
      ``N(0, I)`` draw from ``generator`` — a uniformly random direction of the orthogonal complement, so with
      ``scale="projection"`` the guess is an *unbiased* estimator (``E[ĝ_θ] = g``) whose cosine is exactly
      ``cos θ``.
    * ``bias_from=estimate`` (**with bias**): the normalized component orthogonal to ``g`` of another method's
      estimate (the reproduction uses ``W^T``'s estimate on the same weights and batch): the guess keeps that
      method's systematic off-gradient direction but has the prescribed cosine. If that component is zero, a random
      orthogonal direction is used instead.

    Scale: ``"projection"`` (default) makes ``|ĝ_θ| = |g| / cos θ``, so the component along ``g`` is exactly ``g``
    (the expected scale of an unbiased forward-gradient estimator); ``"norm"`` makes ``|ĝ_θ| = |g|``. The paper does
    not state its choice; it matters for SGD only (Adam-type optimizers are nearly invariant to it).

    Args:
        grad: the true gradient, ``{parameter name: tensor}`` of any shapes.
        cos_theta: the cosine ``cos θ`` to produce, in ``(0, 1]``.
        generator: the source of the random orthogonal direction (on ``grad``'s device).
        bias_from: optional ``{parameter name: tensor}`` supplying ``ĝ_⊥`` (missing names count as zeros).
        scale: ``"projection"`` or ``"norm"``.

    Returns:
        ``{parameter name: tensor}`` with ``grad``'s names, shapes and dtypes. A zero gradient gives zeros.

    Raises:
        ValueError: ``cos_theta`` outside ``(0, 1]`` or an unknown ``scale``.
    """
    check_float("cos_theta", cos_theta, low=0.0, strict=True, high=1.0)
    check_choice("scale", scale, ("projection", "norm"))
    names = list(grad)
    g = torch.cat([grad[n].detach().double().flatten() for n in names])
    norm = torch.linalg.vector_norm(g)
    if norm == 0:
        return {n: torch.zeros_like(grad[n]) for n in names}
    par = g / norm

    def orthogonal(r: Tensor) -> Tensor:
        r = r - (r @ par) * par
        r = r - (r @ par) * par  # a second pass removes what rounding left along g
        return r

    perp = None
    if bias_from is not None:
        r = torch.cat([(bias_from[n] if bias_from.get(n) is not None else torch.zeros_like(grad[n]))
                       .detach().double().flatten() for n in names])
        perp = orthogonal(r)
        if torch.linalg.vector_norm(perp) <= 1e-12 * torch.linalg.vector_norm(r).clamp_min(1e-300):
            perp = None
    if perp is None:
        perp = orthogonal(torch.randn(g.shape, generator=generator, dtype=torch.float64, device=g.device))
    perp = perp / torch.linalg.vector_norm(perp)
    sin_theta = math.sqrt(max(0.0, 1.0 - cos_theta * cos_theta))
    length = norm / cos_theta if scale == "projection" else norm
    flat = length * (cos_theta * par + sin_theta * perp)
    out, i = {}, 0
    for n in names:
        k = grad[n].numel()
        out[n] = flat[i:i + k].reshape(grad[n].shape).to(grad[n].dtype)
        i += k
    return out


@dataclass
class BiasConfig(DatasetConfig):
    """Configuration of :func:`run_bias` (defaults: reduced; the paper uses an MLP on CIFAR-10)."""

    depth: int = arg(3, "linear layers of the MLP")
    width: int = arg(128, "hidden units per layer")
    methods: tuple[str, ...] = arg(guessed_methods, "methods of the left panel (every registered one but backprop by "
                                   "default)")
    biased: str = arg("wt", "the biased method the oracle is matched to: its mean cosine, and its bias for "
                      "'oracle+bias' (paper: W^T)")
    warmup_steps: int = arg(100, "backprop (AdamW, lr 1e-3) steps before the left panel's measurement")
    examples: int = arg(8, "examples in the left panel's batch (paper: a single example)")
    max_guesses: int = arg(1024, "largest N of the left panel (N = 1, 2, 4, ..., max)")
    chunk: int = arg(128, "guesses per forward (num_guesses); larger N averages ceil(N / chunk) such steps")
    repeats: int = arg(3, "independent repetitions of each N (mean ± std)")
    steps: int = arg(500, "training steps of the middle and right panels")
    lr: float = arg(1e-3, "AdamW learning rate (middle panel)")
    sgd_lr: float = arg(1e-3, "SGD learning rate (right panel)")
    momentum: float = arg(0.9, "SGD momentum of the right panel's 'with momentum' runs")
    cos_theta: float | None = arg(None, "the oracle's cosine; None = the biased method's mean measured cosine in "
                                  "its own run")
    scale: str = arg("projection", "oracle scale: projection (|g|/cos θ) or norm (|g|)",
                     choices=("projection", "norm"))
    eval_every: int = arg(25, "record train accuracy every that many steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("depth", "width", "examples", "max_guesses", "chunk", "repeats", "steps", "eval_every")
        self.check_nonneg("warmup_steps")
        self.check_positive("lr", "sgd_lr", kind=float)
        self.check_methods("methods", guessed_methods())
        check_choice("biased", self.biased, guessed_methods())
        self.check_choice("scale", ("projection", "norm"))
        check_float("momentum", self.momentum, low=0.0, high=1.0, high_strict=True)
        if self.cos_theta is not None:
            check_float("cos_theta", self.cos_theta, low=0.0, strict=True, high=1.0)


def _averaged_estimate(model: nn.Module, method: str, batch: tuple[Tensor, Tensor], n: int, chunk: int,
                       seed: int) -> dict[str, Tensor]:
    """The average of ``n`` independent guesses (``attach(num_guesses=...)`` over chunks of at most ``chunk``)."""
    total: dict[str, Tensor] = {}
    done, j = 0, 0
    while done < n:
        k = min(chunk, n - done)
        estimate = guessed_gradient(model, method, batch, cross_entropy, seed=derive_seed(seed, j), num_guesses=k)
        for name, g in estimate.items():
            total[name] = total[name] + k * g.double() if name in total else k * g.double()
        done, j = done + k, j + 1
    return {name: t / n for name, t in total.items()}


def _oracle(cos_theta: float, seed: int, biased: bool, scale: str):
    """An estimator writing :func:`matched_cosine_guess` into ``p.grad``; with ``biased``, the caller has attached
    the biased method (``W^T``) to the model, whose estimate on the same weights and batch supplies ``ĝ_⊥``."""
    gen = torch.Generator().manual_seed(seed)

    def step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        bias = guessed_gradient(model, handle_of(model), batch, cross_entropy) if biased else None
        with torch.no_grad():
            loss = cross_entropy(model(batch[0]), batch[1])
        g = backprop_gradient(model, batch, cross_entropy)
        guess = matched_cosine_guess(g, cos_theta, gen, bias, scale=scale)
        for n, p in model.named_parameters():
            p.grad = guess[n]
        return loss.detach()

    return step


def run_bias(config: BiasConfig, *, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the three panels; with ``out_dir``, write ``bias.json`` and ``bias.png``.

    Returns:
        The record; ``results["averaging"]`` holds ``guesses`` (the ``N``), ``mean``/``std`` (``{method: [cosine per
        N]}``); ``results["cos_theta"]`` the oracle's cosine (and ``wt_cosine`` the biased run's measured ones);
        ``results["adamw"]`` and ``results["sgd"]`` the runs (``{name: {"steps", "train_acc", "test_acc"}}``,
        accuracies in ``[0, 1]``), and ``results["oracle_cosine_check"]`` the oracle's measured cosines.
    """
    from tqdm.auto import tqdm

    prepare_out_dir(out_dir)
    started = time.perf_counter()
    splits = load(config)

    # ---- left: cosine of the average of N guesses ---------------------------------------------------------
    model = make_mlp(splits, config.depth, config.width, derive_seed(config.seed, 0))
    if config.warmup_steps:
        train(model, oracle_method(), splits, torch.optim.AdamW(model.parameters(), lr=1e-3), steps=config.warmup_steps,
              batch_size=config.batch_size, seed=derive_seed(config.seed, 1), progress=progress, desc="bias warmup")
    batch = next(batches(splits, config.examples, derive_seed(config.seed, 2)))
    reference = backprop_gradient(model, batch, cross_entropy)
    grid = [2 ** i for i in range(int(math.log2(config.max_guesses)) + 1)]
    if grid[-1] != config.max_guesses:
        grid.append(config.max_guesses)
    avg_mean, avg_std = {}, {}
    bar = tqdm(total=len(config.methods) * len(grid) * config.repeats, desc="bias: averaging", disable=not progress)
    for mi, m in enumerate(config.methods):
        cols = []
        for n in grid:
            vals = []
            for r in range(config.repeats):
                est = _averaged_estimate(model, m, batch, n, config.chunk, derive_seed(config.seed, 3, mi, n, r))
                vals.append(gradient_cosine(model, est, reference).total)
                bar.update(1)
            cols.append(mean_std(vals))
        avg_mean[m], avg_std[m] = [c[0] for c in cols], [c[1] for c in cols]
    bar.close()

    # ---- middle and right: matched-cosine oracle ------------------------------------------------------------
    def fresh() -> nn.Module:
        return make_mlp(splits, config.depth, config.width, derive_seed(config.seed, 4))

    data_seed = derive_seed(config.seed, 5)

    def run(name: str, estimator: Any, optimizer: str, lr: float, momentum: float = 0.0, **kw: Any) -> dict:
        model = fresh()
        opt = build_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
        log = train(model, estimator, splits, opt, steps=config.steps, batch_size=config.batch_size, seed=data_seed,
                    eval_every=config.eval_every, progress=progress, desc=f"bias: {name}", **kw)
        return {"steps": log.eval_steps, "train_acc": log.train_acc, "test_acc": log.test_acc,
                "cos_steps": log.cos_steps, "cosine": log.cosine}

    oracle, biased = oracle_method(), config.biased
    adamw: dict[str, Any] = {oracle: run(oracle, oracle, "adamw", config.lr)}
    adamw[biased] = run(biased, biased, "adamw", config.lr, cosine_every=1)
    wt_cos = adamw[biased]["cosine"]
    cos_theta = config.cos_theta if config.cos_theta is not None else float(np.clip(np.mean(wt_cos), 1e-6, 1.0))

    def oracle_run(name: str, biased: bool, optimizer: str, lr: float, momentum: float = 0.0) -> dict:
        model = fresh()
        handle = attach(model, config.biased, seed=derive_seed(config.seed, 6)) if biased else None
        try:
            opt = build_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
            est = _oracle(cos_theta, derive_seed(config.seed, 7), biased, config.scale)
            log = train(model, est, splits, opt, steps=config.steps, batch_size=config.batch_size, seed=data_seed,
                        eval_every=config.eval_every, cosine_every=max(1, config.steps // 10), progress=progress,
                        desc=f"bias: {name}")
        finally:
            if handle is not None:
                handle.remove()
        return {"steps": log.eval_steps, "train_acc": log.train_acc, "test_acc": log.test_acc,
                "cos_steps": log.cos_steps, "cosine": log.cosine}

    adamw["oracle"] = oracle_run("oracle, no bias", False, "adamw", config.lr)
    adamw["oracle+bias"] = oracle_run(f"oracle + {biased} bias", True, "adamw", config.lr)
    sgd: dict[str, Any] = {}
    for mom in (config.momentum, 0.0):
        tag = "momentum" if mom else "no momentum"
        sgd[f"oracle, {tag}"] = oracle_run(f"oracle SGD {tag}", False, "sgd", config.sgd_lr, mom)
        sgd[f"oracle+bias, {tag}"] = oracle_run(f"oracle+bias SGD {tag}", True, "sgd", config.sgd_lr, mom)
    checks = [c for runs in (adamw, sgd) for k, r in runs.items() if k.startswith("oracle") for c in r["cosine"]]
    results = {
        "averaging": {"guesses": grid, "mean": avg_mean, "std": avg_std, "examples": config.examples},
        "cos_theta": cos_theta,
        "wt_cosine": {"mean": mean_std(wt_cos)[0], "std": mean_std(wt_cos)[1]},
        "oracle_cosine_check": {"min": min(checks), "max": max(checks)},
        "adamw": adamw,
        "sgd": sgd,
        "final_train_acc": {**{f"adamw: {k}": v["train_acc"][-1] for k, v in adamw.items()},
                            **{f"sgd: {k}": v["train_acc"][-1] for k, v in sgd.items()}},
    }
    return finish("bias", "Fig. 3, §3 'Bias', A.1, A.4", config, results, started, plot_bias, out_dir)


def plot_bias(record: dict[str, Any]) -> Any:
    """Fig. 3: (left) cosine of the average of N guesses vs N; (middle) oracle vs ``W^T``; (right) SGD ± momentum."""
    res = record["results"]
    fig, axes = figure(3, size=(4.3, 3.4))
    ax = axes[0, 0]
    av = res["averaging"]
    for m, y in av["mean"].items():
        mean = np.asarray([np.nan if v is None else v for v in y], dtype=float)
        std = np.asarray([v or 0.0 for v in av["std"][m]], dtype=float)
        ax.plot(av["guesses"], np.where(mean > 0, mean, np.nan), marker=".", label=method_label(m),
                color=method_color(m))
        ax.fill_between(av["guesses"], np.clip(mean - std, 1e-6, None), np.clip(mean + std, 1e-6, None),
                        color=method_color(m), alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of guesses averaged N")
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"averaging guesses ({av['examples']} examples)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    cos, biased = res["cos_theta"], method_label(record["config"].get("biased", "wt"))
    oracles = {"oracle": ("tab:red", "-", f"oracle cos={cos:.3g}, no bias"),
               "oracle+bias": ("tab:red", "--", f"oracle cos={cos:.3g}, {biased} bias")}
    for k, r in res["adamw"].items():
        color, ls, label = oracles.get(k, (method_color(k), "-", method_label(k)))
        ax.plot(r["steps"], [100 * v for v in r["train_acc"]], color=color, ls=ls, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train accuracy (%)")
    ax.set_title("matched cosine, AdamW", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    for k, r in res["sgd"].items():
        ax.plot(r["steps"], [100 * v for v in r["train_acc"]], color="tab:red" if "no momentum" in k else "tab:green",
                ls="--" if "bias" in k else "-", label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("train accuracy (%)")
    ax.set_title("matched cosine, SGD with / without momentum", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def summarize_bias(record: dict[str, Any]) -> str:
    """The text tables of :func:`run_bias`'s record: the averaging panel at the smallest and largest N, and the final
    train accuracy of every run."""
    res = record["results"]
    av = res["averaging"]
    n1, nmax = av["guesses"][0], av["guesses"][-1]
    left = text_table(("method", f"cosine N={n1}", f"cosine N={nmax}"),
                      [(m, v[0], v[-1]) for m, v in av["mean"].items()],
                      title=f"cosine of the average of N guesses ({av['examples']} examples)")
    check = res["oracle_cosine_check"]
    runs = text_table(("run", "final train acc"), list(res["final_train_acc"].items()),
                      title=f"matched-cosine oracle: cos θ = {fmt(res['cos_theta'])} (measured {fmt(check['min'])} to "
                            f"{fmt(check['max'])})")
    return f"{left}\n\n{runs}"
