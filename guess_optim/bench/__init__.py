"""Speed and memory of a guessed training step against a backprop step of the same model (README "Speed and memory").

Everything is reported as a **ratio to backprop measured side by side in the same process**: the machines are shared
and noisy, so an absolute time means little. ``benchmarks/README.md`` describes what is measured and how.

* **A step** (:mod:`~guess_optim.bench.runners`): ``optimizer.zero_grad()``, an estimate written into ``p.grad``
  (backprop's ``loss.backward()``, a guessed method's after :func:`guess_optim.attach`, or a peer's estimator), then
  ``optimizer.step()`` of the same ``torch.optim.AdamW`` for every runner (``@release``: the same AdamW per parameter,
  stepped inside ``backward()``).
* **Time** (:mod:`~guess_optim.bench.timing`): every runner in rounds, each time right next to a backprop step; the
  ratio is the median of the per-round ratios, the spread their interquartile range.
* **Floor** (:mod:`~guess_optim.bench.floors`): the layer-sized matrix products of a runner's step over backprop's
  three, read from the estimator registry (``space``, ``guess_matmuls``).
* **Memory** (:mod:`~guess_optim.bench.memory`): the peak of one step above the memory before it (a fresh
  subprocess per runner on CPU, ``torch.cuda`` statistics on CUDA).
* **Peers** (:mod:`~guess_optim.bench.peers`): torchzero's forward gradient (optional) and a MeZO-style SPSA step.
* **Suites and targets** (:mod:`~guess_optim.bench.suite`, :mod:`~guess_optim.bench.targets`), reports
  (:mod:`~guess_optim.bench.report`, :mod:`~guess_optim.bench.plot`), one run (:mod:`~guess_optim.bench.session`)
  and the command line (:mod:`~guess_optim.bench.cli`).

Run ``python -m guess_optim.bench --suite quick --threads 1`` (under a minute) or ``--suite full`` (about 15 minutes
on 2 CPU cores), ``--device cuda`` on a GPU, ``--profile wt`` for the PyTorch and Python profiles of one
configuration.
"""

from .cli import build_parser, main
from .floors import STORES, RunnerName, Store, backprop_runner, floor_ratio, parse_runner
from .memory import measure_memory, memory_case
from .peers import PEERS, Peer, Unavailable, mezo_step
from .plot import plot
from .report import console_table, to_markdown
from .runners import Runner, build
from .session import SCHEMA, machine_info, run
from .suite import SUITE_NOTES, Case, Config, core_runners, every_runner, memory_runners, suite
from .targets import TARGETS, Target, evaluate_targets
from .timing import profile_step, time_case

__all__ = [
    "PEERS",
    "SCHEMA",
    "STORES",
    "SUITE_NOTES",
    "TARGETS",
    "Case",
    "Config",
    "Peer",
    "Runner",
    "RunnerName",
    "Store",
    "Target",
    "Unavailable",
    "backprop_runner",
    "build",
    "build_parser",
    "console_table",
    "core_runners",
    "evaluate_targets",
    "every_runner",
    "floor_ratio",
    "machine_info",
    "main",
    "measure_memory",
    "memory_case",
    "memory_runners",
    "mezo_step",
    "parse_runner",
    "plot",
    "profile_step",
    "run",
    "suite",
    "time_case",
    "to_markdown",
]
