"""One benchmark run: the machine, the load, every case timed and measured, the targets, checkpoints."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from .. import __version__
from .memory import memory_case
from .report import FLOOR_NOTE, console_table
from .suite import Case
from .targets import evaluate_targets
from .timing import time_case

__all__ = ["SCHEMA", "machine_info", "run"]

SCHEMA = "guess_optim.bench/1"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, memory, GPU, platform, git commit and package versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1).strip() if m else cpu
    mem = None
    with contextlib.suppress(OSError, AttributeError, ValueError), open("/proc/meminfo") as f:
        mem = int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    versions: dict[str, str | None] = {"guess_optim": __version__, "torch": torch.__version__,
                                       "numpy": np.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "torchzero", "matplotlib"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
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


def _finish(results: dict[str, Any], started: float) -> None:
    """Fill in the end load, its summary, the duration and the targets (after every case, and at the end)."""
    load = results["load"]
    load["end"] = _load()
    ones = [s[0] for s in [load["start"], *load["samples"], load["end"]] if s]
    load["max_1min"] = max(ones) if ones else None
    load["mean_1min"] = round(float(np.mean(ones)), 2) if ones else None
    results["seconds"] = round(time.time() - started, 1)
    results["targets"] = evaluate_targets(results)


def run(
    cases: Sequence[Case], *, device: str = "cpu", seed: int = 0, warmup: int = 2, rounds: int | None = None,
    memory: bool = True, log: Callable[[str], None] = lambda s: None, suite_name: str = "custom",
    checkpoint: Callable[[dict[str, Any]], None] | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Time and measure every case, printing one table per case; the result is what ``--out`` writes as JSON.

    Args:
        cases: what to measure.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of models, batches and guesses. (default: 0)
        warmup: untimed steps per runner before timing, where a case sets none. (default: 2)
        rounds: overrides every case's rounds. (default: ``None``)
        memory: also measure peak memory. (default: ``True``)
        log: receives the floor note, then a title line and a table per case. (default: silent)
        suite_name: recorded in the results. (default: ``"custom"``)
        checkpoint: called with the results so far (``"partial": True``) after every case, so an interrupted run
            leaves what it measured. (default: ``None``)
        command: the command line recorded in the results. (default: this process's arguments)

    Returns:
        ``{"schema", "suite", "command", "started", "seconds", "partial", "machine", "load", "time", "memory",
        "skipped", "targets"}``; ``load`` holds the 1/5/15-minute load averages at the start, before each case and at
        the end.
    """
    started = time.time()
    results: dict[str, Any] = {
        "schema": SCHEMA, "suite": suite_name,
        "command": command or " ".join(["python -m guess_optim.bench", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)), "seconds": 0.0,
        "partial": True, "machine": machine_info(device), "load": {"start": _load(), "samples": [], "end": []},
        "time": [], "memory": [], "skipped": [], "targets": [],
    }
    log(FLOOR_NOTE)
    for i, case in enumerate(cases):
        results["load"]["samples"].append(_load())
        w = warmup if case.warmup is None else case.warmup
        log(f"\n[{i + 1}/{len(cases)}] {case.config.label}: timing {len(case.runners)} runner(s) beside backprop, "
            f"memory of {len(case.memory) if memory else 0}; load {results['load']['samples'][-1]}")
        time_rows, skipped = time_case(case, device=device, seed=seed, warmup=w, rounds=rounds)
        gc.collect()  # a GuessHandle and its model form a reference cycle: free the runners' models now
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        memory_rows: list[dict[str, Any]] = []
        if memory:
            memory_rows, skipped_memory = memory_case(case, device=device, seed=seed, warmup=max(w, 1))
            skipped += skipped_memory
        results["time"] += time_rows
        results["memory"] += memory_rows
        results["skipped"] += skipped
        log(console_table(case.config.label, time_rows, memory_rows))
        for s in skipped:
            log(f"  skipped {s['runner']}: {s['reason']}")
        if checkpoint is not None:
            _finish(results, started)
            checkpoint(results)
    _finish(results, started)
    results["partial"] = False
    return results
