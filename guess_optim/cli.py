"""The ``guess-optim`` command: ``train`` a model with guessed gradients; ``cosine``, ``reproduce`` and ``bench``.

``guess-optim train`` trains the paper's MLP (or a small ConvNet) on an embedded or torchvision dataset with
:class:`~guess_optim.trainer.GuessedGradientTrainer` (paper Table 1) and can write its results as JSON (``--out``).
``guess-optim cosine`` is ``guess-optim reproduce cosine`` (:mod:`guess_optim.reproduce.cosine`): every method's cosine
similarity to the true gradient along a backprop trajectory (paper §3, Fig. 1). ``reproduce`` runs the paper's
experiments (:mod:`guess_optim.reproduce`) and ``bench`` the benchmark, each with a parser of its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import __version__
from ._checks import check_device, check_float, check_int
from ._io import ensure_writable_dir, write_json
from ._seeds import derive_seed
from .attach import STORES
from .data import DATASETS, load_dataset, make_loaders
from .estimators import METHODS, get_estimator
from .models import ACTIVATIONS, MODELS, build_model
from .optim import OPTIMIZERS, OptimizerInBackward, build_optimizer
from .trainer import CheckpointError, GuessedGradientTrainer

__all__ = ["DEFAULT_EPOCHS", "OPTIMIZERS", "build_optimizer", "derive_seeds", "main"]

DEFAULT_EPOCHS = 20
"""Default ``--epochs`` of ``train``: about 10 s for ``wt`` on ``mnist-5k`` (3 x 128 MLP) on 2 CPU cores."""
SPLIT_SEED = 0  # the mnist-5k/digits train/test split is fixed, whatever --seed is
_SEQUENCE_DATASETS = ("mnist1d",)  # inputs (C, L), not images (C, H, W): --model convnet does not apply
_RESUME_HINTS = {  # CheckpointError.part -> how to resume
    "file": "run without --resume to start afresh (it overwrites the file) or point --checkpoint-dir elsewhere",
    "method": "resume with the --method that wrote it",
    "model": "resume with the --model, --dataset, --depth and --width that wrote it",
    "optimizer": "resume with the --optimizer (and --gradient-release) that wrote it",
    "hyperparameters": "resume with the values that wrote it (the optimizer state restores them, so other values "
    "would be ignored), or run without --resume to start afresh",
}
_HYPERPARAMETER_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "momentum": "--momentum"}


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the data shuffling and the guesses, derived from ``--seed`` by ``numpy.SeedSequence``.

    ``--seed`` itself seeds the global RNG (model initialization); the split seed is fixed (0).

    Returns:
        ``{"init": seed, "loader": derive_seed(seed, 1), "guesses": derive_seed(seed, 2)}``
        (:func:`guess_optim._seeds.derive_seed`, the reproductions' derivation too).
    """
    return {"init": seed, "loader": derive_seed(seed, 1), "guesses": derive_seed(seed, 2)}


# ------------------------------------------------------------------------------------------------- argument types
def _checked(convert: type, check: Callable[..., Any], name: str, **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then validate it with ``check(name, value, **bounds)`` from
    :mod:`guess_optim._checks` (its message, which names the value, becomes argparse's error)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {text!r}") from None
        try:
            return check(name, value, **bounds)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = convert.__name__
    return parse


def _int_arg(name: str, low: int) -> Callable[[str], int]:
    return _checked(int, check_int, name, low=low)


def _float_arg(name: str, low: float, *, strict: bool = False) -> Callable[[str], float]:
    return _checked(float, check_float, name, low=low, strict=strict)


def _registered_method(text: str) -> str:
    """``--method``: validated by the registry (:func:`guess_optim.get_estimator`), so registered estimators count."""
    try:
        get_estimator(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _device_arg(text: str) -> str:
    """``--device``: a device this machine has (``--device cuda`` without a GPU is an argparse error, exit code 2)."""
    try:
        check_device("device", text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_model_args(p: argparse.ArgumentParser, *, depth: int, width: int) -> None:
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist-5k",
        help="mnist-5k and digits are embedded; the others are read by torchvision (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="root of the torchvision datasets")
    p.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    p.add_argument("--depth", type=_int_arg("depth", 1), default=depth, help="MLP linear layers (default: %(default)s)")
    p.add_argument("--width", type=_int_arg("width", 1), default=width, help="MLP hidden units (default: %(default)s)")
    p.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu", help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_int_arg("batch_size", 1), default=128, help="(default: %(default)s)")
    p.add_argument(
        "--seed",
        type=_int_arg("seed", 0),
        default=0,
        help="seeds model init; shuffling and guess seeds are derived from it (default: %(default)s)",
    )
    p.add_argument("--device", type=_device_arg, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_int_arg("threads", 1),
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) for CPU runs, e.g. 1 when running several at once (default: torch's)",
    )
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON (atomically)")


def build_parser() -> argparse.ArgumentParser:
    """The ``guess-optim`` argument parser: ``train``, and the delegated ``cosine``, ``reproduce`` and ``bench`` (listed
    here, parsed by their own parsers)."""
    return _build_parser()[0]


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """:func:`build_parser` and its ``train`` sub-parser (whose ``error`` reports ``guess-optim train: error: ...``)."""
    parser = argparse.ArgumentParser(
        prog="guess-optim",
        description='Train PyTorch models with guessed gradients (Singhal et al., "How to Guess a Gradient", '
        "arXiv 2312.04709).",
    )
    parser.add_argument("--version", action="version", version=f"guess_optim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,cosine,reproduce,bench}")
    methods = "; ".join(f"{k}: {m.summary}" for k, m in METHODS.items())

    t = sub.add_parser(
        "train",
        help="train a model with a guessed-gradient method (paper Table 1)",
        description="Train a model with guessed gradients; print per epoch the train loss, "
        "train/test accuracy and the mean cosine to the true gradient. Methods: " + methods,
    )
    t.add_argument(
        "--method",
        type=_registered_method,
        default="wt",
        metavar="{" + ",".join(METHODS) + "}",
        help="a registered method (default: %(default)s)",
    )
    t.add_argument("--model", choices=MODELS, default="mlp", help="(default: %(default)s)")
    _add_model_args(t, depth=3, width=128)
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default: %(default)s)")
    t.add_argument("--lr", type=_float_arg("lr", 0.0, strict=True), default=1e-3, help="(default: %(default)s)")
    t.add_argument(
        "--momentum", type=_float_arg("momentum", 0.0), default=0.0, help="SGD momentum (default: %(default)s)"
    )
    t.add_argument("--weight-decay", type=_float_arg("weight_decay", 0.0), default=0.0, help="(default: %(default)s)")
    t.add_argument("--epochs", type=_int_arg("epochs", 1), default=DEFAULT_EPOCHS, help="(default: %(default)s)")
    t.add_argument(
        "--num-guesses",
        type=_int_arg("num_guesses", 1),
        default=1,
        help="guesses averaged per step (default: %(default)s)",
    )
    t.add_argument("--exact-head", action="store_true", help="exact (local) gradient for the output layer")
    t.add_argument(
        "--store",
        choices=STORES,
        default=None,
        help="what a guessed step keeps from its forward: the activations its estimates read, or nothing "
        "(recompute: one extra forward in backward, memory near inference's) (default: activations)",
    )
    t.add_argument(
        "--gradient-release",
        action="store_true",
        help="step each parameter inside backward as soon as its estimate is complete (one optimizer per "
        "parameter; with --store recompute a step peaks at about one layer); not with --method backprop",
    )
    t.add_argument(
        "--track-cosine",
        type=_int_arg("track_cosine", 0),
        default=None,
        metavar="N",
        help="every N steps, cosine of the estimate to the backprop gradient; 0 turns it off (default: 10; 0 with "
        "--gradient-release, which frees the estimate inside backward)",
    )
    t.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="save DIR/last.pt after every epoch")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar (the per-epoch lines stay)")
    t.set_defaults(func=_train)
    for name, text in _DELEGATED.items():  # listed for --help; main() hands their arguments to their own parsers
        sub.add_parser(name, help=text, add_help=False)
    return parser, t


# ----------------------------------------------------------------------------------------------------- commands
def _versions() -> dict[str, str]:
    return {"guess_optim": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _load(args: argparse.Namespace):
    return load_dataset(args.dataset, data_dir=args.data_dir, download=args.download, split_seed=SPLIT_SEED)


def _model(args: argparse.Namespace, splits, name: str = "mlp") -> torch.nn.Module:
    kwargs = {"depth": args.depth, "width": args.width, "activation": args.activation} if name == "mlp" else {}
    return build_model(name, splits.input_shape, splits.num_classes, **kwargs)


def _train(args: argparse.Namespace) -> int:
    seeds = derive_seeds(args.seed)
    splits = _load(args)
    device = torch.device(args.device)
    train_loader, test_loader = make_loaders(splits, args.batch_size, seed=seeds["loader"], device=device)
    torch.manual_seed(seeds["init"])
    model = _model(args, splits, args.model).to(device)
    def optimizer_of(params):
        return build_optimizer(args.optimizer, params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    optimizer = OptimizerInBackward(model, optimizer_of) if args.gradient_release else optimizer_of(model.parameters())
    track_cosine = args.track_cosine if args.track_cosine is not None else 0 if args.gradient_release else 10
    store = {} if args.store is None else {"store": args.store}
    trainer = GuessedGradientTrainer(
        model,
        optimizer,
        method=args.method,
        seed=seeds["guesses"],
        device=device,
        track_cosine=track_cosine,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
        num_guesses=args.num_guesses,
        exact_head=args.exact_head,
        **store,
    )
    if args.resume:
        _check_resumed_hyperparameters(trainer)
    start = time.perf_counter()
    history = trainer.fit(train_loader, test_loader, epochs=args.epochs, resume=args.resume)
    seconds = time.perf_counter() - start
    last = history[-1]
    cosines = [c for _, c in trainer.cosines]
    result = {
        "command": "train",
        "method": args.method,
        "dataset": args.dataset,
        "model": args.model,
        "depth": args.depth,
        "width": args.width,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "epochs": last["epoch"],
        "train_accuracy": last["train_accuracy"],
        "test_accuracy": last["test_accuracy"],
        "final_train_loss": last["train_loss"],
        "test_loss": last["test_loss"],
        "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
        "seconds": seconds,
        "skipped_steps": trainer.skipped_steps,
        "seeds": seeds,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "versions": _versions(),
        "history": history,
    }
    cos = "-" if result["mean_cosine"] is None else f"{result['mean_cosine']:.4f}"
    print(
        f"{args.method} on {args.dataset}: train acc {last['train_accuracy']:.4f}, test acc "
        f"{last['test_accuracy']:.4f}, mean cosine {cos}, skipped steps {trainer.skipped_steps}, {seconds:.1f}s"
    )
    if args.out:
        write_json(args.out, result, indent=2)
    return 0


def _first_group(optimizer_state: dict) -> dict:
    """The first parameter group of an optimizer's ``state_dict`` (of the first per-parameter optimizer of an
    :class:`~guess_optim.optim.OptimizerInBackward`)."""
    if "optimizers" in optimizer_state:
        optimizer_state = optimizer_state["optimizers"][0] if optimizer_state["optimizers"] else {}
    groups = optimizer_state.get("param_groups") or [{}]
    return groups[0]


def _check_resumed_hyperparameters(trainer: GuessedGradientTrainer) -> None:
    """``--resume`` with another ``--lr``, ``--weight-decay`` or ``--momentum`` than the checkpoint's: torch's
    ``Optimizer.load_state_dict`` restores the saved values, so the flags would be ignored silently (the CLI has no
    schedule that changes them). Raises :class:`~guess_optim.trainer.CheckpointError` (part ``"hyperparameters"``)
    before anything is loaded; and whatever else ``fit(resume=True)`` raises for the checkpoint."""
    state = trainer._read_checkpoint()
    saved, here = _first_group(state["optimizer"]), _first_group(trainer.optimizer.state_dict())
    for key, flag in _HYPERPARAMETER_FLAGS.items():
        if key in saved and key in here and float(saved[key]) != float(here[key]):
            raise CheckpointError(
                f"the checkpoint at {trainer.checkpoint_path!r} was written with {flag} {saved[key]:g}, not "
                f"{here[key]:g}", part="hyperparameters")


_DELEGATED = {
    "cosine": "every method's cosine to backprop along a backprop trajectory (paper Fig. 1 left); the same command as "
    "'guess-optim reproduce cosine' (guess-optim cosine --help)",
    "reproduce": "reproduce the paper's tables and figures (guess-optim reproduce --help)",
    "bench": "time and memory of guessed steps against backprop (guess-optim bench --help)",
}


def _run_delegated(command: str, argv: list[str]) -> int:
    if command == "cosine":  # one implementation and one set of defaults: the reproduction's
        if any(a == "--out" or a.startswith("--out=") for a in argv):
            print("guess-optim cosine: error: --out FILE.json was replaced by --out-dir DIR, which receives "
                  "cosine.json and cosine.png (as guess-optim reproduce cosine)", file=sys.stderr)
            return 2
        from .reproduce import main as reproduce_main

        return reproduce_main(["cosine", *argv], prog="guess-optim")
    if command == "reproduce":
        from .reproduce import main as reproduce_main

        return reproduce_main(argv, prog="guess-optim reproduce")
    from .bench import main as bench_main

    return bench_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``guess-optim`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Exit codes: 0 on success; 2 for bad flags (argparse; also a ``--device`` this machine does not have, a ``--model``
    that does not fit the ``--dataset``, an ``--out`` or ``--checkpoint-dir`` where nothing can be written), a
    missing dataset, or a ``--resume`` checkpoint that cannot be read or was written with other flags (the message
    goes to stderr, without a traceback, and nothing is trained or overwritten); 130 on ``KeyboardInterrupt``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # sub-commands with parsers of their own
        return _run_delegated(argv[0], argv[1:])
    parser, train_parser = _build_parser()  # train_parser.error: "guess-optim train: error: ..."
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.resume and not args.checkpoint_dir:
            train_parser.error("--resume needs --checkpoint-dir DIR (the directory that holds last.pt)")
        if get_estimator(args.method).space == "backprop" and (args.num_guesses != 1 or args.exact_head):
            train_parser.error(f"--num-guesses and --exact-head apply to guessed methods, not --method {args.method}")
        if args.gradient_release and args.method == "backprop":
            train_parser.error("--gradient-release applies to guessed methods (backprop's gradients are not checked "
                               "for being finite before an in-backward step); drop it or choose another --method")
        if args.gradient_release and args.track_cosine:
            train_parser.error("--track-cosine reads the estimate after backward, but --gradient-release applies and "
                               "frees it inside backward: pass --track-cosine 0")
        if args.method == "backprop" and args.store is not None:
            train_parser.error("--store applies to guessed methods (backprop keeps what autograd keeps)")
        if args.momentum and args.optimizer != "sgd":
            train_parser.error(f"--momentum applies to --optimizer sgd only, not {args.optimizer!r}")
        if args.model == "convnet" and args.dataset in _SEQUENCE_DATASETS:
            images = ", ".join(d for d in DATASETS if d not in _SEQUENCE_DATASETS)
            train_parser.error(f"--model convnet is a 2-D ConvNet for the image datasets ({images}); --dataset "
                         f"{args.dataset} holds 1-D sequences: use --model mlp with it")
        if args.checkpoint_dir:  # fail now, not after the first epoch, if checkpoints cannot be written there
            try:
                ensure_writable_dir(args.checkpoint_dir)
            except ValueError as err:
                train_parser.error(f"--checkpoint-dir: {err}")
    if args.out:  # fail now, not after training, if the results cannot be written there
        if os.path.isdir(args.out):
            train_parser.error(f"--out: {args.out!r} is a directory; give a file name, such as "
                         f"{os.path.join(args.out, 'result.json')!r}")
        try:
            ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)))
        except ValueError as err:
            train_parser.error(f"--out: {err}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except FileNotFoundError as err:
        print(f"guess-optim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # raised before the checkpoint is loaded: nothing was trained or written
        print(f"guess-optim {args.command}: error: cannot --resume: {err}; {_RESUME_HINTS[err.part]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"guess-optim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
