"""The follow-up estimators side by side (Wang, Markou, Campbell 2025, arXiv 2511.03110; Flügel et al. 2025).

Their setting: MNIST-1D, an MLP with 3 hidden layers of 128 (``--mlps 4x128``: four linear layers), batch 512, AdamW
lr 1e-4, 300 epochs; and the same on ``mnist-5k`` with the paper's MLP (3 x 128). For each dataset:

1. **Training**: every method from scratch, ``seeds`` seeds, the same number of steps: train and test accuracy along
   training and at the end (mean ± std over seeds).
2. **Cosine along backprop**: a backprop (AdamW) trajectory of ``cosine_steps`` steps on the cosine MLP (``6x1024``
   for ``mnist-5k``: the paper's Fig. 1 MLP); every ``cosine_every`` steps, one guess of every method on that step's
   batch, its cosine to the batch gradient, whole model and per layer. A method whose exact spectrum is over its
   ``exact_budget`` on that MLP (full-rank ``wt-perp``, ``wt-perp-ns`` and ``wt-precond`` at width 1024) is skipped
   there and says so.
3. **Bias and variance** at fixed weights (the first seed's backprop model after training, one training batch):
   :func:`~guess_optim.diagnostics.bias_variance` per layer.

Each part can be run alone (``--parts training,cosine,bias-variance``); the bias/variance part trains its own copy of
the first seed's backprop model (the same weights). Methods are registered names or variants ``name:option=value``
(``wt-perp:rank=1``, ``wt-perp:rank=full``): any registered estimator and its options, with the registry's plot
label and colour.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import DATASETS
from ..diagnostics import bias_variance, cosine_similarity
from ..estimators import METHODS, get_estimator, make_estimator
from ..jacobian import JacobianTooLargeError
from ._common import (
    BaseConfig,
    arg,
    batches,
    build_optimizer,
    cross_entropy,
    derive_seed,
    figure,
    finish,
    load,
    make_mlp,
    mean_std,
    prepare_out_dir,
    text_table,
    train,
)

__all__ = ["FOLLOW_UP_METHODS", "PARTS", "FollowUpConfig", "parse_variant", "run_follow_up", "variant_label"]

FOLLOW_UP_METHODS = ("backprop", "directional", "activation", "wt", "wt-perp:rank=1", "wt-perp:rank=10",
                     "wt-perp:rank=full", "wt-perp-ns", "wt-precond")
"""The methods of the issue: the paper's baselines and the follow-up estimators (``wt-perp`` at ranks 1, 10, full)."""


PARTS = ("training", "cosine", "bias-variance")
"""The three measurements of :func:`run_follow_up`, each of which can be run alone (``--parts``)."""


def _value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"wt-perp:rank=1"`` → ``("wt-perp", {"rank": 1})``: a registered name, then ``:key=value`` options separated
    by ``:`` (values: ints, floats, ``none``, else strings).

    Raises:
        ValueError: an unknown name, a malformed option, or an option the estimator refuses.
    """
    name, *parts = str(variant).split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid method variant: {variant!r}; expected name:option=value, e.g. wt-perp:rank=1")
        options[key.strip().replace("-", "_")] = _value(value.strip())
    if get_estimator(name).space != "backprop" or options:
        make_estimator(name, **options)  # validates the options now, with the estimator's message
    return name, options


def variant_label(variant: str) -> str:
    """The estimator's :meth:`~guess_optim.Estimator.plot_label`, with the variant's options in brackets."""
    name, options = parse_variant(variant)
    label = METHODS[name].plot_label()
    return f"{label} ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else label


def _style(variant: str, variants: list[str]) -> dict[str, Any]:
    """The estimator's ``color``; the variants (among ``variants``) of one estimator differ by line style."""
    name = parse_variant(variant)[0]
    same = [v for v in variants if parse_variant(v)[0] == name]
    index = same.index(variant) if variant in same else 0
    return {"color": METHODS[name].color, "linestyle": ("-", "--", ":", "-.")[index % 4]}


@dataclass
class FollowUpConfig(BaseConfig):
    """Configuration of :func:`run_follow_up` (defaults: the reduced CPU size of RESULTS.md; the follow-up paper: 300
    epochs)."""

    batch_size: int = arg(512, "examples per training batch (follow-up paper: 512)")
    datasets: tuple[str, ...] = arg(("mnist1d", "mnist-5k"), "datasets, one MLP each (--mlps)")
    mlps: tuple[tuple[int, int], ...] = arg(((4, 128), (3, 128)),
                                            "trained MLP per dataset, depth x width (linear layers: 4x128 = 3 hidden "
                                            "layers of 128, the follow-up paper's; 3x128 the paper's)")
    cosine_mlps: tuple[tuple[int, int], ...] = arg(((4, 128), (6, 1024)),
                                                   "MLP of the cosine-along-backprop trajectory per dataset")
    methods: tuple[str, ...] = arg(FOLLOW_UP_METHODS, "methods: registered names or name:option=value variants")
    parts: tuple[str, ...] = arg(PARTS, "what to run: training (accuracy over seeds), cosine (along backprop), "
                                 "bias-variance (at fixed weights)", choices=PARTS)
    seeds: int = arg(3, "training seeds per method (mean ± std over them)")
    epochs: int = arg(7, "training epochs (follow-up paper: 300)")
    lr: float = arg(1e-4, "AdamW learning rate (follow-up paper: 1e-4)")
    weight_decay: float = arg(0.01, "AdamW weight decay (torch's default)")
    eval_every: int = arg(8, "record train/test accuracy every that many steps")
    cosine_steps: int = arg(100, "backprop steps of the cosine trajectory")
    cosine_every: int = arg(25, "measure the cosines every that many steps (and at step 0)")
    cosine_batch_size: int = arg(128, "batch of the cosine trajectory (the paper's Fig. 1: 128)")
    bv_guesses: int = arg(512, "guesses averaged for bias and variance per method")
    bv_per_step: int = arg(64, "guesses per forward for bias and variance")
    bv_single: int = arg(8, "single guesses for the mean cosine of the bias/variance table")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("seeds", "epochs", "eval_every", "cosine_steps", "cosine_every", "cosine_batch_size",
                            "bv_guesses", "bv_per_step")
        self.check_nonneg("bv_single")
        self.check_positive("lr", kind=float)
        self.check_choices("datasets", DATASETS)
        self.check_choices("parts", PARTS)
        for name in ("mlps", "cosine_mlps"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == len(self.datasets)
                    and all(isinstance(c, tuple) and len(c) == 2 and all(isinstance(v, int) and v >= 1 for v in c)
                            for c in value)):
                raise ValueError(f"Invalid {name}: {value!r}; expected one depth x width pair per dataset "
                                 f"({len(self.datasets)}), e.g. 4x128,3x128")
        if not (isinstance(self.methods, tuple) and self.methods and len(set(self.methods)) == len(self.methods)):
            raise ValueError(f"Invalid methods: {self.methods!r}; expected distinct names or name:option=value")
        for m in self.methods:
            parse_variant(m)
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"Invalid weight_decay: {self.weight_decay!r}; expected a finite number >= 0")


def _is_oracle(variant: str) -> bool:
    return get_estimator(parse_variant(variant)[0]).space == "backprop"


def run_follow_up(config: FollowUpConfig, *, out_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run the experiment; with ``out_dir``, write ``follow-up.json`` and ``follow-up.png``.

    Returns:
        The record; ``results["methods"]`` maps each variant to its ``method``, ``options``, ``label`` and
        ``color``; ``results[dataset]`` holds ``training`` (per method: ``eval_steps``, ``train_acc``/``test_acc``
        curves per seed, final ``train``/``test`` per seed, their mean and std, ``skipped_steps``; accuracies in
        ``[0, 1]``), ``cosine`` (``steps``, per method the whole-model cosine at each measurement ``total``, per layer
        ``per_layer[method][layer]``, their trajectory means ``mean`` and ``layer_mean``, ``skipped`` methods with the
        reason) and ``bias_variance`` (per method: :meth:`~guess_optim.diagnostics.BiasVarianceReport.as_dict`).
    """
    from tqdm.auto import tqdm

    prepare_out_dir(out_dir)
    started = time.perf_counter()
    variants = {v: parse_variant(v) for v in config.methods}
    results: dict[str, Any] = {"methods": {
        v: {"method": name, "options": opts, "label": variant_label(v), "color": METHODS[name].color}
        for v, (name, opts) in variants.items()}}
    guessed = {v: nv for v, nv in variants.items() if not _is_oracle(v)}
    per_dataset = (len(config.methods) * config.seeds if "training" in config.parts else 0) + sum(
        len(guessed) for part in ("cosine", "bias-variance") if part in config.parts)
    bar = tqdm(total=len(config.datasets) * per_dataset, desc="follow-up", disable=not progress)
    for d, dataset in enumerate(config.datasets):
        splits = load(config, dataset)
        (depth, width), (cdepth, cwidth) = config.mlps[d], config.cosine_mlps[d]
        steps = config.epochs * -(-len(splits.train) // config.batch_size)
        out: dict[str, Any] = {"mlp": f"{depth}x{width}", "cosine_mlp": f"{cdepth}x{cwidth}", "steps": steps}
        if "training" in config.parts:
            out["training"] = {}
            for v, (name, opts) in variants.items():
                runs = []
                for s in range(config.seeds):
                    runs.append(_train(config, splits, d, s, (depth, width), name, opts, steps, progress,
                                       f"{dataset} {v} s{s}")[1])
                    bar.update()
                tr, te = mean_std([r.train_acc[-1] for r in runs]), mean_std([r.test_acc[-1] for r in runs])
                out["training"][v] = {
                    "eval_steps": runs[0].eval_steps, "train_acc": [r.train_acc for r in runs],
                    "test_acc": [r.test_acc for r in runs], "train": [r.train_acc[-1] for r in runs],
                    "test": [r.test_acc[-1] for r in runs], "train_mean": tr[0], "train_std": tr[1],
                    "test_mean": te[0], "test_std": te[1], "skipped_steps": [r.skipped_steps for r in runs]}
        if "cosine" in config.parts:
            out["cosine"] = _cosine_along_backprop(config, splits, d, cdepth, cwidth, guessed)
            bar.update(len(guessed))
        if "bias-variance" in config.parts:
            # fixed weights: the first seed's backprop model after training (the same weights as the training part's)
            trained = _train(config, splits, d, 0, (depth, width), "backprop", {}, steps, False, "")[0]
            batch = next(batches(splits, config.batch_size, derive_seed(config.seed, d, 3)))
            out["bias_variance"] = {}
            for v, (name, opts) in guessed.items():
                out["bias_variance"][v] = bias_variance(
                    trained.train(), name, batch, cross_entropy, guesses=config.bv_guesses, per_step=config.bv_per_step,
                    single=config.bv_single, seed=derive_seed(config.seed, d, 4), **opts).as_dict()
                bar.update()
        results[dataset] = out
    bar.close()
    return finish("follow-up", "Wang, Markou, Campbell 2025 (arXiv 2511.03110); issue #14", config, results, started,
                  plot_follow_up, out_dir)


def _train(config: FollowUpConfig, splits: Any, d: int, s: int, mlp: tuple[int, int], name: str,
           opts: dict[str, Any], steps: int, progress: bool, desc: str) -> tuple[Any, Any]:
    """Seed ``s`` of one method on dataset ``d``: ``(model, TrainLog)``."""
    seed = derive_seed(config.seed, d, s)
    model = make_mlp(splits, *mlp, seed)
    opt = build_optimizer("adamw", model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log = train(model, name, splits, opt, steps=steps, batch_size=config.batch_size, seed=derive_seed(seed, 1),
                eval_every=config.eval_every, attach_kwargs=opts, progress=progress, desc=desc)
    return model, log


def _cosine_along_backprop(config: FollowUpConfig, splits: Any, d: int, depth: int, width: int,
                           methods: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    model = make_mlp(splits, depth, width, derive_seed(config.seed, d, 5))
    opt = build_optimizer("adamw", model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data = batches(splits, config.cosine_batch_size, derive_seed(config.seed, d, 6))
    steps: list[int] = []
    total: dict[str, list[float]] = {v: [] for v in methods}
    layers: dict[str, dict[str, list[float]]] = {v: {} for v in methods}
    skipped: dict[str, str] = {}
    model.train()
    for step in range(config.cosine_steps + 1):
        batch = next(data)
        if step % config.cosine_every == 0 or step == config.cosine_steps:
            steps.append(step)
            for v, (name, opts) in methods.items():
                if v in skipped:
                    continue
                try:
                    report = cosine_similarity(model, name, batch, cross_entropy,
                                               seed=derive_seed(config.seed, d, 7, step), **opts)
                except JacobianTooLargeError as err:
                    skipped[v] = str(err).split(";")[0]
                    continue
                total[v].append(report.total)
                for layer, c in report.per_layer.items():
                    layers[v].setdefault(layer, []).append(c)
        if step == config.cosine_steps:
            break
        opt.zero_grad(set_to_none=True)
        cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    kept = [v for v in methods if v not in skipped]
    return {"mlp": f"{depth}x{width}", "steps": steps, "total": {v: total[v] for v in kept},
            "per_layer": {v: layers[v] for v in kept},
            "mean": {v: float(np.mean(total[v])) for v in kept},
            "layer_mean": {v: {k: float(np.mean(c)) for k, c in layers[v].items()} for v in kept},
            "skipped": skipped}


def plot_follow_up(record: dict[str, Any]) -> Any:
    """One row per dataset: cosine along backprop (whole model), mean cosine per layer, relative bias vs relative
    variance per layer, test accuracy along training (mean over seeds); a part that was not run is a blank panel."""
    res = record["results"]
    datasets = [k for k in res if k != "methods"]
    variants = list(res["methods"])
    fig, axes = figure(4, len(datasets), size=(4.3, 3.3))
    for row, dataset in enumerate(datasets):
        r = res[dataset]
        for ax, part in zip(axes[row], ("cosine", "cosine", "bias_variance", "training"), strict=True):
            if part not in r:
                ax.text(0.5, 0.5, f"{dataset}: {part.replace('_', '-')} not run", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
        if "cosine" in r:
            _plot_cosine(axes[row, 0], axes[row, 1], dataset, r["cosine"], variants)
        if "bias_variance" in r:
            _plot_bias_variance(axes[row, 2], r, variants)
        if "training" in r:
            _plot_training(axes[row, 3], r, variants)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    return fig


def _plot_cosine(ax: Any, bars: Any, dataset: str, c: dict[str, Any], variants: list[str]) -> None:
    for v, curve in c["total"].items():
        y = [np.nan if x is None or x <= 0 else x for x in curve]
        ax.plot(c["steps"], y, marker=".", label=variant_label(v), **_style(v, variants))
    ax.set_yscale("log")
    ax.set_xlabel("backprop step")
    ax.set_ylabel("cosine to the gradient (one guess)")
    ax.set_title(f"{dataset}, MLP {c['mlp']}: cosine along backprop", fontsize=9)
    ms = list(c["layer_mean"])
    names = list(c["layer_mean"][ms[0]]) if ms else []
    width = 0.8 / max(len(ms), 1)
    for i, v in enumerate(ms):
        style = _style(v, variants)
        vals = [c["layer_mean"][v][k] for k in names]
        bars.bar(np.arange(len(names)) + (i - len(ms) / 2 + 0.5) * width,
                 [np.nan if x is None or x <= 0 else x for x in vals], width=width, color=style["color"],
                 hatch="//" if style["linestyle"] != "-" else None)
    bars.set_yscale("log")
    bars.set_xticks(range(len(names)), names, fontsize=7)
    bars.set_ylabel("trajectory mean (<= 0 not drawn)")
    bars.set_title(f"mean cosine per layer, MLP {c['mlp']}", fontsize=9)


def _plot_bias_variance(ax: Any, r: dict[str, Any], variants: list[str]) -> None:
    for v, rep in r["bias_variance"].items():
        style = _style(v, variants)
        for resolved, marker in ((True, "o"), (False, "v")):  # ▽: bias within 2 noise levels, drawn at 2x the noise
            pts = [(x["relative_variance"], x["relative_bias"] if resolved else 2 * x["bias_noise"] / x["norm"])
                   for x in rep["per_layer"].values()
                   if x["relative_variance"] and x["norm"] and (x["bias"] > 2 * x["bias_noise"]) == resolved]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="none", color=style["color"],
                        fillstyle="full" if style["linestyle"] == "-" else "none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative variance E|ĝ - Eĝ|² / |g|²")
    ax.set_ylabel("relative bias |Eĝ - g| / |g|")
    ax.set_title(f"per layer, MLP {r['mlp']} (▽: bias < 2x its noise)", fontsize=9)


def _plot_training(ax: Any, r: dict[str, Any], variants: list[str]) -> None:
    seeds = 0
    for v, t in r["training"].items():
        mean = np.mean(np.asarray(t["test_acc"], dtype=float), axis=0)
        ax.plot(t["eval_steps"], 100 * mean, label=variant_label(v), **_style(v, variants))
        seeds = len(t["test"])
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MLP {r['mlp']}, mean of {seeds} seeds", fontsize=9)


def summarize_follow_up(record: dict[str, Any]) -> str:
    """The text table of :func:`run_follow_up`'s record: per dataset and method the final accuracies, the mean
    cosine along backprop and the whole model's relative bias and variance."""
    res = record["results"]
    rows = []
    for dataset in (k for k in res if k != "methods"):
        r = res[dataset]
        cosine = r.get("cosine", {"mean": {}, "skipped": {}})
        for v in res["methods"]:
            t = r.get("training", {}).get(v, {})
            bv = r.get("bias_variance", {}).get(v, {}).get("total", {})
            cos = cosine["mean"].get(v)
            rows.append((dataset, v, (t.get("train_mean"), t.get("train_std")), (t.get("test_mean"), t.get("test_std")),
                         cos if cos is not None else ("skipped" if v in cosine["skipped"] else None),
                         bv.get("relative_bias"), bv.get("relative_variance")))
    return text_table(("dataset", "method", "train acc", "test acc", "mean cosine", "rel. bias", "rel. variance"),
                      rows, title=f"follow-up estimators: accuracy over {record['config']['seeds']} seeds after "
                                  f"{record['config']['epochs']} epochs; cosine along backprop; bias/variance at "
                                  "fixed weights (whole model)")
