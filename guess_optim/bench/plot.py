"""The plot of a run: time and memory ratios to backprop against MLP depth, width and batch (needs matplotlib)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .. import METHODS
from .floors import DEFAULT_STORE, backprop_runner, parse_runner

__all__ = ["plot"]


def _axes(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[dict[str, int], list[Mapping[str, Any]]]:
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


def _style(runners: Sequence[str], cmap: Any) -> dict[str, dict[str, Any]]:
    """Colour, line style and legend label per runner: the estimator's ``color`` and ``plot_label()`` where the
    registry has them (a non-default store dashed, its suffix in the label), a colour map otherwise."""
    out = {}
    for i, name in enumerate(runners):
        try:
            parsed = parse_runner(name)
        except ValueError:  # a runner of an estimator not registered in this process (a report re-rendered)
            parsed = None
        cls = METHODS.get(parsed.method) if parsed and parsed.peer is None else None
        suffix = f" @{parsed.store}" if parsed and parsed.store != DEFAULT_STORE else ""
        out[name] = {"color": (cls.color if cls and cls.color else cmap(i % 20)),
                     "ls": "--" if suffix else "-", "label": (cls.plot_label() if cls else name.split("@")[0]) + suffix}
    return out


def plot(results: Mapping[str, Any], directory: str) -> list[str]:
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
    base = backprop_runner()
    every = sorted({r["runner"] for kind in ("time", "memory") for r in results[kind] if r["runner"] != base})
    style = _style(every, plt.get_cmap("tab20"))
    drawn = False
    for row, (kind, ylabel) in enumerate((("time", "step time / backprop's"),
                                         ("memory", "step peak memory / backprop's"))):
        for col, key in enumerate(("depth", "width", "batch")):
            ax = grid[row][col]
            fixed, rows = _axes(results[kind], key)
            for name in sorted({r["runner"] for r in rows if r["runner"] != base}):
                pts = sorted((r[key], r) for r in rows if r["runner"] == name and math.isfinite(r["ratio"]))
                if len(pts) < 2:
                    continue
                xs, ys = [p[0] for p in pts], [p[1]["ratio"] for p in pts]
                err = None
                if kind == "time":
                    err = [[y - p[1]["ratio_q1"] for y, p in zip(ys, pts, strict=True)],
                           [p[1]["ratio_q3"] - y for y, p in zip(ys, pts, strict=True)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, **style[name])
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
    fig.suptitle(f"guess_optim vs backprop, MLP, {machine['device']} ({machine.get('gpu') or machine['cpu']})")
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "cost_vs_size.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
