"""Speed and memory of a guessed training step against a backprop step of the same model (DESIGN.md §7).

Everything is reported as a **ratio to backprop measured side by side in the same process**: the machines are shared
and noisy, so an absolute time means little.

What one measurement is:

* **A step** is a full training step: ``optimizer.zero_grad()``, forward, ``F.cross_entropy``, ``loss.backward()``,
  ``optimizer.step()`` (``torch.optim.AdamW``, no weight decay, for every runner; the ``torchzero`` peer uses its own
  ``Adam`` + ``LR`` modules, the same update). Each runner has its own copy of the model, with the same initial
  weights, and the same batch.
* **Time.** After warm-up, every runner is timed in rounds, each time right next to a backprop step (``B M`` in
  even rounds, ``M B`` in odd ones; the order of the runners rotates from round to round), so load drift hits both
  sides of every ratio. A runner's *ratio* is the median over rounds of ``t_runner / t_backprop`` in that round; the
  spread is the interquartile range (IQR) of those per-round ratios.
* **Floor.** A backprop step costs three layer-sized matrix products per layer: the forward, the input gradient and
  the weight gradient. A guessed step in activation space costs the same three — the primal, the tangent
  (``W ẋ``) and the weight estimate (the outer product ``(d u) xᵀ``) — plus whatever its guess needs:
  ``wt`` one more (``W_{i+1}ᵀ ε``), ``downstream``/``self-sharpening`` two more (the next layer's forward for its
  activation mask, then ``W_{i+1}ᵀ (m ⊙ ε)``); ``mixing`` mixes the batch (a ``B x B`` product, ``B / width`` of a
  layer's), counted as zero. Weight-space ``directional`` (and ``torchzero``'s forward gradient) costs the primal,
  ``W ẋ`` and ``V x`` (its estimate ``(Σ d) V`` is element-wise); MeZO costs two forwards. ``store="recompute"``
  runs a second forward during backward that recomputes the primal and the guess. The *floor* of a runner is
  ``backprop time × (its product count / 3)`` (:func:`floor_ratio`), and ``of floor`` is its measured ratio divided
  by that: ``1.0`` means no overhead beyond the matrix products. With a frozen backbone (prompt tuning) backprop needs
  no weight gradients (2 products per layer) and every runner's floor is 2 as well (3 with ``@recompute``).
  Element-wise work, random numbers, the optimizer and Python are not in the model, so small layers sit far above
  their floor.
* **Memory.** The *step peak* is the peak memory during one step above the memory just before it, once the weights,
  the optimizer state and the batch exist (after warm-up steps) and ``zero_grad()`` has freed the gradients: the
  gradients the step writes, the activations it keeps, guesses, and every temporary (the optimizer's included). On
  CPU it is measured in a fresh subprocess per configuration and runner, from the kernel's peak resident set size
  (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up; ``MALLOC_MMAP_THRESHOLD_`` is fixed so that
  freed tensors go back to the OS). Where the peak cannot be reset, the first step of the process is measured against
  ``getrusage(RUSAGE_SELF).ru_maxrss`` taken after building the model (it then also counts the first allocation of
  the optimizer state). On CUDA it is ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated``
  before the step. The resident state (weights and buffers, gradients, optimizer state) is counted from the tensors
  and reported beside it. Gradients are as large as the trained weights for every runner (a guessed step writes
  ``p.grad`` too), so the saving of ``store="recompute"`` shows where activations outweigh them.

Peers: ``torchzero``'s ``ForwardGradient`` (weight-space forward gradients, Baydin et al. 2022; an optional
dependency, skipped with a message when it is not installed) and :func:`mezo_step`, a MeZO-style two-forward SPSA step
(Malladi et al. 2023).

Run ``python -m guess_optim.bench --suite quick`` (seconds) or ``--suite full`` (the issue's grid, pruned to about
15 minutes on 2 CPU cores; see :func:`suite`), ``--device cuda`` on a GPU, ``--profile wt`` for the PyTorch and
Python profiles of one configuration.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import cProfile
import ctypes
import gc
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import __version__, attach
from ._io import write_json, write_text
from .guesses import METHODS
from .models import MLP, ConvNet

__all__ = [
    "GUESS_MATMULS",
    "PEERS",
    "SCHEMA",
    "TARGETS",
    "Case",
    "Config",
    "Target",
    "evaluate_targets",
    "floor_ratio",
    "main",
    "measure_memory",
    "mezo_step",
    "plot",
    "profile_step",
    "run",
    "suite",
    "time_case",
    "to_markdown",
]

SCHEMA = "guess_optim.bench/1"
LR = 1e-4
IMAGE = (3, 32, 32)  # CIFAR-10-shaped inputs for the MLPs and the ConvNet (paper §3)
NUM_CLASSES = 10
PEERS = ("mezo", "torchzero-fg")
"""Runners that are not guess_optim methods: a MeZO-style SPSA step and torchzero's ``ForwardGradient``."""

GUESS_MATMULS: dict[str, int] = {"activation": 0, "mixing": 0, "wt": 1, "downstream": 2, "self-sharpening": 2}
"""Layer-sized matrix products per layer that an activation-space guess costs on top of primal, tangent and
estimate (the floor model of the module docstring)."""


def floor_ratio(runner: str, *, frozen: bool = False) -> float:
    """The floor of ``runner``'s step time as a fraction of a backprop step (module docstring, "Floor").

    Args:
        runner: a method name of :data:`~guess_optim.guesses.METHODS`, optionally with ``"@recompute"``, or one of
            :data:`PEERS`.
        frozen: the layers are frozen and only a few parameters at the input and output train (prompt tuning):
            backprop then costs two products per layer (forward, input gradient: no weight gradient), every guessed
            method and peer two as well (primal and tangent, or MeZO's two forwards; the guesses and estimates
            touch only the small trained modules), and ``@recompute`` one more forward. (default: ``False``)

    Returns:
        ``products / 3``: e.g. ``1.0`` for ``activation``, ``4/3`` for ``wt``, ``2/3`` for ``mezo``; with ``frozen``,
        ``1.0`` for every runner and ``1.5`` with ``@recompute``.

    Raises:
        ValueError: unknown runner.
    """
    method, store = _split(runner)
    if method == "backprop":
        return 1.0
    if frozen:
        return 1.5 if store == "recompute" else 1.0
    if method == "mezo":
        return 2 / 3
    if method in ("directional", "torchzero-fg"):  # primal, W ẋ, V x; recompute: + a primal forward
        return (3 + (store == "recompute")) / 3
    g = GUESS_MATMULS[method]
    # activations: primal, tangent, guess, estimate; recompute: primal, tangent, guess, then primal, guess, estimate
    return (3 + g if store == "activations" else 4 + 2 * g) / 3


def _split(runner: str) -> tuple[str, str]:
    method, _, store = runner.partition("@")
    store = store or "activations"
    if method not in METHODS and method not in PEERS or store not in ("activations", "recompute") or (
            method in PEERS and store != "activations"):
        raise ValueError(
            f"Invalid runner: {runner!r}; expected a method of {sorted(METHODS)} (optionally '@recompute') "
            f"or one of {list(PEERS)}"
        )
    return method, store


# ------------------------------------------------------------------------------------------------ configurations
_LABEL = re.compile(r"^(?:mlp-d(?P<depth>\d+)-w(?P<width>\d+)|(?P<model>convnet|vpt-vit-b16|vpt-vit-tiny))"
                    r"-b(?P<batch>\d+)$")


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

    @property
    def label(self) -> str:
        """``mlp-d6-w1024-b128``, ``convnet-b128``, ``vpt-vit-b16-b8``; :meth:`parse` reads it back."""
        if self.model == "mlp":
            return f"mlp-d{self.depth}-w{self.width}-b{self.batch}"
        return f"{self.model}-b{self.batch}"

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


SUITE_NOTES = {
    "quick": "tiny models for the tests; the ratios there measure Python overhead, not the methods.",
    "full": "on CPU the issue's MLP grid (depth 3-24 x width 128-4096 x batch 32-1024, 36 points) is walked one axis "
            "at a time through the paper's 6 x 1024 MLP at batch 128 (8 points), to fit in about 15 minutes on 2 "
            "cores; every runner is timed on that MLP and the ConvNet, the core runners and the peers elsewhere; "
            "memory is measured where activations dominate (batch 1024, width 128, depth 3-24) and on depth 6 and "
            "24 at width 1024. On CUDA the whole grid is timed. See `guess_optim.bench.suite`.",
}
"""One line per suite for the report."""

ALL_GUESSED = ("activation", "mixing", "wt", "downstream", "self-sharpening", "directional")
CORE = ("activation", "wt", "directional", "wt@recompute")
MEMORY = ("activation", "wt", "directional", "activation@recompute", "wt@recompute", *PEERS)


def suite(name: str, device: str = "cpu") -> list[Case]:
    """The configurations of a suite.

    ``quick`` (tests, seconds): MLPs of depth 2 and 3 and width 32, a ConvNet and a toy VPT at batch 4-16; every
    runner on the depth-3 MLP.

    ``full``: the issue's grid, MLP depth {3, 6, 12, 24} x width {128, 1024, 4096} x batch {32, 128, 1024}, a small
    ConvNet and ViT-B/16 prompt tuning. On CPU it is pruned to about 15 minutes on 2 cores: the MLP grid is walked one
    axis at a time through the paper's 6 x 1024 MLP at batch 128 (depth 3-24 at width 1024, width 128-4096 at depth 6,
    batch 32-1024) instead of all 36 points; every runner is timed on the centre and the ConvNet, the core runners
    (``activation``, ``wt``, ``directional``, ``wt@recompute``) and the peers elsewhere (fewer rounds where a step
    takes seconds), ViT-B/16 at batch 2 in 3 rounds (a guessed step takes 5-10 s there). Memory: the depth axis at
    width 128 and batch 1024 (where activations, not weight-sized gradients, dominate), depth 6 and 24 at width 1024
    and batch 128, depth 24 at width 1024 and batch 1024, the ConvNet and ViT-B/16 at batch 4. On CUDA the whole
    36-point grid is timed with the core runners and the peers, and ViT-B/16 at batch 32.

    Raises:
        ValueError: unknown suite name.
    """
    every = (*ALL_GUESSED, "activation@recompute", "wt@recompute", *PEERS)
    if name == "quick":
        return [
            Case(Config("mlp", 16, 3, 32), every, ("wt@recompute",), rounds=3),
            Case(Config("mlp", 16, 2, 32), ("activation", "wt"), rounds=3),
            Case(Config("convnet", 8), ("activation", "wt", "directional", "mezo"), rounds=3),
            Case(Config("vpt-vit-tiny", 4), ("wt", "wt@recompute", "directional", *PEERS), rounds=3),
        ]
    if name != "full":
        raise ValueError(f"Invalid suite: {name!r}; expected 'quick' or 'full'")
    side = (*CORE, *PEERS)
    if device == "cuda":
        cases = [Case(Config("mlp", 128, 6, 1024), every, MEMORY, rounds=15)]
        for d in (3, 6, 12, 24):
            for w in (128, 1024, 4096):
                for b in (32, 128, 1024):
                    if (d, w, b) != (6, 1024, 128):
                        cases.append(Case(Config("mlp", b, d, w), side, MEMORY if w == 1024 else (), rounds=9))
        return [*cases, Case(Config("convnet", 128), every, MEMORY, rounds=15),
                Case(Config("vpt-vit-b16", 32), side, MEMORY, rounds=7)]
    vit_runners = ("activation", "wt", "directional", *PEERS)
    return [
        Case(Config("mlp", 128, 6, 1024), every, MEMORY, rounds=9, budget_s=150),
        Case(Config("mlp", 128, 3, 1024), side, budget_s=40),
        Case(Config("mlp", 128, 12, 1024), side, budget_s=60),
        Case(Config("mlp", 128, 24, 1024), side, MEMORY, budget_s=90),
        Case(Config("mlp", 128, 6, 128), side, rounds=9, budget_s=20),
        Case(Config("mlp", 128, 6, 4096), side, rounds=5, budget_s=90),
        Case(Config("mlp", 32, 6, 1024), side, rounds=9, budget_s=30),
        Case(Config("mlp", 1024, 6, 1024), side, rounds=5, budget_s=90),
        *(Case(Config("mlp", 1024, d, 128), (), MEMORY) for d in (3, 6, 12, 24)),
        Case(Config("mlp", 1024, 24, 1024), (), ("activation@recompute", "wt@recompute", "mezo")),
        Case(Config("convnet", 128), every, MEMORY, rounds=9, budget_s=40),
        Case(Config("vpt-vit-b16", 2), vit_runners, rounds=3, budget_s=150, warmup=1),
        Case(Config("vpt-vit-b16", 4), (), (*vit_runners, "activation@recompute", "wt@recompute"), warmup=1),
    ]


# ------------------------------------------------------------------------------------------------ models, runners
class Unavailable(RuntimeError):
    """A runner that cannot run here (an optional dependency is missing)."""


@dataclass
class _Built:
    model: nn.Module
    x: Tensor
    y: Tensor
    head: str | None  # attribute name of the head (the logits module) for models with a ModelOutput
    logits: Callable[[nn.Module, Tensor], Tensor]


def _vpt_classes() -> tuple[Any, Any]:
    try:
        from .integrations.vpt import VisualPromptTuning, VPTConfig
    except ImportError as err:
        raise Unavailable(f"visual prompt tuning needs transformers: pip install \"guess-optim[hf]\" ({err})") from err
    return VisualPromptTuning, VPTConfig


def _build(config: Config, device: torch.device, seed: int) -> _Built:
    """The model (train mode, seeded initialisation), a random batch and how to get logits."""
    torch.manual_seed(seed)
    if config.model in ("mlp", "convnet"):
        model = MLP(math.prod(IMAGE), NUM_CLASSES, config.depth, config.width) if config.model == "mlp" else (
            ConvNet(IMAGE[0], NUM_CLASSES))
        x = torch.randn(config.batch, *IMAGE)
        head, logits = None, lambda m, x: m(x)
    else:
        try:
            from transformers import ViTConfig, ViTForImageClassification
        except ImportError as err:
            raise Unavailable(f"ViT prompt tuning needs transformers: pip install \"guess-optim[hf]\" ({err})") from err
        vpt, vpt_config = _vpt_classes()
        vit_config = ViTConfig(num_labels=NUM_CLASSES) if config.model == "vpt-vit-b16" else ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=NUM_CLASSES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = vpt(ViTForImageClassification(vit_config), vpt_config(num_prompt_tokens=10, prompt_dropout=0.0))
        size = vit_config.image_size
        x = torch.randn(config.batch, 3, size, size)
        head, logits = "classifier", lambda m, x: m(x).logits
    y = torch.randint(0, NUM_CLASSES, (config.batch,))
    return _Built(model.to(device).train(), x.to(device), y.to(device), head, logits)


class _Runner:
    """One way to take a training step on a private copy of the model."""

    def __init__(self, name: str, built: _Built, *, seed: int):
        self.name = name
        method, store = _split(name)
        self.model = copy.deepcopy(built.model)
        self.x, self.y, self.logits = built.x, built.y, built.logits
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.handle = None
        self._mezo_seeds: torch.Generator | None = None
        if method == "torchzero-fg":
            tz = _torchzero()
            self.optimizer = tz.Optimizer(self.params, tz.m.ForwardGradient(seed=seed), tz.m.Adam(), tz.m.LR(LR))
            self.step = self._torchzero_step
            return
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        if method == "mezo":
            self._mezo_seeds = torch.Generator(device=built.x.device)
            self._mezo_seeds.manual_seed(seed)
            self.step = self._mezo_step
            return
        if method != "backprop":
            head = getattr(self.model, built.head) if built.head else None
            self.handle = attach(self.model, method, seed=seed, store=store, head=head)
        self.step = self._plain_step

    def _loss(self) -> Tensor:
        return F.cross_entropy(self.logits(self.model, self.x), self.y)

    def _plain_step(self) -> None:
        self.optimizer.zero_grad()
        self._loss().backward()
        self.optimizer.step()

    def _mezo_step(self) -> None:
        self.optimizer.zero_grad()
        seed = int(torch.randint(0, 2**62, (1,), generator=self._mezo_seeds, device=self._mezo_seeds.device))
        mezo_step(self.params, self._loss, seed=seed)
        self.optimizer.step()

    def _torchzero_step(self) -> None:
        def closure(backward: bool = True) -> Tensor:
            with sdpa_kernel([SDPBackend.MATH]):  # no forward-AD formula for fused attention kernels
                loss = self._loss()
            if backward:
                self.optimizer.zero_grad()
                loss.backward()
            return loss

        self.optimizer.step(closure)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the resident training state: ``weights_bytes`` (parameters and buffers), ``grad_bytes`` and
        ``optimizer_bytes`` (tensors of the optimizer state that are not parameters)."""

        def tensors(x: Any) -> list[Tensor]:
            if isinstance(x, Tensor):
                return [x]
            if isinstance(x, dict):
                return [t for v in x.values() for t in tensors(v)]
            if isinstance(x, (list, tuple)):
                return [t for v in x for t in tensors(v)]
            return []

        def nbytes(ts: list[Tensor], exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
            storages = {k: v for k, v in storages.items() if k and k not in exclude}
            return sum(storages.values()), set(storages)

        weights, seen = nbytes([*self.model.parameters(), *self.model.buffers()])
        grads, seen2 = nbytes([p.grad for p in self.params if p.grad is not None], seen)
        opt, _ = nbytes(tensors(self.optimizer.state_dict()), seen | seen2)
        return {"weights_bytes": weights, "grad_bytes": grads, "optimizer_bytes": opt}


def _torchzero() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchzero
    except ImportError as err:
        raise Unavailable(f"torchzero is not installed (pip install torchzero; benchmark only): {err}") from err
    return torchzero


@torch.no_grad()
def mezo_step(params: Sequence[Tensor], loss_fn: Callable[[], Tensor], *, seed: int, eps: float = 1e-3) -> float:
    """One MeZO-style SPSA estimate (Malladi et al. 2023), written into ``p.grad``.

    Two forwards at ``θ + εz`` and ``θ - εz``, ``z ~ N(0, I)`` never stored: each pass regenerates it from a private
    generator seeded with ``seed`` (one parameter at a time, so the extra memory is one parameter's ``z``). The
    parameters are perturbed in place and restored by the opposite perturbation, as MeZO does; restoring by
    subtraction is exact only up to rounding (a few ulps in float32; tested), and in float16/bfloat16 it drifts by
    whole ulps of the low precision, so other dtypes are refused. The global RNG state is replayed for the second
    forward, so dropout draws the same masks in both. Then ``p.grad = g z`` with
    ``g = (L(θ + εz) - L(θ - εz)) / 2ε``, for any optimizer to step on.

    Args:
        params: the trainable parameters (float32 or float64), in a fixed order.
        loss_fn: computes the scalar loss of the batch at the current parameters.
        seed: seed of ``z`` (draw a new one per step).
        eps: perturbation scale ``ε``. (default: 1e-3)

    Returns:
        The projected gradient ``g``.

    Raises:
        ValueError: a parameter is not float32/float64, or ``eps`` is not a positive finite float.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps: {eps!r}; expected a positive finite float")
    for p in params:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"mezo_step supports float32/float64 parameters only, got {p.dtype}: restoring θ by subtracting εz "
                "is inexact in low precision"
            )
    if not params:
        return 0.0

    def z_of(p: Tensor, gen: torch.Generator) -> Tensor:
        return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)

    def perturb(scale: float) -> None:
        gen = torch.Generator(device=params[0].device).manual_seed(seed)
        for p in params:
            p.add_(z_of(p, gen), alpha=scale * eps)

    device = params[0].device
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def loss_at(scale: float) -> float:
        perturb(scale)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        return float(loss_fn())

    plus = loss_at(1.0)
    minus = loss_at(-2.0)
    g = (plus - minus) / (2 * eps)
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in params:  # restore θ and write the estimate from the same z
        z = z_of(p, gen)
        p.add_(z, alpha=eps)
        p.grad = z.mul_(g)
    return g


# ------------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(xs, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def time_case(
    case: Case, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2, rounds: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Time every runner of ``case`` against backprop, interleaved in rounds (module docstring, "Time").

    Args:
        case: the configuration and its runners.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of the model, the batch and the guesses. (default: 0)
        warmup: untimed steps of every runner first. (default: 2)
        rounds: overrides ``case.rounds``. (default: ``None``)
        log: receives one line per runner. (default: silent)

    Returns:
        ``(rows, skipped)``: one row per runner (backprop first), with ``time_s`` (median seconds per step),
        ``ratio``, ``ratio_q1``, ``ratio_q3``, ``ratio_iqr`` (per-round ratios to backprop), ``floor`` and
        ``of_floor``; and one ``{"config", "runner", "reason"}`` per runner that could not run.
    """
    device = torch.device(device)
    label = case.config.label
    if not case.runners:
        return [], []
    built = _build(case.config, device, seed)
    runners: dict[str, _Runner] = {}
    skipped = []
    for name in ("backprop", *case.runners):
        try:
            runner = _Runner(name, built, seed=seed)
            for _ in range(warmup):
                runner.step()
            runners[name] = runner
        except Unavailable as e:
            skipped.append({"config": label, "runner": name, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 — one broken runner must not lose a 15-minute run
            skipped.append({"config": label, "runner": name, "reason": f"error: {type(e).__name__}: {e}"})
    if "backprop" not in runners:
        return [], skipped
    base = runners["backprop"]
    others = [n for n in runners if n != "backprop"]
    times: dict[str, list[float]] = {n: [] for n in runners}
    ratios: dict[str, list[float]] = {n: [] for n in others}
    total = rounds if rounds is not None else case.rounds
    start = time.perf_counter()
    for r in range(max(total, 1)):
        if r >= 3 and rounds is None and time.perf_counter() - start > case.budget_s:
            break
        gc.collect()
        shift = r % max(len(others), 1)
        for name in others[shift:] + others[:shift]:
            pair = (base, runners[name]) if r % 2 == 0 else (runners[name], base)
            t = {p.name: _timed(p.step, device) for p in pair}
            times["backprop"].append(t["backprop"])
            times[name].append(t[name])
            ratios[name].append(t[name] / t["backprop"])
    rows = []
    for name in runners:
        q1, med, q3 = _quartiles(ratios[name]) if name != "backprop" else (1.0, 1.0, 1.0)
        method, store = _split(name)
        floor = floor_ratio(name, frozen=case.config.model.startswith("vpt-"))
        rows.append({
            "config": label, **asdict(case.config), "runner": name, "method": method, "store": store,
            "rounds": len(times[name]), "time_s": _quartiles(times[name])[1], "ratio": med, "ratio_q1": q1,
            "ratio_q3": q3, "ratio_iqr": q3 - q1, "floor": floor, "of_floor": med / floor,
        })
        log(f"  {label:<24} {name:<22} {1e3 * rows[-1]['time_s']:9.1f} ms  x{med:5.2f} [IQR {q3 - q1:.2f}]  "
            f"floor x{floor:.2f}")
    return rows, skipped


# ------------------------------------------------------------------------------------------------------- memory
def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") is not None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory_here(config: Config, runner: str, device: torch.device, seed: int, warmup: int) -> dict[str, Any]:
    """Build, warm up, then measure one step in this process (the subprocess worker on CPU; in-process on CUDA).

    The baseline is taken after ``optimizer.zero_grad()`` (gradients freed): weights, buffers, optimizer state and
    the batch. The step's peak above it includes the gradients the step writes.
    """
    built = _build(config, device, seed)
    r = _Runner(runner, built, seed=seed)
    del built
    resettable = device.type == "cuda" or _reset_peak_rss()
    for _ in range(warmup if resettable else 0):
        r.step()
    r.optimizer.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        r.step()
        torch.cuda.synchronize(device)
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    elif resettable:
        _malloc_trim()
        _reset_peak_rss()
        base = _rss_kib("VmRSS") * 1024
        r.step()
        peak, how = _rss_kib("VmHWM") * 1024, "peak RSS (VmHWM) after warm-up"
    else:  # the first step of the process: it also allocates the optimizer state
        base = _maxrss_bytes()
        r.step()
        peak, how = _maxrss_bytes(), "ru_maxrss, first step"
    return {"step_bytes": max(0, peak - base), **r.state_bytes(), "how": how}


def measure_memory(
    config: Config, runner: str, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak memory of one training step above the resident training state (module docstring, "Memory").

    On CPU the step runs in a fresh ``python -m guess_optim.bench`` subprocess (same torch thread count); on CUDA in
    this process, from ``torch.cuda`` statistics.

    Args:
        config: the model and batch.
        runner: a runner name (``"backprop"``, ``"wt@recompute"``, ``"mezo"``...).
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of the model and batch. (default: 0)
        warmup: steps before the measured one. (default: 2)
        timeout_s: limit of the subprocess. (default: 600)

    Returns:
        ``{"step_bytes", "weights_bytes", "grad_bytes", "optimizer_bytes", "how"}``: the step's peak above weights,
        optimizer state and batch (it includes the gradients the step writes), and the resident state after it.

    Raises:
        Unavailable: the runner cannot run here.
        RuntimeError: the subprocess failed (its stderr is in the message).
    """
    device = torch.device(device)
    _split(runner)
    if device.type == "cuda":
        return _memory_here(config, runner, device, seed, warmup)
    spec = {"config": asdict(config), "runner": runner, "seed": seed, "warmup": warmup,
            "threads": torch.get_num_threads()}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "guess_optim.bench", "--memory-worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker for {config.label} {runner} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    out = json.loads(lines[-1])
    if "unavailable" in out:
        raise Unavailable(out["unavailable"])
    return out


def _memory_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    try:
        out = _memory_here(Config(**spec["config"]), spec["runner"], torch.device("cpu"), int(spec["seed"]),
                           int(spec["warmup"]))
    except Unavailable as e:
        out = {"unavailable": str(e)}
    print(json.dumps(out), flush=True)
    return 0


def _resident(row: dict[str, Any]) -> int:
    return row["weights_bytes"] + row["optimizer_bytes"]


def _total(row: dict[str, Any]) -> int:
    return _resident(row) + row["step_bytes"]


def memory_case(
    case: Case, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2, jobs: int = 3,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """:func:`measure_memory` of backprop and every memory runner of ``case``, with ratios to backprop.

    Args:
        case: the configuration and its memory runners.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of the model and batch. (default: 0)
        warmup: steps before the measured one. (default: 2)
        jobs: CPU measurement subprocesses run at once. (default: 3)
        log: receives one line per runner. (default: silent)

    Returns:
        ``(rows, skipped)``; a row has the fields of :func:`measure_memory`, ``ratio`` (step peak / backprop's) and
        ``total_ratio`` ((weights + optimizer state + step peak) / backprop's).
    """
    if not case.memory:
        return [], []
    label = case.config.label
    rows, skipped = [], []
    names = ("backprop", *case.memory)

    def one(name: str) -> dict[str, Any] | Exception:
        try:
            return measure_memory(case.config, name, device=device, seed=seed, warmup=warmup)
        except Exception as e:  # noqa: BLE001 — reported as skipped below
            return e

    # On CPU each measurement is its own process (the peak RSS of one process is not disturbed by another), so a
    # few run at once; on CUDA they share the device and run one by one.
    workers = jobs if torch.device(device).type == "cpu" else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        measured = list(pool.map(one, names))
    for name, m in zip(names, measured, strict=True):
        if isinstance(m, Unavailable):
            skipped.append({"config": label, "runner": name, "reason": f"memory: {m}"})
        elif isinstance(m, Exception):
            skipped.append({"config": label, "runner": name, "reason": f"memory error: {type(m).__name__}: {m}"})
        else:
            rows.append({"config": label, **asdict(case.config), "runner": name, **m})
    base = next((r for r in rows if r["runner"] == "backprop"), None)
    for r in rows:
        r["ratio"] = r["step_bytes"] / base["step_bytes"] if base and base["step_bytes"] > 0 else float("nan")
        total = _total(base) if base else 0
        r["total_ratio"] = _total(r) / total if total else float("nan")
        log(f"  {label:<24} {r['runner']:<22} step peak {r['step_bytes'] / 2**20:9.1f} MiB  x{r['ratio']:.3f}  "
            f"(grads {r['grad_bytes'] / 2**20:.1f} MiB, weights + optimizer {_resident(r) / 2**20:.1f} MiB)")
    return rows, skipped


# ------------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A goal of the issue, checked against the results (reported, never asserted).

    Attributes:
        name: what is promised.
        kind: ``"time"`` or ``"memory"`` (which rows), or ``"faster"`` (``runner``'s time ratio below ``other``'s).
        runner: the runner measured.
        threshold: the ratio to backprop that must not be exceeded (unused for ``"faster"``).
        configs: a regular expression on configuration labels.
        other: the runner to beat (``"faster"`` only).
    """

    name: str
    kind: str
    runner: str
    threshold: float
    configs: str
    other: str = ""


TARGETS: tuple[Target, ...] = (
    Target("activation-space step time <= 1.1x backprop (MLP 6x1024, batch 128)", "time", "activation", 1.1,
           r"mlp-d6-w1024-b128$"),
    Target("wt step time <= 1.4x backprop (MLP 6x1024, batch 128)", "time", "wt", 1.4, r"mlp-d6-w1024-b128$"),
    Target("recompute peak memory <= 0.5x backprop, depth-24 MLP (activation)", "memory", "activation@recompute", 0.5,
           r"mlp-d24-"),
    Target("recompute peak memory <= 0.5x backprop, depth-24 MLP (wt)", "memory", "wt@recompute", 0.5, r"mlp-d24-"),
    Target("recompute peak memory <= 0.3x backprop, ViT-B/16 prompt tuning (activation)", "memory",
           "activation@recompute", 0.3, r"vpt-vit-b16-"),
    Target("recompute peak memory <= 0.3x backprop, ViT-B/16 prompt tuning (wt)", "memory", "wt@recompute", 0.3,
           r"vpt-vit-b16-"),
    Target("directional faster than torchzero ForwardGradient", "faster", "directional", 0.0, r".", "torchzero-fg"),
)
"""The issue's targets."""


def evaluate_targets(results: dict[str, Any], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Check each target on every configuration it names that was measured.

    Returns:
        One row per (target, configuration): ``target``, ``config``, ``measured`` (the ratio; for ``"faster"``
        ``runner ratio / other ratio``), ``threshold`` and ``met`` (``None`` when not measured).
    """
    out = []
    for t in targets:
        rows = results.get("memory" if t.kind == "memory" else "time", [])
        by = {(r["config"], r["runner"]): r for r in rows}
        configs = sorted({c for c, n in by if n == t.runner and re.search(t.configs, c)})
        if t.kind == "faster":
            configs = [c for c in configs if (c, t.other) in by]
        if not configs:
            out.append({"target": t.name, "config": None, "measured": None, "threshold": t.threshold, "met": None})
        for c in configs:
            value = by[(c, t.runner)]["ratio"]
            if t.kind == "faster":
                value, threshold = value / by[(c, t.other)]["ratio"], 1.0
                met = value < 1.0
            else:
                threshold = t.threshold
                met = bool(value <= threshold) if math.isfinite(value) else None
            out.append({"target": t.name, "config": c, "measured": value, "threshold": threshold, "met": met})
    return out


# ------------------------------------------------------------------------------------------------------ running
def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, memory, GPU, platform and package versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    mem = None
    with contextlib.suppress(OSError, AttributeError, ValueError):
        with open("/proc/meminfo") as f:
            mem = int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    versions = {"guess_optim": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    for pkg in ("transformers", "torchzero", "matplotlib"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = None
    commit = None
    with contextlib.suppress(Exception):
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
            "platform": platform.platform(), "device": str(device), "gpu": None, "commit": commit,
            "versions": versions}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["versions"]["cuda"] = torch.version.cuda
    return info


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run(
    cases: Sequence[Case], *, device: str = "cpu", seed: int = 0, warmup: int = 2, rounds: int | None = None,
    memory: bool = True, log: Callable[[str], None] = lambda s: None, suite_name: str = "custom",
    checkpoint: Callable[[dict[str, Any]], None] | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Time and measure every case; the result is what ``--out`` writes as JSON.

    Args:
        cases: what to measure.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of models, batches and guesses. (default: 0)
        warmup: untimed steps per runner before timing. (default: 2)
        rounds: overrides every case's rounds. (default: ``None``)
        memory: also measure peak memory. (default: ``True``)
        log: receives progress lines. (default: silent)
        suite_name: recorded in the results. (default: ``"custom"``)
        checkpoint: called with the results so far (``"partial": True``) after every case, so an interrupted run
            leaves what it measured. (default: ``None``)
        command: the command line recorded in the results. (default: this process's arguments)

    Returns:
        ``{"schema", "suite", "command", "started", "seconds", "machine", "load", "time", "memory", "targets",
        "skipped"}``; ``load`` holds the 1/5/15-minute load averages at the start, before each case and at the end.
    """
    started = time.time()
    results: dict[str, Any] = {
        "schema": SCHEMA, "suite": suite_name,
        "command": command or " ".join(["python -m guess_optim.bench", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)), "seconds": 0.0,
        "partial": True, "machine": machine_info(device), "load": {"start": _load(), "samples": [], "end": []},
        "time": [], "memory": [], "skipped": [], "targets": [],
    }
    load = results["load"]

    def finish() -> None:
        load["end"] = _load()
        ones = [s[0] for s in [load["start"], *load["samples"], load["end"]] if s]
        load["max_1min"] = max(ones) if ones else None
        load["mean_1min"] = round(float(np.mean(ones)), 2) if ones else None
        results["seconds"] = round(time.time() - started, 1)
        results["targets"] = evaluate_targets(results)

    for case in cases:
        load["samples"].append(_load())
        log(f"{case.config.label}  (load {load['samples'][-1]})")
        w = warmup if case.warmup is None else case.warmup
        rows, skip = time_case(case, device=device, seed=seed, warmup=w, rounds=rounds, log=log)
        results["time"] += rows
        results["skipped"] += skip
        gc.collect()  # a GuessHandle and its model form a reference cycle: free the runners' models now
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if memory:
            rows, skip = memory_case(case, device=device, seed=seed, warmup=max(w, 1), log=log)
            results["memory"] += rows
            results["skipped"] += skip
        if checkpoint is not None:
            finish()
            checkpoint(results)
    finish()
    results["partial"] = False
    return results


# ------------------------------------------------------------------------------------------------------ reports
def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def to_markdown(results: dict[str, Any], *, plot_paths: Sequence[str] = ()) -> str:
    """The Markdown report of :func:`run`'s results: machine, load, versions, targets, time and memory tables."""
    m, load = results["machine"], results["load"]
    v = m["versions"]
    lines = [
        "# Benchmarks: guessed steps against backprop",
        "",
        *(["**Partial results: the run was interrupted or is still going.**", ""] if results.get("partial") else []),
        f"Written by `{results['command']}` on {results['started']} ({results['seconds']:.0f} s). Every number is a "
        "ratio to a backprop step of the same model, batch and optimizer measured side by side in the same process; "
        "see `benchmarks/README.md` for what is measured and how.",
        "",
        *([f"Suite `{results['suite']}`: {SUITE_NOTES[results['suite']]}", ""]
          if results.get("suite") in SUITE_NOTES else []),
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}"
        + (f", memory {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""),
        f"- device: {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- load average (1/5/15 min): start {load['start']}, end {load['end']}; 1-min mean over the cases "
        f"{_fmt(load.get('mean_1min'))}, max {_fmt(load.get('max_1min'))}",
        f"- platform: {m['platform']}; commit {m.get('commit') or '–'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        "## Targets",
        "",
        "Reported, not asserted. Time targets compare median per-round step-time ratios; memory targets compare the "
        "step peak above the resident training state.",
        "",
        "| target | configuration | measured | threshold | met |",
        "|---|---|---:|---:|:---:|",
    ]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['config'] or '–'} | {_fmt(t['measured'], '.3f')} | "
                     f"{_fmt(t['threshold'])} | {met} |")
    lines += [
        "",
        "## Time per training step",
        "",
        "`× backprop`: median over rounds of (runner step time / the adjacent backprop step time); IQR: the "
        "interquartile range of those ratios. `floor`: the matrix-product floor as a fraction of backprop "
        "(3 products per layer for backprop; see `benchmarks/README.md`); `× floor`: measured / floor.",
        "",
        "| configuration | runner | ms/step | × backprop | IQR | floor | × floor | timed steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["time"]:
        lines.append(f"| {r['config']} | {r['runner']} | {_fmt(1e3 * r['time_s'], '.1f')} | {_fmt(r['ratio'])} | "
                     f"{_fmt(r['ratio_iqr'])} | {_fmt(r['floor'])} | {_fmt(r['of_floor'])} | {r['rounds']} |")
    if results["memory"]:
        how = sorted({r["how"] for r in results["memory"]})
        lines += [
            "",
            "## Peak memory of a training step",
            "",
            f"`step peak`: peak memory during one training step above the memory before it, when weights, "
            f"optimizer state and the batch exist and the gradients do not ({', '.join(how)}): gradients, "
            "activations, guesses and temporaries. `grads`: the gradients it leaves. `weights + opt`: parameters, "
            "buffers and optimizer state. `total × backprop`: (weights + opt + step peak) / backprop's.",
            "",
            "| configuration | runner | step peak (MiB) | × backprop | grads (MiB) | weights + opt (MiB) "
            "| total × backprop |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["memory"]:
            lines.append(f"| {r['config']} | {r['runner']} | {_fmt(r['step_bytes'] / 2**20, '.1f')} | "
                         f"{_fmt(r['ratio'], '.3f')} | {_fmt(r['grad_bytes'] / 2**20, '.1f')} | "
                         f"{_fmt(_resident(r) / 2**20, '.1f')} | {_fmt(r['total_ratio'], '.3f')} |")
    if results["skipped"]:
        lines += ["", "## Skipped", "", "| configuration | runner | reason |", "|---|---|---|"]
        for s in results["skipped"]:
            lines.append(f"| {s['config']} | {s['runner']} | {s['reason'].replace('|', '/')} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    if plot_paths:
        lines += ["", "## Cost against depth, width and batch", ""]
        lines += [f"![cost against depth, width and batch]({p})" for p in plot_paths]
    return "\n".join(lines) + "\n"


def _axes(rows: Sequence[dict[str, Any]], key: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The MLP rows along ``key`` (depth, width or batch) through the fixed values with the most points."""
    others = [k for k in ("depth", "width", "batch") if k != key]
    groups: dict[tuple, set] = {}
    for r in rows:
        if r["model"] == "mlp":
            groups.setdefault(tuple(r[k] for k in others), set()).add(r[key])
    if not groups:
        return {}, []
    fixed = max(groups, key=lambda g: (len(groups[g]), g))
    return dict(zip(others, fixed, strict=True)), [
        r for r in rows if r["model"] == "mlp" and tuple(r[k] for k in others) == fixed]


def plot(results: dict[str, Any], directory: str) -> list[str]:
    """Plot time ratios (top) and memory ratios (bottom) against MLP depth, width and batch.

    Returns:
        The written file paths (none when matplotlib is missing or there is nothing to plot).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, grid = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
    every = sorted({r["runner"] for kind in ("time", "memory") for r in results[kind] if r["runner"] != "backprop"})
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(every)}
    drawn = False
    for row, (kind, ylabel) in enumerate((("time", "step time / backprop's"),
                                         ("memory", "step peak memory / backprop's"))):
        for col, key in enumerate(("depth", "width", "batch")):
            ax = grid[row][col]
            fixed, rows = _axes(results[kind], key)
            names = sorted({r["runner"] for r in rows if r["runner"] != "backprop"})
            for name in names:
                pts = sorted((r[key], r) for r in rows if r["runner"] == name and math.isfinite(r["ratio"]))
                if len(pts) < 2:
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1]["ratio"] for p in pts]
                if kind == "time":
                    err = [[y - p[1]["ratio_q1"] for y, p in zip(ys, pts, strict=True)],
                           [p[1]["ratio_q3"] - y for y, p in zip(ys, pts, strict=True)]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, color=colors[name])
                else:
                    ax.plot(xs, ys, marker="o", label=name, color=colors[name])
                drawn = True
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.15))
            ax.set_xscale("log", base=2)
            ticks = sorted({r[key] for r in rows})
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
            ax.set_xlabel(key + ("  (" + ", ".join(f"{k} {v}" for k, v in fixed.items()) + ")" if fixed else ""))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return []
    machine = results["machine"]
    where = machine["gpu"] if machine.get("gpu") else machine["cpu"]
    fig.suptitle(f"guess_optim vs backprop, MLP, {machine['device']} ({where})")
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "cost_vs_size.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------- profiling
def profile_step(
    runner: str, config: Config, *, device: str | torch.device = "cpu", steps: int = 5, top: int = 25, seed: int = 0,
) -> str:
    """PyTorch-profiler and cProfile reports of ``steps`` training steps of ``runner`` (after 3 warm-up steps).

    Returns:
        Text: the operators sorted by self CPU time, then the Python functions sorted by own time.
    """
    device = torch.device(device)
    r = _Runner(runner, _build(config, device, seed), seed=seed)
    for _ in range(3):
        r.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            r.step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = [f"== {runner} on {config.label}: torch.profiler, {steps} steps ==",
            prof.key_averages().table(sort_by=sort, row_limit=top)]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        r.step()
    _sync(device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    text += [f"== {runner} on {config.label}: cProfile, {steps} steps, by own time ==", s.getvalue()]
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------------------- CLI
def _from_json(x: Any) -> Any:
    """Undo :func:`~guess_optim._io.json_safe` for ratios (``None`` → NaN), so reports can be re-rendered from a JSON
    file."""
    for kind in ("time", "memory"):
        for r in x.get(kind, []):
            for k in ("ratio", "total_ratio", "of_floor", "ratio_q1", "ratio_q3", "ratio_iqr"):
                if k in r and r[k] is None:
                    r[k] = float("nan")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``guess-optim bench`` / ``python -m guess_optim.bench``."""
    p = argparse.ArgumentParser(
        prog="guess-optim bench",
        description="Speed and peak memory of guessed training steps as ratios to a backprop step of the same model, "
                    "measured side by side in one process.",
    )
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: tiny sizes, seconds; full: the issue's grid (~15 min on 2 CPU cores) "
                        "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--config", action="append", default=None, metavar="LABEL",
                   help="only these configurations of the suite, or new ones (mlp-d6-w1024-b128, convnet-b128, "
                        "vpt-vit-b16-b8); repeatable")
    p.add_argument("--runners", default=None,
                   help="comma-separated runners for --config labels not in the suite, and a filter on the suite's "
                        f"runners otherwise: methods ({', '.join(m for m in METHODS if m != 'backprop')}), "
                        "METHOD@recompute, mezo, torchzero-fg")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: each case's own)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per runner first (default: %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="model, batch and guess seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--markdown", default=None, help="write the Markdown report (e.g. BENCHMARKS.md)")
    p.add_argument("--plot-dir", default=None, help="write cost_vs_size.png here (e.g. docs/bench)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="render --markdown/--plot-dir from an earlier --out file instead of measuring")
    p.add_argument("--profile", default=None, metavar="RUNNERS",
                   help="print torch.profiler and cProfile reports of these runners (comma-separated) on the first "
                        "--config (default: mlp-d6-w1024-b128) instead of benchmarking")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p


def _select(args: argparse.Namespace) -> list[Case]:
    cases = suite(args.suite, torch.device(args.device).type)
    wanted = [r.strip() for r in args.runners.split(",") if r.strip()] if args.runners else None
    for r in wanted or []:
        _split(r)
    if args.config:
        known = {c.config.label: c for c in cases}
        picked = []
        for label in args.config:
            config = Config.parse(label)
            picked.append(known.get(config.label) or Case(config, tuple(wanted or CORE), tuple(wanted or CORE)))
        cases = picked
    if wanted:
        cases = [Case(c.config, tuple(r for r in c.runners if r in wanted), tuple(r for r in c.memory if r in wanted),
                      c.rounds, c.budget_s, c.warmup) for c in cases]
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """``guess-optim bench``: run a suite, print progress, write JSON / Markdown / the plot.

    Returns:
        The exit code: 0, or 2 for bad arguments.
    """
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        return _memory_worker(args.memory_worker)
    if args.threads is not None:
        if args.threads < 1:
            print(f"Invalid --threads: {args.threads}; expected an int >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here")
        if args.from_json:
            with open(args.from_json) as f:
                results = _from_json(json.load(f))
        elif args.profile:
            configs = [Config.parse(c) for c in (args.config or ["mlp-d6-w1024-b128"])]
            for name in args.profile.split(","):
                _split(name.strip())
                print(profile_step(name.strip(), configs[0], device=device, seed=args.seed), flush=True)
            return 0
        else:
            cases = _select(args)
            results = run(cases, device=str(device), seed=args.seed, warmup=args.warmup, rounds=args.rounds,
                          memory=not args.no_memory, log=log, suite_name=args.suite,
                          checkpoint=lambda r: _save(r, args, plots=False),
                          command=" ".join(["python -m guess_optim.bench",
                                            *(sys.argv[1:] if argv is None else argv)]))
    except (ValueError, OSError) as e:
        print(f"guess-optim bench: {e}", file=sys.stderr)
        return 2
    for s in results["skipped"]:
        log(f"skipped {s['config']} {s['runner']}: {s['reason']}")
    for t in results["targets"]:
        log(f"target: {t['target']} [{t['config']}] measured {_fmt(t['measured'], '.3f')} -> "
            f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[t['met']] }")
    _save(results, args, plots=True)
    return 0


def _save(results: dict[str, Any], args: argparse.Namespace, *, plots: bool) -> None:
    """Write ``--out``, ``--plot-dir`` and ``--markdown`` (after every case, and once more at the end)."""
    if args.out and not args.from_json:
        write_json(args.out, results)
    paths = plot(results, args.plot_dir) if args.plot_dir and plots else []
    if args.markdown:
        base = os.path.dirname(os.path.abspath(args.markdown))
        write_text(args.markdown, to_markdown(results, plot_paths=[os.path.relpath(p, base) for p in paths]))


if __name__ == "__main__":
    sys.exit(main())
