"""Targets: ratios to backprop the project aims for, checked against the results (reported, never asserted).

Each target names one runner and one configuration (or, for ``"no-slower"``, every configuration where both runners
were timed) and is evaluated only where that was measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TARGETS", "Target", "evaluate_targets", "target_runners"]

Kind = Literal["time", "memory", "no-slower"]
KINDS = ("time", "memory", "no-slower")


@dataclass(frozen=True)
class Target:
    """A ratio to aim for.

    Attributes:
        name: what is aimed for, in words.
        kind: ``"time"`` (median step-time ratio to backprop), ``"memory"`` (step-peak ratio to backprop) or
            ``"no-slower"`` (``runner``'s time ratio over ``other``'s, at most 1).
        runner: the runner measured.
        threshold: the largest ratio that meets the target (``"no-slower"``: 1.0).
        config: the configuration label; ``None``: every configuration where the runner (and ``other``) was measured.
        other: the runner compared with (``"no-slower"`` only).
        before: the ratio measured before the work on this target (the issue that set it; on this project's 2-core
            CPU, one thread), as text: reported beside the measurement.
    """

    name: str
    kind: Kind
    runner: str
    threshold: float = 1.0
    config: str | None = None
    other: str = ""
    before: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r}; expected one of {KINDS}")
        if (self.kind == "no-slower") != bool(self.other):
            raise ValueError(f"Target {self.name!r}: `other` is required for kind 'no-slower' and only there")


_MLP_3X128, _MLP_6X1024, _MLP_24X1024, _VIT = ("mlp-d3-w128-b128", "mlp-d6-w1024-b128", "mlp-d24-w1024-b1024",
                                               "vpt-vit-b16-b8")
TARGETS: tuple[Target, ...] = (
    Target("activation step time <= 1.4x backprop (the paper's 3x128 MLP, batch 128)", "time", "activation", 1.4,
           _MLP_3X128, before="1.9-2.5"),
    Target("wt step time <= 1.7x backprop (the paper's 3x128 MLP, batch 128)", "time", "wt", 1.7, _MLP_3X128,
           before="1.9-2.5"),
    Target("activation step time <= 1.0x backprop (6x1024 MLP, batch 128)", "time", "activation", 1.0, _MLP_6X1024,
           before="1.07-1.13"),
    Target("wt step time <= 1.3x backprop (6x1024 MLP, batch 128)", "time", "wt", 1.3, _MLP_6X1024,
           before="1.36-1.41"),
    Target("wt step time <= 1.3x backprop (ViT-B/16 prompt tuning, batch 8)", "time", "wt", 1.3, _VIT, before="1.91"),
    Target("wt@recompute step time <= 1.8x backprop (ViT-B/16 prompt tuning, batch 8)", "time", "wt@recompute", 1.8,
           _VIT, before="3.19"),
    Target("wt step peak <= 0.5x backprop (ViT-B/16 prompt tuning, batch 8)", "memory", "wt", 0.5, _VIT,
           before="0.81"),
    Target("activation step peak <= 1.0x backprop, default store (24x1024 MLP, batch 1024)", "memory", "activation",
           1.0, _MLP_24X1024, before="2.00"),
    Target("wt step peak <= 1.0x backprop, default store (24x1024 MLP, batch 1024)", "memory", "wt", 1.0,
           _MLP_24X1024, before="2.09"),
    Target("wt@release step peak <= 0.35x backprop, stepping in backward (24x1024 MLP, batch 1024)", "memory",
           "wt@release", 0.35, _MLP_24X1024, before="0.70 (wt@recompute, no stepping in backward)"),
    Target("directional step time no slower than torchzero's forward gradient", "no-slower", "directional",
           other="torchzero-fg", before="ties on large MLPs, 1.3 on small ones"),
)
"""The targets reported with every run."""


def target_runners(label: str | None = None, kind: str | None = None,
                   targets: Sequence[Target] = TARGETS) -> tuple[str, ...]:
    """The runners the targets name (``runner``, then ``other``), in order, without repeats.

    Args:
        label: only targets evaluated on this configuration (those with ``config`` ``None`` included).
            (default: every target)
        kind: only ``"time"`` (time and no-slower targets) or ``"memory"`` targets. (default: both)
    """
    out: list[str] = []
    for t in targets:
        if label is not None and t.config not in (None, label):
            continue
        if kind is not None and (t.kind == "memory") != (kind == "memory"):
            continue
        out += [t.runner, *([t.other] if t.other else [])]
    return tuple(dict.fromkeys(out))


def evaluate_targets(results: dict[str, Any], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Check each target on every configuration where it was measured.

    Returns:
        One row per (target, configuration): ``target``, ``config``, ``measured`` (the ratio; for ``"no-slower"``
        ``runner ratio / other ratio``), ``threshold``, ``met`` and ``before``. A target measured nowhere gets one
        row with ``config``, ``measured`` and ``met`` ``None``.
    """
    out = []
    for t in targets:
        by = {(r["config"], r["runner"]): r for r in results.get("memory" if t.kind == "memory" else "time", [])}
        configs = sorted({c for c, n in by if n == t.runner and t.config in (None, c)})
        if t.kind == "no-slower":
            configs = [c for c in configs if (c, t.other) in by]
        if not configs:
            out.append({"target": t.name, "config": None, "measured": None, "threshold": t.threshold, "met": None,
                        "before": t.before})
        for c in configs:
            value = by[(c, t.runner)]["ratio"]
            if t.kind == "no-slower":
                value = value / by[(c, t.other)]["ratio"]
            met = bool(value <= t.threshold) if math.isfinite(value) else None
            out.append({"target": t.name, "config": c, "measured": value, "threshold": t.threshold, "met": met,
                        "before": t.before})
    return out
