"""Interleaved timing: every runner beside a backprop step, in rounds, and profiles of one configuration.

After warm-up, every runner is timed in rounds, each time right next to a backprop step (``B M`` in even rounds,
``M B`` in odd ones; the order of the runners rotates from round to round), so load drift hits both sides of every
ratio. A runner's *ratio* is the median over rounds of ``t_runner / t_backprop`` in that round; its spread is the
interquartile range (IQR) of those per-round ratios. A step is timed with ``time.perf_counter`` around it; on CUDA
between two ``torch.cuda.synchronize`` calls, so the time is the whole step (kernel launches and Python included),
not only the device's share.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .floors import backprop_runner, floor_ratio, parse_runner
from .peers import Unavailable
from .runners import Built, Runner, build
from .suite import Case, Config

__all__ = ["profile_step", "sync", "time_case", "timed"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``step``, the device's queued work included."""
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(xs, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def _start(names: Sequence[str], built: Built, *, label: str, seed: int,
           warmup: int) -> tuple[dict[str, Runner], list[dict[str, str]]]:
    """The runners that start and survive ``warmup`` steps, and a skip record for each one that does not."""
    runners: dict[str, Runner] = {}
    skipped = []
    for name in names:
        try:
            runner = Runner(name, built, seed=seed)
            for _ in range(warmup):
                runner.step()
            runners[name] = runner
        except Unavailable as e:
            skipped.append({"config": label, "runner": name, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 — one broken runner must not lose a 15-minute run
            skipped.append({"config": label, "runner": name, "reason": f"error: {type(e).__name__}: {e}"})
    return runners, skipped


def _rounds(runners: dict[str, Runner], base: str, *, device: torch.device, rounds: int,
            budget_s: float | None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round step times of every runner and per-round ratios to the adjacent backprop step (module docstring).

    ``budget_s``: stop adding rounds after 3 once this many seconds went by (``None``: run every round).
    """
    others = [n for n in runners if n != base]
    times: dict[str, list[float]] = {n: [] for n in runners}
    ratios: dict[str, list[float]] = {n: [] for n in others}
    start = time.perf_counter()
    for r in range(rounds):
        if r >= 3 and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        gc.collect()
        shift = r % max(len(others), 1)
        for name in others[shift:] + others[:shift]:
            pair = (runners[base], runners[name]) if r % 2 == 0 else (runners[name], runners[base])
            t = {p.name: timed(p.step, device) for p in pair}
            times[base].append(t[base])
            times[name].append(t[name])
            ratios[name].append(t[name] / t[base])
    return times, ratios


def time_case(
    case: Case, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2, rounds: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Time every runner of ``case`` against backprop, interleaved in rounds (module docstring).

    Args:
        case: the configuration and its runners.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of the model, the batch and the guesses. (default: 0)
        warmup: untimed steps of every runner first. (default: 2)
        rounds: overrides ``case.rounds`` (and its time budget). (default: ``None``)
        log: receives a progress line. (default: silent)

    Returns:
        ``(rows, skipped)``: one row per runner (backprop first), with ``time_s`` (median seconds per step),
        ``ratio``, ``ratio_q1``, ``ratio_q3``, ``ratio_iqr`` (per-round ratios to backprop), ``floor`` and
        ``of_floor``; and one ``{"config", "runner", "reason"}`` per runner that could not run.
    """
    device = torch.device(device)
    label = case.config.label
    if not case.runners:
        return [], []
    base = backprop_runner()
    built = build(case.config, device, seed)
    log(f"  timing {len(case.runners)} runners beside {base} on {label}")
    runners, skipped = _start((base, *case.runners), built, label=label, seed=seed, warmup=warmup)
    if base not in runners:
        return [], skipped
    times, ratios = _rounds(runners, base, device=device, rounds=max(rounds or case.rounds, 1),
                            budget_s=case.budget_s if rounds is None else None)
    rows = []
    for name in runners:
        q1, med, q3 = _quartiles(ratios[name]) if name != base else (1.0, 1.0, 1.0)
        parsed = parse_runner(name)
        floor = floor_ratio(name, frozen=case.config.frozen)
        rows.append({
            "config": label, **asdict(case.config), "runner": name, "method": parsed.method, "store": parsed.store,
            "rounds": len(times[name]), "time_s": _quartiles(times[name])[1], "ratio": med, "ratio_q1": q1,
            "ratio_q3": q3, "ratio_iqr": q3 - q1, "floor": floor, "of_floor": med / floor,
        })
    return rows, skipped


def profile_step(
    runner: str, config: Config, *, device: str | torch.device = "cpu", steps: int = 5, top: int = 25, seed: int = 0,
) -> str:
    """PyTorch-profiler and cProfile reports of ``steps`` training steps of ``runner`` (after 3 warm-up steps).

    Returns:
        Text: the operators sorted by self CPU (CUDA: self CUDA) time, then the Python functions sorted by own time.
    """
    device = torch.device(device)
    r = Runner(runner, build(config, device, seed), seed=seed)
    for _ in range(3):
        r.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            r.step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = [f"== {runner} on {config.label}: torch.profiler, {steps} steps ==",
            prof.key_averages().table(sort_by=sort, row_limit=top)]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        r.step()
    sync(device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    text += [f"== {runner} on {config.label}: cProfile, {steps} steps, by own time ==", s.getvalue()]
    return "\n".join(text)
