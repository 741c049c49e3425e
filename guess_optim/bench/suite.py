"""What to measure: configurations (a model and a batch size), cases (a configuration and its runners) and suites.

Runner lists are derived, never typed out: "every runner" is every registered method (each activation-space one
also with ``@recompute``) and every peer; the *core* runners are those the targets name
(:func:`~guess_optim.bench.targets.target_runners`) and the peers. A newly registered estimator is therefore timed
wherever every runner is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .floors import DEFAULT_STORE, floor_ratio, guessed_methods, parse_runner, with_stores
from .peers import PEERS
from .targets import target_runners

__all__ = ["SUITE_NOTES", "Case", "Config", "core_runners", "every_runner", "memory_runners", "suite"]

_LABEL = re.compile(r"^(?:mlp-d(?P<depth>\d+)-w(?P<width>\d+)|(?P<model>convnet|vpt-vit-b16|vpt-vit-tiny))"
                    r"-b(?P<batch>\d+)$")
MODELS = ("mlp", "convnet", "vpt-vit-b16", "vpt-vit-tiny")


@dataclass(frozen=True)
class Config:
    """One model and batch size.

    Attributes:
        model: ``"mlp"`` (the paper's MLP on CIFAR-10-shaped inputs, 3072 features, 10 classes), ``"convnet"``
            (:class:`~guess_optim.models.ConvNet` on ``[B, 3, 32, 32]``), ``"vpt-vit-b16"`` (a randomly initialised
            ViT-B/16, ``ViTConfig()``, frozen, with 10 trained prompt tokens and head on ``[B, 3, 224, 224]``) or
            ``"vpt-vit-tiny"`` (the same at toy size, for tests).
        batch: batch size ``B``.
        depth: number of linear layers (MLP only).
        width: hidden units (MLP only).
    """

    model: str
    batch: int
    depth: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"Invalid model: {self.model!r}; expected one of {MODELS}")
        if self.batch < 1 or (self.model == "mlp" and (self.depth < 1 or self.width < 1)):
            raise ValueError(f"Invalid configuration {self}: batch, and an MLP's depth and width, must be >= 1")

    @property
    def label(self) -> str:
        """``mlp-d6-w1024-b128``, ``convnet-b128``, ``vpt-vit-b16-b8``; :meth:`parse` reads it back."""
        if self.model == "mlp":
            return f"mlp-d{self.depth}-w{self.width}-b{self.batch}"
        return f"{self.model}-b{self.batch}"

    @property
    def frozen(self) -> bool:
        """A frozen backbone with a few trained parameters (prompt tuning): the floor counts 2 products per layer."""
        return self.model.startswith("vpt-")

    @classmethod
    def parse(cls, label: str) -> Config:
        """The :class:`Config` of a :attr:`label`.

        Raises:
            ValueError: a label of no known form.
        """
        m = _LABEL.match(label)
        if m is None:
            raise ValueError(
                f"Invalid configuration: {label!r}; expected mlp-d<depth>-w<width>-b<batch>, convnet-b<batch>, "
                "vpt-vit-b16-b<batch> or vpt-vit-tiny-b<batch>"
            )
        if m["model"]:
            return cls(m["model"], int(m["batch"]))
        return cls("mlp", int(m["batch"]), int(m["depth"]), int(m["width"]))


@dataclass(frozen=True)
class Case:
    """A configuration with what to measure on it.

    Attributes:
        config: the model and batch.
        runners: runners timed against backprop (backprop itself is always included).
        memory: runners whose step peak memory is measured (backprop is added when any is).
        rounds: timing rounds (each runner once per round, beside a backprop step).
        budget_s: stop adding rounds (after 3) once timing this case took this long.
        warmup: untimed steps per runner before timing and before measuring memory (``None``: the run's).
    """

    config: Config
    runners: tuple[str, ...]
    memory: tuple[str, ...] = ()
    rounds: int = 7
    budget_s: float = 120.0
    warmup: int | None = None

    def __post_init__(self) -> None:
        for r in (*self.runners, *self.memory):
            parse_runner(r)
        if self.rounds < 1 or (self.warmup is not None and self.warmup < 0):
            raise ValueError(f"Invalid case {self.config.label}: rounds must be >= 1 and warmup >= 0")


STORE_VARIANTS_MAX_FLOOR = 4.0
"""A method whose step floor exceeds this many backprop steps (the follow-up estimators' spectral solvers: 41x) is
timed at its default store only: its other stores repeat the same cost and would take most of a suite's budget."""


def every_runner() -> tuple[str, ...]:
    """Every registered method (activation-space ones also at every other store, unless their floor exceeds
    :data:`STORE_VARIANTS_MAX_FLOOR`), then every peer."""
    out: list[str] = []
    for method in guessed_methods():
        out += with_stores((method,)) if floor_ratio(method) <= STORE_VARIANTS_MAX_FLOOR else [method]
    return (*out, *PEERS)


def core_runners() -> tuple[str, ...]:
    """The runners the targets name, then the peers (``activation``, ``wt``, ``wt@recompute``, ``wt@release``,
    ``directional``, ``torchzero-fg``, ``mezo`` with today's targets)."""
    return tuple(dict.fromkeys((*_registered(target_runners()), *PEERS)))


def memory_runners() -> tuple[str, ...]:
    """The core runners, each activation-space one at every store (memory is where stores differ)."""
    return with_stores(core_runners())


def _registered(runners: tuple[str, ...]) -> tuple[str, ...]:
    """``runners`` without those whose method is not registered (a target may outlive its estimator)."""
    out = []
    for r in runners:
        try:
            parse_runner(r)
        except ValueError:
            continue
        out.append(r)
    return tuple(out)


SUITE_NOTES = {
    "quick": "tiny models for the tests; the ratios there measure Python overhead, not the methods.",
    "full": "on CPU the MLP grid (depth 3-24 x width 128-4096 x batch 32-1024) is walked one axis at a time through "
            "the 6 x 1024 MLP at batch 128, plus the paper's 3 x 128 MLP, the ConvNet and ViT-B/16 prompt tuning at "
            "batch 8, to fit in about 15 minutes on 2 cores; every runner is timed on the 6 x 1024 MLP and the "
            "ConvNet, the core runners elsewhere; memory is measured where activations dominate. On CUDA the whole "
            "grid is timed. See `guess_optim.bench.suite`.",
}
"""One line per suite for the report."""


def suite(name: str, device: str = "cpu") -> list[Case]:
    """The configurations of a suite.

    ``quick`` (under a minute; the tests run it with 2 rounds): MLPs of depth 2 and 3 and width 32, a ConvNet and a
    toy VPT at batch 4-16; every runner on the depth-3 MLP, the core runners elsewhere; memory of the core runners
    with a non-default store on the depth-3 MLP; 25 rounds after 3 warm-up steps, so that a runner's median time and
    its ratio to backprop tell the same story.

    ``full`` on CPU (about 15 minutes on 2 cores with one torch thread, pruned to fit): the MLP grid, depth
    {3, 6, 12, 24} x width {128, 1024, 4096} x batch {32, 128, 1024}, is walked one axis at a time through the
    6 x 1024 MLP at batch 128 (8 points instead of 36); every runner is timed there and on the ConvNet, the core
    runners elsewhere; 15-25 rounds where a step takes milliseconds (so that a runner's median time and its ratio to
    backprop agree), 5-7 where it takes seconds. The target configurations: the paper's 3 x 128 MLP at
    batch 128, and ViT-B/16 prompt tuning at batch 8, where only the runners its targets name are timed, in 3 rounds
    (a guessed step takes 10-20 s there; activation and MeZO are left out to keep the suite in budget). Memory: the
    depth axis at width 128 and batch 1024 (where activations, not weight-sized gradients, dominate), depth 6 and 24
    at width 1024 and batch 128, depth 24 at width 1024 and batch 1024, the ConvNet, and ViT-B/16 at batch 8 (``wt``
    at both stores).

    ``full`` on CUDA: the whole 36-point grid with the core runners, every runner on the 6 x 1024 MLP and the
    ConvNet, ViT-B/16 at batch 8 and 32; memory on the width-1024 points, the ConvNet and ViT-B/16.

    Raises:
        ValueError: unknown suite name.
    """
    if name == "quick":
        return _quick()
    if name != "full":
        raise ValueError(f"Invalid suite: {name!r}; expected 'quick' or 'full'")
    return _full_cuda() if device == "cuda" else _full_cpu()


def _quick() -> list[Case]:
    core = core_runners()
    stored = tuple(r for r in core if parse_runner(r).store != DEFAULT_STORE)  # wt@recompute, wt@release today
    return [
        Case(Config("mlp", 16, 3, 32), every_runner(), stored, rounds=25, warmup=3),
        *(Case(config, core, rounds=25, warmup=3)
          for config in (Config("mlp", 16, 2, 32), Config("convnet", 8), Config("vpt-vit-tiny", 4))),
    ]


def _full_cpu() -> list[Case]:
    every, core, memory = every_runner(), core_runners(), memory_runners()
    vit = Config("vpt-vit-b16", 8)
    vit_time = _registered(target_runners(vit.label, "time"))
    vit_memory = with_stores(_registered(target_runners(vit.label, "memory")))
    return [
        Case(Config("mlp", 128, 6, 1024), every, memory, rounds=15, budget_s=150),
        Case(Config("mlp", 128, 3, 128), core, rounds=25, budget_s=20),
        Case(Config("mlp", 128, 3, 1024), core, budget_s=40),
        Case(Config("mlp", 128, 12, 1024), core, budget_s=60),
        Case(Config("mlp", 128, 24, 1024), core, memory, budget_s=90),
        Case(Config("mlp", 128, 6, 128), core, rounds=25, budget_s=20),
        Case(Config("mlp", 128, 6, 4096), core, rounds=5, budget_s=90),
        Case(Config("mlp", 32, 6, 1024), core, rounds=15, budget_s=30),
        Case(Config("mlp", 1024, 6, 1024), core, rounds=5, budget_s=90),
        *(Case(Config("mlp", 1024, d, 128), (), memory) for d in (3, 6, 12, 24)),
        Case(Config("mlp", 1024, 24, 1024), (), memory),
        Case(Config("convnet", 128), every, memory, rounds=15, budget_s=60),
        Case(vit, vit_time, vit_memory, rounds=3, budget_s=240, warmup=1),
    ]


def _full_cuda() -> list[Case]:
    every, core, memory = every_runner(), core_runners(), memory_runners()
    cases = [Case(Config("mlp", 128, 6, 1024), every, memory, rounds=15)]
    for d in (3, 6, 12, 24):
        for w in (128, 1024, 4096):
            for b in (32, 128, 1024):
                if (d, w, b) != (6, 1024, 128):
                    cases.append(Case(Config("mlp", b, d, w), core, memory if w == 1024 else (), rounds=9))
    return [*cases, Case(Config("convnet", 128), every, memory, rounds=15),
            *(Case(Config("vpt-vit-b16", b), core, memory, rounds=7) for b in (8, 32))]
