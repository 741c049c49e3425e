"""Peak memory of one training step above the memory just before it.

The *step peak* is measured once the weights, the optimizer state and the batch exist (after warm-up steps) and
``zero_grad()`` has freed the gradients: it counts the gradients the step writes, the activations it keeps, guesses,
and every temporary (the optimizer's included).

* CPU: one fresh subprocess per configuration and runner (``python -m guess_optim.bench --memory-worker ...``), with
  :data:`MALLOC_ENV` so that freed tensors go back to the OS. The kernel's peak resident set size (``VmHWM``) is reset
  through ``/proc/self/clear_refs`` right before the step and read after it, above ``VmRSS`` before it
  (:func:`step_peak`). Where the peak cannot be reset (not Linux), the first step of the process is measured against
  ``getrusage(RUSAGE_SELF).ru_maxrss`` (it then also counts the first allocation of the optimizer state).
* CUDA: ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the step, in this process.

The helpers (:func:`reset_peak_rss`, :func:`rss_kib`, :func:`maxrss_bytes`, :func:`malloc_trim`, :func:`step_peak`)
are public: ``benchmarks/memory_recompute.py`` measures with them too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import gc
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

import torch

from .floors import backprop_runner, parse_runner
from .peers import Unavailable
from .runners import Runner, build
from .suite import Case, Config

__all__ = [
    "MALLOC_ENV",
    "malloc_trim",
    "maxrss_bytes",
    "measure_memory",
    "memory_case",
    "memory_worker",
    "peak_resettable",
    "reset_peak_rss",
    "rss_kib",
    "step_peak",
]

MALLOC_ENV: Mapping[str, str] = MappingProxyType({"MALLOC_MMAP_THRESHOLD_": "65536",
                                                  "MALLOC_TRIM_THRESHOLD_": "131072"})
"""glibc settings for a measuring process: blocks above 64 KiB are ``mmap``-ed and go back to the OS when freed, so
the resident set follows the live tensors instead of what the allocator kept from earlier steps."""


def rss_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``"VmRSS"``, ``"VmHWM"``), or ``None`` where there is none."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (``VmHWM``); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return rss_kib("VmHWM") is not None


def maxrss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``), in bytes; it cannot be reset."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def malloc_trim() -> None:
    """Return glibc's free heap memory to the OS (nothing where there is no glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_resettable(device: torch.device) -> bool:
    """Whether :func:`step_peak` can measure any step (CUDA, or Linux's ``clear_refs``), not only the first."""
    return device.type == "cuda" or reset_peak_rss()


def step_peak(step: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Run ``step`` and return its peak memory above the memory just before it (bytes), and how it was read.

    CUDA: ``max_memory_allocated`` above ``memory_allocated``. CPU: ``VmHWM`` after the step above ``VmRSS`` before
    it, the peak reset right before; where it cannot be reset, ``ru_maxrss`` after above before (meaningful for the
    first large step of the process only).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base), "torch.cuda.max_memory_allocated"
    malloc_trim()
    if reset_peak_rss():
        base = rss_kib("VmRSS") * 1024
        step()
        return max(0, rss_kib("VmHWM") * 1024 - base), "peak RSS (VmHWM) after warm-up"
    base = maxrss_bytes()
    step()
    return max(0, maxrss_bytes() - base), "ru_maxrss, first step"


def _memory_here(config: Config, runner: str, device: torch.device, seed: int, warmup: int) -> dict[str, Any]:
    """Build, warm up, then measure one step in this process (the subprocess worker on CPU; in-process on CUDA).

    The baseline is taken after ``optimizer.zero_grad()`` (gradients freed): weights, buffers, optimizer state and
    the batch. The step's peak above it includes the gradients the step writes.
    """
    r = Runner(runner, build(config, device, seed), seed=seed)
    for _ in range(warmup if peak_resettable(device) else 0):
        r.step()
    r.optimizer.zero_grad()
    gc.collect()
    peak, how = step_peak(r.step, device)
    return {"step_bytes": peak, **r.state_bytes(), "how": how}


def measure_memory(
    config: Config, runner: str, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak memory of one training step above the resident training state (module docstring).

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
        ValueError: unknown runner.
        Unavailable: the runner cannot run here.
        RuntimeError: the subprocess failed (its stderr is in the message).
    """
    device = torch.device(device)
    parse_runner(runner)
    if device.type == "cuda":
        return _memory_here(config, runner, device, seed, warmup)
    spec = {"config": asdict(config), "runner": runner, "seed": seed, "warmup": warmup,
            "threads": torch.get_num_threads()}
    env = {**os.environ, **MALLOC_ENV, "PYTHONWARNINGS": "ignore"}
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


def memory_worker(spec_json: str) -> int:
    """The subprocess side of :func:`measure_memory`: measure, print one JSON line, return the exit code 0."""
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    try:
        out = _memory_here(Config(**spec["config"]), spec["runner"], torch.device("cpu"), int(spec["seed"]),
                           int(spec["warmup"]))
    except Unavailable as e:
        out = {"unavailable": str(e)}
    print(json.dumps(out), flush=True)
    return 0


def resident_bytes(row: Mapping[str, Any]) -> int:
    """Weights, buffers and optimizer state of a memory row."""
    return row["weights_bytes"] + row["optimizer_bytes"]


def memory_case(
    case: Case, *, device: str | torch.device = "cpu", seed: int = 0, warmup: int = 2, jobs: int = 3,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """:func:`measure_memory` of backprop and every memory runner of ``case``, with ratios to backprop.

    Args:
        case: the configuration and its memory runners.
        device: ``"cpu"`` or ``"cuda"``. (default: ``"cpu"``)
        seed: seed of the model and batch. (default: 0)
        warmup: steps before the measured one. (default: 2)
        jobs: CPU measurement subprocesses run at once (one process's peak RSS is not disturbed by another's).
            On CUDA the measurements share the device and run one by one. (default: 3)

    Returns:
        ``(rows, skipped)``; a row has the fields of :func:`measure_memory`, ``ratio`` (step peak / backprop's) and
        ``total_ratio`` ((weights + optimizer state + step peak) / backprop's).
    """
    if not case.memory:
        return [], []
    label, base = case.config.label, backprop_runner()
    names = tuple(dict.fromkeys((base, *case.memory)))

    def one(name: str) -> dict[str, Any] | Exception:
        try:
            return measure_memory(case.config, name, device=device, seed=seed, warmup=warmup)
        except Exception as e:  # noqa: BLE001 — reported as skipped below
            return e

    workers = jobs if torch.device(device).type == "cpu" else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        measured = list(pool.map(one, names))
    rows, skipped = [], []
    for name, m in zip(names, measured, strict=True):
        if isinstance(m, Unavailable):
            skipped.append({"config": label, "runner": name, "reason": f"memory: {m}"})
        elif isinstance(m, Exception):
            skipped.append({"config": label, "runner": name, "reason": f"memory error: {type(m).__name__}: {m}"})
        else:
            rows.append({"config": label, **asdict(case.config), "runner": name, **m})
    ref = next((r for r in rows if r["runner"] == base), None)
    for r in rows:
        r["ratio"] = r["step_bytes"] / ref["step_bytes"] if ref and ref["step_bytes"] > 0 else float("nan")
        total = resident_bytes(ref) + ref["step_bytes"] if ref else 0
        r["total_ratio"] = (resident_bytes(r) + r["step_bytes"]) / total if total else float("nan")
    return rows, skipped
