"""Peak memory of a training step: backprop vs guessed gradients with ``store="activations"`` / ``"recompute"``, and
``"recompute"`` stepping in backward (``gradient_release=True`` with :class:`guess_optim.optim.OptimizerInBackward`).

Each configuration runs in a fresh process (``multiprocessing`` spawn), so one configuration's allocator caches do not
pollute the next. The process builds a deep MLP (:class:`guess_optim.models.MLP`, or with ``--residual`` an MLP of
residual blocks ``x + relu(fc(x)) / depth``) and a random batch, runs one step on two examples (library
initialisation), then measures two full steps (``zero_grad``, forward, cross-entropy, ``backward``, SGD step) on the
real batch:

* the *first* step at the batch's shape, which for the structured methods (``mixing``, ``wt``, ``downstream``,
  ``self-sharpening``) includes the graph discovery of :mod:`guess_optim.graph` (an extra forward);
* the *steady* step, the next one: the discovered graph is reused, unless it captured activations (residual adds,
  attention), in which case it is rediscovered at every step.

Peak memory of a step:

* CPU: the peak resident set size above the resident set size before the step. The peak is reset right before the
  step by writing ``5`` to ``/proc/self/clear_refs`` and read from ``VmHWM`` in ``/proc/self/status`` (Linux); where
  that is not possible, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used (then only the first step is measured,
  as the peak so far cannot be reset). Large blocks are ``mmap``-ed by the child's ``malloc`` so that freed memory
  leaves the resident set (see :func:`run_isolated`). ``tracemalloc`` does not see torch's tensors and is not used.
* CUDA: ``torch.cuda.max_memory_allocated()`` above ``torch.cuda.memory_allocated()`` before the step.

A step's peak includes the ``p.grad`` tensors (the column "beyond p.grad" subtracts their size) as well as what each
method keeps for the backward: backprop's autograd graph, the guess points' inputs and guesses (``"activations"``), or
only the input batch (``"recompute"``, which runs a second forward during ``backward()``). Stepping in backward
(``"release"``: one SGD per parameter, stepped from its post-accumulate-grad hook as soon as its estimate is complete)
never holds the whole model's ``p.grad`` (its "beyond p.grad" column is negative). Times are reported for reference,
not as a benchmark.

Example::

    python benchmarks/memory_recompute.py --depth 24 --width 1024 --batch 256 --method wt --device cpu \\
        --out memory_recompute.json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import time
from typing import Any

from guess_optim import METHODS, get_estimator
from guess_optim.bench.memory import MALLOC_ENV, peak_resettable, step_peak

__all__ = ["CONFIGS", "main", "measure", "run_isolated", "table"]

CONFIGS: dict[str, dict[str, Any]] = {
    "backprop": {"method": next(m for m, cls in METHODS.items() if cls.space == "backprop")},
    "activations": {"store": "activations"},
    "recompute": {"store": "recompute"},
    "release": {"store": "recompute", "gradient_release": True},
}
"""Configuration name → what it changes in :func:`guess_optim.attach` (the method comes from ``--method``)."""

_MIB = 2**20


def _build(args: dict[str, Any]):
    import torch
    from torch import nn

    from guess_optim.models import MLP

    if not args["residual"]:
        return MLP(args["width"], 10, depth=args["depth"], width=args["width"])

    class ResidualMLP(nn.Module):
        def __init__(self, width: int, depth: int):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
            self.head = nn.Linear(width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for fc in self.blocks:
                x = x + torch.relu(fc(x)) / len(self.blocks)  # keeps the residual stream finite at any depth
            return self.head(x)

    return ResidualMLP(args["width"], args["depth"])


def measure(config: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``config`` in this process: peak memory (bytes) and time (s) of its first and steady steps."""
    import torch
    import torch.nn.functional as F

    from guess_optim import attach
    from guess_optim.optim import OptimizerInBackward

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    torch.manual_seed(0)
    model = _build(args).to(device).train()
    x = torch.randn(args["batch"], args["width"], device=device)
    y = torch.randint(0, 10, (args["batch"],), device=device)
    overrides = CONFIGS[config]
    method = overrides.get("method", args["method"])
    release = overrides.get("gradient_release", False)
    handle = attach(model, method, seed=0, store=overrides.get("store", "activations"), gradient_release=release)
    sgd = functools.partial(torch.optim.SGD, lr=1e-3)
    opt = OptimizerInBackward(model, sgd) if release else sgd(model.parameters())
    cuda = device.type == "cuda"

    def step(inputs, targets):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        if not release:  # stepped in backward
            opt.step()
        if cuda:
            torch.cuda.synchronize(device)

    hwm = peak_resettable(device)
    if hwm:
        step(x[:2], y[:2])

    def measured_step():
        opt.zero_grad(set_to_none=True)
        elapsed = []

        def timed_step():
            start = time.perf_counter()
            step(x, y)
            elapsed.append(time.perf_counter() - start)

        peak, _ = step_peak(timed_step, device)
        return peak, elapsed[0]

    first, first_s = measured_step()
    steady, steady_s = measured_step() if hwm else (None, None)
    if getattr(handle, "skipped_steps", 0):
        raise FloatingPointError("a step's estimate was not finite (not written to p.grad): the measurement is void")
    handle.remove()
    how = ("torch.cuda.max_memory_allocated" if cuda else "VmHWM - VmRSS (clear_refs)" if hwm
           else "ru_maxrss delta (first step only)")
    return {
        "config": config,
        "method": method,
        "first_peak_bytes": first,
        "first_step_s": first_s,
        "steady_peak_bytes": steady,
        "steady_step_s": steady_s,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "measured_by": how,
    }


def _child(config: str, args: dict[str, Any], queue) -> None:
    try:
        queue.put(measure(config, args))
    except BaseException as e:  # report, don't hang the parent
        queue.put({"config": config, "error": f"{type(e).__name__}: {e}"})


def run_isolated(config: str, args: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh spawned process.

    On CPU the child's glibc ``malloc`` serves every block above 64 KiB by ``mmap`` and returns it to the OS on
    ``free`` (:data:`guess_optim.bench.memory.MALLOC_ENV`), so that the resident set follows the live tensors
    instead of what the allocator kept from earlier steps.
    """
    ctx = mp.get_context("spawn")
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(config, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"configuration {config!r} failed: {result['error']}")
    return result


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / _MIB:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure` results (the first one is the reference)."""
    ref = results[0]
    key = "steady_peak_bytes" if ref["steady_peak_bytes"] is not None else "first_peak_bytes"
    lines = [
        "| configuration | method | first step peak (MiB) | steady step peak (MiB) | steady ratio to backprop "
        "| steady beyond p.grad (MiB) | steady step time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r[key] / ref[key] if ref[key] else float("nan")
        beyond = None if r[key] is None else r[key] - r["param_bytes"]
        t = r["steady_step_s"] if r["steady_step_s"] is not None else r["first_step_s"]
        lines.append(f"| {r['config']} | {r['method']} | {_mib(r['first_peak_bytes'])} | "
                     f"{_mib(r['steady_peak_bytes'])} | {ratio:.2f} | {_mib(beyond)} | {t:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--depth", type=int, default=24, help="number of Linear layers of the MLP")
    parser.add_argument("--width", type=int, default=1024, help="width of the MLP (and of its input)")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the measured steps")
    parser.add_argument("--method", default="wt", help="guessing method of the two guessed configurations")
    parser.add_argument("--residual", action="store_true", help="residual blocks x + relu(fc(x)) / depth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration; the median is kept")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    ns = parser.parse_args(argv)
    for name in ("depth", "width", "batch", "threads", "repeats"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(ns, name)}")
    if ns.depth < 2:
        parser.error(f"--depth must be >= 2, got {ns.depth}")
    if get_estimator(ns.method).space == "backprop":
        parser.error("--method must be a guessing method (backprop is always measured as the reference)")
    args = {k: getattr(ns, k) for k in ("depth", "width", "batch", "method", "residual", "device", "threads")}

    results = []
    for config in CONFIGS:
        runs = [run_isolated(config, args) for _ in range(ns.repeats)]
        runs.sort(key=lambda r: r["steady_peak_bytes"] if r["steady_peak_bytes"] is not None else r["first_peak_bytes"])
        results.append(runs[len(runs) // 2])
    md = table(results)
    kind = "residual MLP" if ns.residual else "MLP"
    header = (f"Deep {kind}: depth {ns.depth}, width {ns.width}, batch {ns.batch}, device {ns.device}, "
              f"parameters {results[0]['param_bytes'] / _MIB:.0f} MiB; peak measured by {results[0]['measured_by']}")
    print(header)
    print()
    print(md)
    report: dict[str, Any] = {"args": args, "results": results, "markdown": md, "python": platform.python_version()}
    try:
        import torch

        report["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
