"""Reports of a run: the console table of each case, the target lines, and the Markdown report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .floors import backprop_runner
from .memory import resident_bytes
from .suite import SUITE_NOTES

__all__ = ["FLOOR_NOTE", "console_table", "target_lines", "to_markdown"]

FLOOR_NOTE = ("floor: the matrix-product floor of a step as a fraction of a backprop step (backprop: 3 layer-sized "
              "products per layer); a ratio near its floor means little overhead beyond the matrix products.")
"""The one line printed before the console tables."""

_MIB = 2**20
_MET = {True: "met", False: "NOT met", None: "not measured"}


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def console_table(label: str, time_rows: Sequence[Mapping[str, Any]],
                  memory_rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """One case as a fixed-width table: runner, median ms per step, time ratio to backprop and its IQR, floor, step
    peak (MiB) and its ratio to backprop. A runner measured for one of time and memory shows ``–`` for the other.

    Args:
        label: the configuration label (the title line).
        time_rows: rows of :func:`~guess_optim.bench.timing.time_case`.
        memory_rows: rows of :func:`~guess_optim.bench.memory.memory_case`. (default: none)

    Returns:
        The table, title line first, without a trailing newline.
    """
    times = {r["runner"]: r for r in time_rows}
    peaks = {r["runner"]: r for r in memory_rows}
    rounds = sorted({r["rounds"] for n, r in times.items() if n != backprop_runner()})
    title = label + (f" ({rounds[-1]} rounds)" if len(rounds) == 1 else
                     f" ({rounds[0]}-{rounds[-1]} rounds)" if rounds else "")
    names = list(dict.fromkeys([*times, *peaks]))
    width = max(len(n) for n in [*names, "runner"]) + 2
    head = ("runner", "ms/step", "time x bp", "IQR", "floor", "peak MiB", "peak x bp")
    lines = [title, "  " + f"{head[0]:<{width}}" + "".join(f"{h:>10}" for h in head[1:])]
    for name in names:
        t, m = times.get(name, {}), peaks.get(name, {})
        cells = (_fmt(1e3 * t["time_s"], ".1f") if t else "–", _fmt(t.get("ratio")), _fmt(t.get("ratio_iqr")),
                 _fmt(t.get("floor")), _fmt(m["step_bytes"] / _MIB, ".1f") if m else "–", _fmt(m.get("ratio")))
        lines.append("  " + f"{name:<{width}}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def target_lines(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per measured target row (targets measured nowhere are left out)."""
    return [f"target {_MET[t['met']]}: {t['target']} [{t['config']}]: {_fmt(t['measured'], '.3f')} "
            f"(at most {_fmt(t['threshold'])})" for t in targets if t["config"] is not None]


def _header(results: Mapping[str, Any]) -> list[str]:
    m, load = results["machine"], results["load"]
    return [
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
        "- versions: " + ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val),
    ]


def _targets(results: Mapping[str, Any]) -> list[str]:
    measured = [t for t in results["targets"] if t["config"] is not None]
    missing = list(dict.fromkeys(t["target"] for t in results["targets"] if t["config"] is None))
    lines = [
        "", "## Targets", "",
        "Reported, not asserted. Time targets compare median per-round step-time ratios; memory targets compare the "
        "step peak above the resident training state.",
    ]
    if measured:
        lines += ["", "| target | configuration | before | measured | threshold | met |",
                  "|---|---|---:|---:|---:|:---:|"]
        lines += [f"| {t['target']} | {t['config']} | {t.get('before') or '–'} | {_fmt(t['measured'], '.3f')} | "
                  f"{_fmt(t['threshold'])} | {'yes' if t['met'] else '**no**' if t['met'] is False else '–'} |"
                  for t in measured]
        lines += ["", "`before`: the ratio measured when the target was set (one thread, this machine), before the "
                  "work on it."]
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    return lines


def _time(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "", "## Time per training step", "",
        "`× backprop`: median over rounds of (runner step time / the adjacent backprop step time); IQR: the "
        "interquartile range of those ratios. `floor`: the matrix-product floor as a fraction of backprop "
        "(3 products per layer for backprop; see `benchmarks/README.md`); `× floor`: measured / floor.",
        "",
        "| configuration | runner | ms/step | × backprop | IQR | floor | × floor | timed steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['config']} | {r['runner']} | {_fmt(1e3 * r['time_s'], '.1f')} | {_fmt(r['ratio'])} | "
              f"{_fmt(r['ratio_iqr'])} | {_fmt(r['floor'])} | {_fmt(r['of_floor'])} | {r['rounds']} |" for r in rows]
    return lines


def _memory(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    how = sorted({r["how"] for r in rows})
    lines = [
        "", "## Peak memory of a training step", "",
        f"`step peak`: peak memory during one training step above the memory before it, when weights, optimizer "
        f"state and the batch exist and the gradients do not ({', '.join(how)}): gradients, activations, guesses and "
        "temporaries. `grads`: the gradients it leaves. `weights + opt`: parameters, buffers and optimizer state. "
        "`total × backprop`: (weights + opt + step peak) / backprop's.",
        "",
        "| configuration | runner | step peak (MiB) | × backprop | grads (MiB) | weights + opt (MiB) "
        "| total × backprop |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['config']} | {r['runner']} | {_fmt(r['step_bytes'] / _MIB, '.1f')} | {_fmt(r['ratio'], '.3f')} "
              f"| {_fmt(r['grad_bytes'] / _MIB, '.1f')} | {_fmt(resident_bytes(r) / _MIB, '.1f')} | "
              f"{_fmt(r['total_ratio'], '.3f')} |" for r in rows]
    return lines


def to_markdown(results: Mapping[str, Any], *, plot_paths: Sequence[str] = ()) -> str:
    """The Markdown report of :func:`~guess_optim.bench.session.run`'s results: machine, load, versions, targets,
    time and memory tables, skipped runners, notes and the plot."""
    lines = [*_header(results), *_targets(results), *_time(results["time"]), *_memory(results["memory"])]
    if results["skipped"]:
        lines += ["", "## Skipped", "", "| configuration | runner | reason |", "|---|---|---|"]
        lines += [f"| {s['config']} | {s['runner']} | {s['reason'].replace('|', '/')} |" for s in results["skipped"]]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    if plot_paths:
        lines += ["", "## Cost against depth, width and batch", ""]
        lines += [f"![cost against depth, width and batch]({p})" for p in plot_paths]
    return "\n".join(lines) + "\n"
