"""The command line of the reproduction: ``python -m guess_optim.reproduce <experiment> [--flags] --out-dir DIR``
(also ``guess-optim reproduce <experiment>``, and ``guess-optim cosine`` for the cosine experiment).

Each experiment's flags are generated from its config dataclass (one ``--flag`` per field, its help string from the
field); the dataclass's ``__post_init__`` validates them, and an invalid value is reported by argparse (exit code 2)
with the message naming the value and what was expected. After a run the command prints the experiment's main
numbers as a text table and the files it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import check_int
from .._io import ensure_writable_dir
from .bias import BiasConfig, run_bias, summarize_bias
from .cosine import CosineConfig, run_cosine, summarize_cosine
from .downstream import DownstreamDepthConfig, run_downstream_depth, summarize_downstream_depth
from .follow_up import FollowUpConfig, run_follow_up, summarize_follow_up
from .one_step import OneStepConfig, run_one_step, summarize_one_step
from .sharpening import SelfSharpeningConfig, run_self_sharpening, summarize_self_sharpening
from .subspace import SubspaceConfig, run_subspace, summarize_subspace
from .sweep import SweepConfig, run_sweep, summarize_sweep
from .table1 import Table1Config, run_table1, summarize_table1

__all__ = ["EXPERIMENTS", "Experiment", "build_parser", "files_summary", "main"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One sub-command: its config class, its run function, the paper item it reproduces and the text table of its
    record's main numbers."""

    config: type
    run: Callable[..., dict[str, Any]]
    paper: str
    summary: Callable[[dict[str, Any]], str]


EXPERIMENTS: dict[str, Experiment] = {
    "cosine": Experiment(CosineConfig, run_cosine, "Fig. 1 left: cosine similarity along a backprop trajectory",
                         summarize_cosine),
    "one-step": Experiment(OneStepConfig, run_one_step, "Fig. 1 right: one-step loss reduction relative to backprop",
                           summarize_one_step),
    "table1": Experiment(Table1Config, run_table1, "Table 1 / Fig. 2: train and test accuracy of every method",
                         summarize_table1),
    "bias": Experiment(BiasConfig, run_bias, "Fig. 3: averaging guesses; matched-cosine oracle; momentum and bias",
                       summarize_bias),
    "self-sharpening": Experiment(SelfSharpeningConfig, run_self_sharpening,
                                  "Fig. 4: W^T with singular values to a power; cosine and effective rank",
                                  summarize_self_sharpening),
    "downstream-depth": Experiment(DownstreamDepthConfig, run_downstream_depth,
                                   "Fig. 5: 1- vs 2-layer downstream guessing", summarize_downstream_depth),
    "subspace": Experiment(SubspaceConfig, run_subspace,
                           "Fig. 6/7, A.2: gradients vs activation-PCA and random subspaces", summarize_subspace),
    "sweep": Experiment(SweepConfig, run_sweep, "A.3, Fig. 8: learning rate x optimizer sweep", summarize_sweep),
    "follow-up": Experiment(FollowUpConfig, run_follow_up,
                            "after the paper: wt-perp, wt-perp-ns, wt-precond vs the paper's guesses on MNIST-1D and "
                            "mnist-5k (Wang, Markou, Campbell 2025)", summarize_follow_up),
}
"""Sub-command name → :class:`Experiment`; ``<name>.json`` and ``<name>.png`` are what it writes."""


def _scalar_parser(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        def parse_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"invalid boolean {s!r}; expected true or false")
        return parse_bool
    if tp in (int, float, str):
        return tp
    if typing.get_origin(tp) is tuple:  # a pair inside a list, e.g. (depth, width) written "6x128"
        inner = [_scalar_parser(a) for a in typing.get_args(tp)]

        def parse_tuple(s: str) -> tuple:
            parts = s.lower().split("x")
            if len(parts) != len(inner):
                raise argparse.ArgumentTypeError(f"invalid value {s!r}; expected {len(inner)} values joined by 'x'")
            return tuple(p(x) for p, x in zip(inner, parts, strict=True))
        return parse_tuple
    raise TypeError(f"unsupported config field type {tp!r}")


def _field_parser(tp: Any) -> tuple[Callable[[str], Any], bool]:
    """(parser of the command-line string, whether the field is a comma-separated list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # "X | None": "none" gives None
        (inner,) = [a for a in args if a is not type(None)]
        parse, is_list = _field_parser(inner)
        return (lambda s: None if s.lower() == "none" else parse(s)), is_list
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _scalar_parser(args[0])

        def parse_list(s: str) -> tuple:
            try:
                return tuple(item(x.strip()) for x in s.split(",") if x.strip())
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"invalid list {s!r}: {err}") from None
        return parse_list, True
    return _scalar_parser(tp), False


def _add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # the registry, read now
        help_ = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_} (default: {default})")
            continue
        parse, is_list = _field_parser(hints[f.name])
        shown = ",".join(_show(v) for v in default) if is_list else _show(default)
        choices = f.metadata.get("choices")
        extra = f"; one of {', '.join(choices)}" if choices and not is_list else ""
        parser.add_argument(flag, type=parse, default=default, metavar=f.name.upper(),
                            help=f"{help_}{' (comma-separated)' if is_list else ''}{extra} (default: {shown})")


def _show(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser: one sub-command per entry of :data:`EXPERIMENTS`, plus ``--out-dir``, ``--progress`` and
    ``--threads``.

    Args:
        prog: the program name shown in usage and error messages (default: ``python -m guess_optim.reproduce``;
            a CLI that embeds this one passes e.g. ``"guess-optim reproduce"``).
    """
    return _build_parser(prog)[0]


def _build_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m guess_optim.reproduce",
        description="Reproduce the experiments of Singhal et al., 'How to Guess a Gradient' (arXiv 2312.04709). "
                    "Each experiment writes <name>.json (numbers, config, versions, seconds) and <name>.png.",
    )
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    subparsers = {}
    for name, exp in EXPERIMENTS.items():
        p = subparsers[name] = sub.add_parser(name, help=exp.paper,
                                              description=f"{exp.paper}. {exp.run.__doc__.splitlines()[0]}")
        p.add_argument("--out-dir", default="runs/reproduce", help="where to write the JSON and PNG "
                       "(default: runs/reproduce)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show tqdm progress bars (default: True)")
        p.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default: 1; these small MLPs gain little from more, and on a busy "
                            "machine 2 threads ran ~3x slower than 1)")
        _add_config_arguments(p, exp.config)
    return parser, subparsers


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen experiment, print its main numbers as a text table
    and the files it wrote.

    Args:
        argv: the arguments after the program name, e.g. ``["cosine", "--width", "1024", "--out-dir", "out"]``.
        prog: the program name for usage and error messages (see :func:`build_parser`).

    Returns:
        0 on success. Invalid flags, and an ``--out-dir`` that cannot be created or written (checked before the run),
        exit with status 2 and a message naming the value (argparse, with the experiment's usage).
    """
    parser, subparsers = _build_parser(prog)
    ns = parser.parse_args(argv)
    exp, sub = EXPERIMENTS[ns.experiment], subparsers[ns.experiment]
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(exp.config)}
    try:
        config = exp.config(**values)
        check_int("threads", ns.threads, low=1)
    except ValueError as err:
        sub.error(str(err))
    try:  # now, not after the run: finish() writing into an unusable directory would lose the results
        ensure_writable_dir(ns.out_dir)
    except ValueError as err:
        sub.error(f"--out-dir: {err}")
    torch.set_num_threads(ns.threads)
    record = exp.run(config, out_dir=ns.out_dir, progress=ns.progress)
    print(exp.summary(record))
    print(f"\n{ns.experiment}: {record['seconds']:.1f} s; {files_summary(record.get('files', []))}")
    return 0


def files_summary(files: Sequence[str]) -> str:
    """``wrote N files to DIR: a.json (1.2 kB), a.png (40.0 kB)`` (``wrote no files`` for none)."""
    if not files:
        return "wrote no files"
    sizes = ", ".join(f"{os.path.basename(f)} ({os.path.getsize(f) / 1000:.1f} kB)" for f in files)
    return f"wrote {len(files)} files to {os.path.dirname(files[0]) or '.'}: {sizes}"
