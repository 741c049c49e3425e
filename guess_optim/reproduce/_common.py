"""Pieces shared by the reproduction experiments: configs, seeds, models, training loop, output files.

Nothing here holds global state: every experiment gets its whole configuration as a dataclass, derives every seed
from ``config.seed`` with :func:`derive_seed`, builds its model under a forked global RNG (so the caller's global RNG
is left as it was) and draws guesses from the engine's private generators.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .. import __version__
from .._checks import check_choice, check_float, check_int
from .._io import ensure_writable_dir, json_safe, write_json
from .._seeds import derive_seed
from ..data import DATASETS, DatasetSplits, load_dataset, make_loaders
from ..diagnostics import backprop_gradient, gradient_cosine, read_grads
from ..engine import NonFiniteEstimateWarning, attach
from ..estimators import METHODS, get_estimator
from ..models import MLP
from ..optim import OPTIMIZERS, build_optimizer

__all__ = [
    "OPTIMIZERS",
    "RATIO_BASELINE",
    "BaseConfig",
    "DatasetConfig",
    "Estimator",
    "TrainLog",
    "accuracy",
    "all_methods",
    "arg",
    "batches",
    "build_optimizer",
    "cross_entropy",
    "derive_seed",
    "effective_rank",
    "figure",
    "finish",
    "fmt",
    "guessed_methods",
    "is_oracle",
    "load",
    "make_mlp",
    "mean_std",
    "method_color",
    "method_label",
    "oracle_method",
    "prepare_out_dir",
    "text_table",
    "train",
    "versions",
    "windowed_mean",
]

RATIO_BASELINE = "directional"
"""The method every ratio is taken to (``ratio_to_directional``): the paper's yardstick, "hundreds of times" the
cosine similarity of directional descent (§3)."""

Batch = tuple[Tensor, Tensor]
Estimator = Callable[[nn.Module, Batch], Tensor]
"""Writes a gradient (exact or estimated) of the batch's loss into ``p.grad`` and returns the loss (a scalar)."""


def arg(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a ``--flag`` help string (read by the CLI) and optional ``choices``.

    A callable ``default`` is a default factory, called for each config (e.g. :func:`guessed_methods`: an estimator
    registered after import is in the default).
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


# ------------------------------------------------------------------------------------------- methods, from the registry
def all_methods() -> tuple[str, ...]:
    """Every registered method, in registry order."""
    return tuple(METHODS)


def guessed_methods() -> tuple[str, ...]:
    """Every registered method except the backprop oracle (``space == "backprop"``), in registry order."""
    return tuple(m for m, cls in METHODS.items() if cls.space != "backprop")


def oracle_method() -> str:
    """The name of the registered backprop oracle (the estimator whose ``space`` is ``"backprop"``)."""
    return next(m for m, cls in METHODS.items() if cls.space == "backprop")


def is_oracle(method: str) -> bool:
    """Whether ``method`` (a registered name) is the backprop oracle."""
    return get_estimator(method).space == "backprop"


def _registered_base(name: str) -> str | None:
    """``name`` if registered; for a variant such as ``"downstream l=2"`` or ``"wt p=0.5"``, the registered method it
    starts with; else ``None``."""
    bases = [m for m in METHODS if name == m or name.startswith(m + " ")]
    return max(bases, key=len) if bases else None


def method_label(name: str) -> str:
    """Legend label: the estimator's :meth:`~guess_optim.Estimator.plot_label`; a variant (``"downstream l=2"``) or an
    unregistered name keeps its own name."""
    return METHODS[name].plot_label() if name in METHODS else name


def method_color(name: str) -> str | None:
    """Plot colour: the estimator's ``color``; a variant (``"downstream l=2"``) takes its method's; else ``None``
    (matplotlib's cycle)."""
    base = _registered_base(name)
    return None if base is None else METHODS[base].color


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected {expected}")


def _check_list(name: str, value: Any, expected: str) -> None:
    _check(isinstance(value, tuple) and len(value) > 0, name, value, f"a non-empty list of {expected}")


@dataclass
class BaseConfig:
    """Fields every experiment has. Subclasses add their own and call ``super().__post_init__()``."""

    data_dir: str | None = arg(None, "root of the torchvision datasets (mnist, svhn, cifar10, cifar100)")
    download: bool = arg(False, "let torchvision download a missing dataset into --data-dir")
    batch_size: int = arg(128, "examples per batch")
    seed: int = arg(0, "base seed: model init, data order and guesses derive from it")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lists (e.g. a config read back from JSON) become the tuples expected
            v = getattr(self, f.name)
            if isinstance(v, list):  # configs hold no lists (arg() refuses list defaults)
                setattr(self, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)  # kept as a string so the config stays JSON-ready
        _check(self.data_dir is None or isinstance(self.data_dir, str), "data_dir", self.data_dir, "a path or None")
        self.check_positive("batch_size")
        check_int("seed", self.seed, low=0)

    # ------------------------------------------------------------------------------------------- validators
    def check_positive(self, *names: str, kind: type = int) -> None:
        """Every named field is an ``int >= 1`` (``kind=int``) or a finite float ``> 0`` (``kind=float``)."""
        for n in names:
            if kind is int:
                check_int(n, getattr(self, n), low=1)
            else:
                check_float(n, getattr(self, n), low=0.0, strict=True)

    def check_nonneg(self, *names: str) -> None:
        """Every named field is an ``int >= 0``."""
        for n in names:
            check_int(n, getattr(self, n), low=0)

    def check_methods(self, name: str, allowed: Sequence[str] | None = None) -> None:
        """Field ``name`` is a non-empty tuple of distinct method names from ``allowed`` (default: the registry)."""
        allowed = all_methods() if allowed is None else tuple(allowed)
        v = getattr(self, name)
        _check(isinstance(v, tuple) and len(v) > 0 and len(set(v)) == len(v) and all(m in allowed for m in v),
               name, v, f"distinct names from {', '.join(allowed)}")

    def check_floats(self, name: str) -> None:
        """Field ``name`` is a non-empty tuple of finite floats ``> 0``."""
        v = getattr(self, name)
        _check_list(name, v, "finite numbers > 0")
        for i, x in enumerate(v):
            check_float(f"{name}[{i}]", x, low=0.0, strict=True)

    def check_ints(self, name: str, low: int = 1) -> None:
        """Field ``name`` is a non-empty tuple of ints ``>= low``."""
        v = getattr(self, name)
        _check_list(name, v, f"ints >= {low}")
        for i, x in enumerate(v):
            check_int(f"{name}[{i}]", x, low=low)

    def check_choice(self, name: str, choices: Sequence[str]) -> None:
        """Field ``name`` is one of ``choices``."""
        check_choice(name, getattr(self, name), choices)

    def check_choices(self, name: str, choices: Sequence[str]) -> None:
        """Field ``name`` is a non-empty tuple of values from ``choices``."""
        v = getattr(self, name)
        _check_list(name, v, f"names from {', '.join(choices)}")
        for x in v:
            check_choice(name, x, choices)


@dataclass
class DatasetConfig(BaseConfig):
    """:class:`BaseConfig` plus the one dataset the experiment runs on."""

    dataset: str = arg("mnist-5k", "dataset (mnist-5k is embedded; the others need --data-dir)", choices=DATASETS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("dataset", DATASETS)


def load(config: BaseConfig, dataset: str | None = None) -> DatasetSplits:
    """``dataset`` (default: ``config.dataset``) with ``config``'s data directory and download flag (split seed 0, as
    everywhere in the project)."""
    return load_dataset(dataset or config.dataset, data_dir=config.data_dir, download=config.download)


def make_mlp(splits: DatasetSplits, depth: int, width: int, seed: int) -> MLP:
    """The paper's MLP for ``splits``, initialized from ``seed`` under a forked global RNG (the caller's RNG state is
    unchanged)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(int(np.prod(splits.input_shape)), splits.num_classes, depth=depth, width=width)


def batches(splits: DatasetSplits, batch_size: int, seed: int, *, device: str | torch.device | None = None
            ) -> Iterator[Batch]:
    """Endless shuffled training batches, epoch after epoch (shuffling seeded by ``seed``), on ``device`` (default:
    where the splits are)."""
    loader, _ = make_loaders(splits, batch_size, seed=seed, device=device)
    while True:
        yield from loader


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 1000) -> float:
    """Fraction in ``[0, 1]`` of ``dataset`` classified correctly (model in eval mode for the call)."""
    was = model.training
    model.eval()
    try:
        x, y = dataset.tensors
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    finally:
        model.train(was)
    return correct / len(y)


def effective_rank(matrix: Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))`` with ``p = σ / Σσ`` the normalized singular values.

    Lies in ``[1, rank(matrix)]`` for a non-zero matrix (1: one singular value; ``rank``: all equal); 0 for a zero
    matrix. Computed in float64.

    Args:
        matrix: a 2-D tensor ``[m, n]``.
    """
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.detach().double())
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """The loss of every experiment: mean cross-entropy over the batch."""
    return F.cross_entropy(output, target)


@dataclass
class TrainLog:
    """What :func:`train` records. Steps count optimizer steps; accuracies are fractions in ``[0, 1]``."""

    eval_steps: list[int] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    cos_steps: list[int] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    skipped_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(
    model: nn.Module,
    method: str | Estimator,
    splits: DatasetSplits,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int = 0,
    cosine_every: int = 0,
    attach_kwargs: dict[str, Any] | None = None,
    on_measure: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "",
) -> TrainLog:
    """Train ``model`` for ``steps`` optimizer steps; record accuracies and the cosine of the step's gradient.

    Args:
        model: the model (trained in place).
        method: a method name (``attach``-ed for the run with ``attach_kwargs`` and a guess seed derived from
            ``seed``; ``backprop`` runs plain autograd), or an :data:`Estimator` that writes ``p.grad`` itself.
        splits: the dataset; batches of ``batch_size`` shuffled with ``seed``.
        optimizer: steps on the written ``p.grad``.
        steps: number of optimizer steps.
        batch_size: examples per step.
        seed: data-order seed of the run (the guess seed is ``derive_seed(seed, 1)``).
        eval_every: every that many steps (and at steps 0 and ``steps``) record train and test accuracy on the whole
            splits; 0 = only at the end.
        cosine_every: every that many steps, record the cosine between the gradient written this step and the
            backprop gradient on the same batch (one extra backprop); 0 = never.
        attach_kwargs: extra keyword arguments of :func:`~guess_optim.attach`.
        on_measure: called as ``on_measure(step, model)`` wherever accuracies are recorded.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        The :class:`TrainLog`.
    """
    from tqdm.auto import tqdm

    log = TrainLog()
    handle = None
    if isinstance(method, str) and not is_oracle(method):
        # A seed of its own: the guesses must not replay the data-order generator's stream.
        handle = attach(model, method, seed=derive_seed(seed, 1), **(attach_kwargs or {}))

    def measure(step: int) -> None:
        log.eval_steps.append(step)
        log.train_acc.append(accuracy(model, splits.train))
        log.test_acc.append(accuracy(model, splits.test))
        if on_measure is not None:
            on_measure(step, model)

    model.train()
    data = batches(splits, batch_size, seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteEstimateWarning)
            measure(0)
            for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
                batch = next(data)
                optimizer.zero_grad(set_to_none=True)
                if callable(method):
                    loss = method(model, batch)
                else:
                    loss = cross_entropy(model(batch[0]), batch[1])
                    loss.backward()
                log.loss.append(float(loss.detach()))
                if cosine_every and (step - 1) % cosine_every == 0:
                    reference = backprop_gradient(model, batch, cross_entropy)
                    log.cos_steps.append(step - 1)
                    log.cosine.append(gradient_cosine(model, read_grads(model), reference).total)
                optimizer.step()
                if step == steps or (eval_every and step % eval_every == 0):
                    measure(step)
    finally:
        if handle is not None:
            log.skipped_steps = handle.skipped_steps
            handle.remove()
    return log


def windowed_mean(steps: list[int], values: list[float], width: int) -> tuple[list[int], list[float]]:
    """Means of ``values`` over consecutive windows of ``width`` steps; each labelled by its window's middle step."""
    groups: dict[int, list[float]] = {}
    for s, v in zip(steps, values, strict=True):
        groups.setdefault(s // width, []).append(v)
    return ([int(k * width + width // 2) for k in groups], [float(np.mean(v)) for v in groups.values()])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of finite values (NaN if none)."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    import tqdm

    return {"guess_optim": __version__, "torch": torch.__version__, "numpy": np.__version__, "tqdm": tqdm.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_threads": str(torch.get_num_threads())}


def prepare_out_dir(out_dir: str | os.PathLike | None) -> None:
    """Create ``out_dir`` (with its parents) and check that files can be written there; every ``run_*`` calls it before
    running, so that an unusable directory is reported at once instead of by :func:`finish`, after the run, with the
    results lost. ``None`` (nothing written) passes.

    Raises:
        ValueError: ``out_dir`` is an existing file, cannot be created or is not writable (the message names it and
            the reason).
    """
    if out_dir is not None:
        try:
            ensure_writable_dir(out_dir)
        except ValueError as err:
            raise ValueError(f"Invalid out_dir: {err}") from None


def finish(
    name: str,
    paper: str,
    config: BaseConfig,
    results: dict[str, Any],
    started: float,
    plot: Callable[[dict[str, Any]], Any],
    out_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    """Assemble an experiment's record; with ``out_dir``, write ``<name>.json`` and ``<name>.png`` there.

    Returns:
        ``{"experiment", "paper", "config", "results", "versions", "seconds"}`` (+ ``"files"`` when written). NaN and
        infinities become ``None`` (JSON ``null``).
    """
    record = {
        "experiment": name,
        "paper": paper,
        "config": json_safe(dataclasses.asdict(config)),
        "results": json_safe(results),
        "versions": versions(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig = plot(record)
        png = out / f"{name}.png"
        fig.savefig(png, dpi=110, bbox_inches="tight")
        record["files"] = [str(out / f"{name}.json"), str(png)]
        write_json(out / f"{name}.json", record)
    return record


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a text table: ``spec`` for floats, ``mean ± std`` for a pair, ``-`` for ``None`` (NaN in JSON)."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{fmt(value[0], spec)} ± {fmt(value[1], spec)}"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else format(value, spec)
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str = "") -> str:
    """A plain-text table (first column left-aligned, the others right-aligned); cells go through :func:`fmt`."""
    cells = [[str(h) for h in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] if title else []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                    strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def figure(ncols: int, nrows: int = 1, *, size: tuple[float, float] = (4.2, 3.3)) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` (Agg, no pyplot state) and its axes as a 2-D array ``[nrows, ncols]``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('plots need matplotlib: pip install "guess-optim[plot]"') from err
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes
