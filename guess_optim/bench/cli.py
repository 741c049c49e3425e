"""``guess-optim bench`` / ``python -m guess_optim.bench``: arguments, the run, and its files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .._io import ensure_writable_dir, write_json, write_text
from .floors import STORES, guessed_methods, parse_runner
from .memory import memory_worker
from .peers import PEERS
from .plot import plot
from .report import target_lines, to_markdown
from .session import SCHEMA, run
from .suite import Case, Config, core_runners, suite
from .timing import profile_step

__all__ = ["build_parser", "main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only: a method name such as ``wt-precond`` is never split at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``guess-optim bench`` / ``python -m guess_optim.bench``."""
    p = argparse.ArgumentParser(
        prog="guess-optim bench",
        formatter_class=_HelpFormatter,
        description="Speed and peak memory of guessed training steps as ratios to a backprop step of the same model, "
                    "measured side by side in one process.",
    )
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: tiny models, under a minute; full: MLPs of depth 3-24, width 128-4096 and batch "
                        "32-1024, a ConvNet and ViT-B/16 prompt tuning (~15 min on 2 CPU cores, a few minutes on a "
                        "GPU) (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--config", action="append", default=None, metavar="LABEL",
                   help="only these configurations of the suite, or new ones (mlp-d6-w1024-b128, convnet-b128, "
                        "vpt-vit-b16-b8); repeatable")
    p.add_argument("--runners", default=None,
                   help="comma-separated runners for --config labels not in the suite, and a filter on the suite's "
                        f"runners otherwise: methods ({', '.join(guessed_methods())}), each optionally with a store "
                        f"suffix ({', '.join('@' + s for s in STORES)}), peers ({', '.join(PEERS)})")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: each case's own)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per runner before timing and before measuring memory (default: each case's "
                        "own, else 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; use 1 on a shared CPU (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="model, batch and guess seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--markdown", default=None, help="write the Markdown report (e.g. BENCHMARKS.md)")
    p.add_argument("--plot-dir", default=None, help="write cost_vs_size.png here (e.g. docs/bench)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="render --markdown/--plot-dir from an earlier --out file instead of measuring")
    p.add_argument("--profile", default=None, metavar="RUNNERS",
                   help="print torch.profiler and cProfile reports of these runners (comma-separated) on the first "
                        "--config (default: mlp-d6-w1024-b128) instead of benchmarking")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p


def _device(name: str) -> torch.device:
    """``--device``, checked: ``cpu`` or an available ``cuda[:N]``.

    Raises:
        ValueError: another device type, a malformed name, or CUDA not available here.
    """
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"Invalid --device: {name!r}; expected cpu or cuda[:N]") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid --device: {name!r}; expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _check(args: argparse.Namespace) -> None:
    """Reject bad numbers before anything runs (the message names the flag and the fix).

    Raises:
        ValueError: ``--threads`` or ``--rounds`` below 1, ``--warmup`` below 0.
    """
    for flag, value, least in (("--threads", args.threads, 1), ("--rounds", args.rounds, 1),
                               ("--warmup", args.warmup, 0)):
        if value is not None and value < least:
            raise ValueError(f"Invalid {flag}: {value}; expected an int >= {least}")


def _check_outputs(args: argparse.Namespace) -> None:
    """``--out``, ``--markdown`` and ``--plot-dir``, checked before anything is measured (the files are written after
    the first case, minutes into a run).

    Raises:
        ValueError: a file flag naming a directory, or a directory that cannot be created or written to (the message
            names the flag and the path).
    """
    files = [("--markdown", args.markdown)] + ([] if args.from_json else [("--out", args.out)])
    for flag, path in files:
        if not path:
            continue
        if os.path.isdir(path):
            raise ValueError(f"{flag}: {path!r} is a directory; give a file name, such as "
                             f"{os.path.join(path, 'bench.json' if flag == '--out' else 'BENCHMARKS.md')!r}")
        try:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    if args.plot_dir:
        try:
            ensure_writable_dir(args.plot_dir)
        except ValueError as err:
            raise ValueError(f"--plot-dir: {err}") from None


def _select(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The suite's cases, narrowed to ``--config`` (unknown labels get the core runners) and ``--runners``."""
    cases = suite(args.suite, device.type)
    wanted = [r.strip() for r in args.runners.split(",") if r.strip()] if args.runners else None
    for r in wanted or []:
        parse_runner(r)
    if args.config:
        known = {c.config.label: c for c in cases}
        runners = tuple(wanted or core_runners())
        cases = [known.get(c.label) or Case(c, runners, runners) for c in map(Config.parse, args.config)]
    if wanted:
        cases = [replace(c, runners=tuple(r for r in c.runners if r in wanted),
                         memory=tuple(r for r in c.memory if r in wanted)) for c in cases]
    if args.warmup is not None:
        cases = [replace(c, warmup=args.warmup) for c in cases]
    return cases


def _from_json(x: Any) -> Any:
    """Undo :func:`~guess_optim._io.json_safe` for ratios (``None`` → NaN), so reports can be re-rendered from a JSON
    file."""
    for kind in ("time", "memory"):
        for r in x.get(kind, []):
            for k in ("ratio", "total_ratio", "of_floor", "ratio_q1", "ratio_q3", "ratio_iqr"):
                if k in r and r[k] is None:
                    r[k] = float("nan")
    return x


_RESULT_KEYS = ("command", "started", "seconds", "machine", "load", "time", "memory", "skipped", "targets")
"""What the reports read from a results file (:func:`~guess_optim.bench.session.run`'s record)."""


def _read_results(path: str) -> dict[str, Any]:
    """An earlier ``--out`` file for ``--from-json``, checked to be a benchmark's results.

    Raises:
        ValueError: the file is not JSON, or not the results of ``guess-optim bench`` (the message names the file and
            what is wrong).
        OSError: it cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        try:
            x = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--from-json {path}: not a JSON file ({err})") from None
    what = f"--from-json {path}: not the results of guess-optim bench --out"
    if not isinstance(x, dict):
        raise ValueError(f"{what} (a JSON {type(x).__name__}, not an object)")
    if x.get("schema", SCHEMA) != SCHEMA:
        raise ValueError(f"{what} of this version (schema {x['schema']!r}, this version reads {SCHEMA!r})")
    missing = [k for k in _RESULT_KEYS if k not in x]
    if missing:
        raise ValueError(f"{what} (no {', '.join(missing)})")
    return _from_json(x)


def _save(results: dict[str, Any], args: argparse.Namespace, *, plots: bool) -> None:
    """Write ``--out``, ``--plot-dir`` and ``--markdown`` (after every case, and once more at the end)."""
    if args.out and not args.from_json:
        write_json(args.out, results)
    paths = plot(results, args.plot_dir) if args.plot_dir and plots else []
    if args.markdown:
        base = os.path.dirname(os.path.abspath(args.markdown))
        write_text(args.markdown, to_markdown(results, plot_paths=[os.path.relpath(p, base) for p in paths]))


def main(argv: Sequence[str] | None = None) -> int:
    """``guess-optim bench``: run a suite, print one table per case and the measured targets, write JSON / Markdown /
    the plot.

    Returns:
        The exit code: 0, or 2 for bad arguments (a message on stderr, no traceback).
    """
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        return memory_worker(args.memory_worker)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        _check(args)
        _check_outputs(args)
        device = _device(args.device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.from_json:
            results = _read_results(args.from_json)
        elif args.profile:
            names = [n.strip() for n in args.profile.split(",") if n.strip()]
            for name in names:
                parse_runner(name)
            config = Config.parse((args.config or ["mlp-d6-w1024-b128"])[0])
            for name in names:
                print(profile_step(name, config, device=device, seed=args.seed), flush=True)
            return 0
        else:
            results = run(_select(args, device), device=str(device), seed=args.seed, rounds=args.rounds,
                          memory=not args.no_memory, log=log, suite_name=args.suite,
                          checkpoint=lambda r: _save(r, args, plots=False),
                          command=" ".join(["python -m guess_optim.bench", *(sys.argv[1:] if argv is None else argv)]))
    except (ValueError, OSError) as e:
        print(f"guess-optim bench: error: {e}", file=sys.stderr)
        return 2
    lines = target_lines(results["targets"])
    if lines:
        log("")
    for line in lines:
        log(line)
    _save(results, args, plots=True)
    return 0
