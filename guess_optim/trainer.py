"""A small plain-PyTorch training loop with guessed gradients: progress bar, evaluation, cosine tracking, checkpoints.

For people without a training framework (the ``guess-optim train`` command uses it). With a framework, call
:func:`~guess_optim.attach` in it instead: the loop below is nothing more than ``attach`` plus the usual
``zero_grad / loss.backward() / optimizer.step()``, skipping the step when the engine did not write an estimate.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ._checks import check_int
from ._io import atomic_write
from ._rng import capture_rng, cuda_devices, replayed_rng
from .diagnostics import backprop_gradient, gradient_cosine, read_grads
from .engine import attach
from .estimators import get_estimator
from .optim.in_backward import OptimizerInBackward

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "GuessedGradientTrainer", "atomic_write"]

CHECKPOINT_NAME = "last.pt"
"""File name of the checkpoint written to ``checkpoint_dir`` after every epoch."""

LossFn = Callable[[Tensor, Tensor], Tensor]


class CheckpointError(ValueError):
    """``fit(resume=True)`` cannot continue from ``checkpoint_dir/last.pt``: the file is unreadable or not a trainer's
    checkpoint, or it was written for another method, model or optimizer. Raised before anything is loaded or
    written; the message names the checkpoint and what differs.

    Attributes:
        part: what does not fit: ``"file"`` (unreadable, or not a checkpoint of this trainer), ``"method"``,
            ``"model"`` or ``"optimizer"``; the CLI adds ``"hyperparameters"`` (``--resume`` with another ``--lr``,
            ``--weight-decay`` or ``--momentum``).
    """

    def __init__(self, message: str, *, part: str = "file") -> None:
        super().__init__(message)
        self.part = part


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


class GuessedGradientTrainer:
    """Train a classifier with guessed gradients (or backprop) in a plain PyTorch loop.

    Each step is ``optimizer.zero_grad(set_to_none=True)``, ``loss_fn(model(x), y).backward()`` (which, with a
    guessing method attached, writes the estimate to ``p.grad``; paper §2) and ``optimizer.step()``, except when the
    engine reports a non-finite estimate (``handle.last_step_skipped``; for ``"backprop"``, a non-finite loss): then
    the optimizer does not step and the step is counted in :attr:`skipped_steps`. The method is attached with
    :func:`~guess_optim.attach` only for the duration of :meth:`fit` and removed at its end, also on errors and
    ``KeyboardInterrupt``.

    Example::

        trainer = GuessedGradientTrainer(model, torch.optim.AdamW(model.parameters()), method="wt", seed=0)
        history = trainer.fit(train_loader, test_loader, epochs=5)
        print(history[-1]["test_accuracy"])

    Batches are ``(inputs, targets)``; ``model(inputs)`` returns logits ``[B, C]`` and targets are class indices
    ``[B]`` (the accuracy is ``argmax(logits, -1) == targets``).

    Args:
        model: the model; moved to ``device``.
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters, or an
            :class:`~guess_optim.optim.OptimizerInBackward` (each parameter stepped during ``backward()`` as soon as
            its estimate is complete; ``gradient_release=True`` is then passed to :func:`~guess_optim.attach`, and
            with ``store="recompute"`` a step peaks at about one layer above the weights and optimizer state). A
            non-finite estimate is then skipped for its own parameter only (the others of that step are stepped)
            and the step counts in :attr:`skipped_steps`.
        method: a method of :data:`~guess_optim.METHODS` (``"backprop"`` trains with exact gradients).
            (default: ``"wt"``)
        loss_fn: ``loss_fn(logits, targets) -> scalar tensor``, mean over the batch. (default:
            ``F.cross_entropy``)
        seed: seed of the guesses (passed to :func:`~guess_optim.attach`). (default: 0)
        device: where the model and batches go. (default: ``"cpu"``)
        track_cosine: every ``track_cosine`` optimizer steps (counted over the whole run from step 0), the cosine
            similarity of the estimate in ``p.grad`` to the backprop gradient of the same batch (paper §3, Fig. 1);
            0 turns it off. The reference replays the step's global RNG state (same dropout masks; the training
            trajectory is not changed by tracking). (default: 0)
        progress: show a ``tqdm`` progress bar over each epoch's steps. (default: ``True``)
        verbose: print one line per epoch with ``tqdm.write``. (default: ``True``)
        checkpoint_dir: if given, save ``checkpoint_dir/last.pt`` atomically after every epoch (created if
            missing); ``fit(..., resume=True)`` continues from it. (default: ``None``)
        **attach_kwargs: passed on to :func:`~guess_optim.attach` (``exact_head``, ``num_guesses``, ``head``,
            ``downstream_layers``, ``distribution``, ``on_nonfinite``, ``store``, ``gradient_release``).

    Attributes:
        history: one dict per finished epoch (see :meth:`fit`).
        skipped_steps: steps whose optimizer step was skipped because the estimate (or loss) was not finite.
        cosines: ``(step, cosine)`` of every tracked step.
        global_step: batches processed so far.
        epoch: epochs finished so far.
        handle: the :class:`~guess_optim.GuessHandle` while :meth:`fit` runs, else ``None``.

    Raises:
        ValueError: unknown ``method`` (from :func:`~guess_optim.get_estimator`), ``track_cosine`` not an int
            >= 0, or ``seed`` not an int >= 0.
            With an :class:`~guess_optim.optim.OptimizerInBackward`: ``track_cosine`` > 0 (the estimate is freed
            inside ``backward()``), ``method="backprop"`` (its gradient would be applied before it is checked for
            being finite), or ``gradient_release=False``. With a regular ``torch.optim.Optimizer``:
            ``gradient_release=True`` (nothing would step the estimates inside ``backward()``).
        TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor an ``OptimizerInBackward``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        method: str = "wt",
        loss_fn: LossFn = F.cross_entropy,
        seed: int = 0,
        device: str | torch.device = "cpu",
        track_cosine: int = 0,
        progress: bool = True,
        verbose: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        **attach_kwargs: Any,
    ) -> None:
        get_estimator(method)  # unknown method: the registry's ValueError, before anything else
        track_cosine = check_int("track_cosine", track_cosine, low=0)
        seed = check_int("seed", seed, low=0)
        if not isinstance(optimizer, (torch.optim.Optimizer, OptimizerInBackward)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a guess_optim.optim.OptimizerInBackward, "
                            f"got {type(optimizer).__name__}")
        self.in_backward = isinstance(optimizer, OptimizerInBackward)
        if self.in_backward:
            _check_in_backward(method, track_cosine, attach_kwargs)
            attach_kwargs = {**attach_kwargs, "gradient_release": True}
        else:
            _check_regular(optimizer, attach_kwargs)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.method = method
        self.loss_fn = loss_fn
        self.seed = seed
        self.track_cosine = track_cosine
        self.progress = progress
        self.verbose = verbose
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.attach_kwargs = attach_kwargs
        self.history: list[dict[str, Any]] = []
        self.skipped_steps = 0
        self.cosines: list[tuple[int, float]] = []
        self.global_step = 0
        self.epoch = 0
        self.handle = None
        self._handle_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- training
    def fit(
        self,
        train_loader: Iterable,
        test_loader: Iterable | None = None,
        *,
        epochs: int,
        resume: bool = False,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are finished in total; evaluate after each.

        Args:
            train_loader: yields ``(inputs, targets)``; its ``generator`` (if any) is checkpointed so a resumed
                run shuffles exactly as an uninterrupted one. Its ``dataset`` (if it is a ``DataLoader``) is
                re-read in order, unshuffled, for the train accuracy.
            test_loader: evaluated after every epoch (``test_accuracy``/``test_loss`` are ``None`` without it).
                (default: ``None``)
            epochs: total number of epochs, counting those already done (by an earlier :meth:`fit` call on this
                trainer or restored from the checkpoint).
            resume: load ``checkpoint_dir/last.pt`` first (model, optimizer, guess generators, shuffling and
                global RNG state, history) and continue from the next epoch. (default: ``False``)

        Returns:
            :attr:`history`: per epoch ``{"epoch" (1-based), "train_loss" (mean over the epoch's steps whose loss
            was finite, ``None`` if none), "train_accuracy" (the whole train set in eval mode after the epoch,
            in [0, 1]), "train_eval_loss", "test_accuracy", "test_loss", "mean_cosine" (``None`` unless tracked in
            this epoch), "skipped_steps" (this epoch), "steps", "seconds" (wall time of the epoch, evaluation
            included)}``.

        Raises:
            ValueError: ``epochs`` not an int >= 1, or ``resume=True`` without ``checkpoint_dir``.
            CheckpointError: ``resume=True`` and ``checkpoint_dir/last.pt`` is unreadable, not a checkpoint of this
                trainer, or written for another method, model (parameter names or shapes) or optimizer (type or
                parameter groups); raised before anything is loaded or written.
            FileNotFoundError: ``resume=True`` and ``checkpoint_dir/last.pt`` does not exist.
        """
        epochs = check_int("epochs", epochs, low=1)
        if resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the directory that holds last.pt)")
        checkpoint = self._read_checkpoint() if resume else None
        if self.checkpoint_dir is not None:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.handle = attach(self.model, self.method, seed=self.seed, **self.attach_kwargs)
        try:
            if checkpoint is not None:
                self._restore(checkpoint, train_loader)
            elif self._handle_state is not None:  # a second fit() on this trainer continues the guess streams
                self.handle.load_state_dict(self._handle_state)
            while self.epoch < epochs:
                self._run_epoch(train_loader, test_loader, epochs)
                self._handle_state = self.handle.state_dict()
                if self.checkpoint_dir is not None:
                    self.save_checkpoint(train_loader)
        finally:
            self._handle_state = self.handle.state_dict()
            self.handle.remove()
            self.handle = None
        return self.history

    def _run_epoch(self, train_loader: Iterable, test_loader: Iterable | None, epochs: int) -> None:
        start = time.perf_counter()
        self.model.train()
        losses: list[float] = []
        cosines: list[float] = []
        skipped = steps = 0
        total = len(train_loader) if hasattr(train_loader, "__len__") else None
        bar = tqdm(
            train_loader,
            total=total,
            desc=f"epoch {self.epoch + 1}/{epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            x, y = _to(batch, self.device)
            loss, skip, cos = self._step(x, y)
            steps += 1
            if skip:
                skipped += 1
            if math.isfinite(loss):
                losses.append(loss)
            if cos is not None:
                cosines.append(cos)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        self.epoch += 1
        train_eval = self.evaluate(self._ordered(train_loader))
        test_eval = self.evaluate(test_loader) if test_loader is not None else {"loss": None, "accuracy": None}
        record = {
            "epoch": self.epoch,
            "train_loss": _mean(losses),
            "train_accuracy": train_eval["accuracy"],
            "train_eval_loss": train_eval["loss"],
            "test_accuracy": test_eval["accuracy"],
            "test_loss": test_eval["loss"],
            "mean_cosine": _mean(cosines),
            "skipped_steps": skipped,
            "steps": steps,
            "seconds": time.perf_counter() - start,
        }
        self.history.append(record)
        if self.verbose:
            tqdm.write(self._format(record, epochs))

    def _step(self, x: Any, y: Tensor) -> tuple[float, bool, float | None]:
        """One optimizer step; returns ``(loss, skipped, cosine or None)``."""
        step = self.global_step
        self.global_step += 1
        track = bool(self.track_cosine) and step % self.track_cosine == 0
        rng = capture_rng(cuda_devices(self.model.parameters())) if track else None  # the step's dropout masks
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        value = float(loss.detach())
        if self.handle.method.space == "backprop":
            skipped = not math.isfinite(value)
            if skipped:
                warnings.warn(
                    f"non-finite loss at step {step}: the optimizer step was skipped", RuntimeWarning, stacklevel=3
                )
        else:
            skipped = self.handle.last_step_skipped
        cos = None
        if track and not skipped:
            cos = self._cosine(x, y, rng)
            self.cosines.append((step, cos))
        if skipped:
            self.skipped_steps += 1
        elif not self.in_backward:  # an OptimizerInBackward stepped every parameter inside backward()
            self.optimizer.step()
        return value, skipped, cos

    def _cosine(self, x: Any, y: Tensor, rng: dict[str, Any]) -> float:
        """Cosine of ``p.grad`` (the estimate the optimizer is about to use) to backprop's gradient on ``(x, y)``,
        whose forward replays the global RNG state ``rng`` of the step's forward: the same dropout masks, and the
        training RNG stream is not moved."""
        with replayed_rng(rng):
            reference = backprop_gradient(self.model, (x, y), self.loss_fn)
        return gradient_cosine(self.model, read_grads(self.model), reference).total

    @staticmethod
    def _ordered(loader: Iterable) -> Iterable:
        """The loader's dataset in order (no shuffling, no RNG draw), for the train-set evaluation."""
        if isinstance(loader, DataLoader):
            return DataLoader(
                loader.dataset,
                batch_size=loader.batch_size or 256,
                shuffle=False,
                collate_fn=loader.collate_fn,
                num_workers=0,
            )
        return loader

    def _format(self, r: dict[str, Any], epochs: int) -> str:
        def f(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        parts = [
            f"epoch {r['epoch']}/{epochs}",
            f"train loss {f(r['train_loss'], '.4f')}",
            f"train acc {f(r['train_accuracy'], '.4f')}",
            f"test acc {f(r['test_accuracy'], '.4f')}",
        ]
        if self.track_cosine:
            parts.append(f"cosine {f(r['mean_cosine'], '.4f')}")
        parts += [f"skipped {r['skipped_steps']}", f"{r['seconds']:.1f}s"]
        return " | ".join(parts)

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float | None]:
        """Mean loss and accuracy of the model over ``loader`` in eval mode; the model's mode is restored after.

        Args:
            loader: yields ``(inputs, targets)``, targets class indices ``[B]``.

        Returns:
            ``{"loss": mean of loss_fn over examples (batch means weighted by batch size), "accuracy": fraction
            in [0, 1]}``; both ``None`` for an empty loader.
        """
        was_training = self.model.training
        self.model.eval()
        total = correct = 0
        loss_sum = 0.0
        try:
            for batch in loader:
                x, y = _to(batch, self.device)
                out = self.model(x)
                n = y.shape[0]
                loss_sum += float(self.loss_fn(out, y)) * n
                correct += int((out.argmax(-1) == y).sum())
                total += n
        finally:
            self.model.train(was_training)
        if total == 0:
            return {"loss": None, "accuracy": None}
        return {"loss": loss_sum / total, "accuracy": correct / total}

    # --------------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> str | None:
        """``checkpoint_dir/last.pt``, or ``None`` without a checkpoint directory."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, CHECKPOINT_NAME)

    def state_dict(self, train_loader: Iterable | None = None) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically.

        Args:
            train_loader: its ``generator`` state (the shuffling stream) is included if it has one.
                (default: ``None``)
        """
        gen = getattr(train_loader, "generator", None)
        handle_state = self.handle.state_dict() if self.handle is not None else self._handle_state
        return {
            "format": 1,
            "method": self.method,
            "optimizer_type": _optimizer_type(self.optimizer),
            "seed": self.seed,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "handle": handle_state,
            "loader_generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "cosines": [list(c) for c in self.cosines],
        }

    def save_checkpoint(self, train_loader: Iterable | None = None) -> str:
        """Save :meth:`state_dict` to ``checkpoint_dir/last.pt`` atomically (temp file + ``os.replace``).

        Returns:
            The checkpoint's path.

        Raises:
            ValueError: the trainer has no ``checkpoint_dir``.
        """
        path = self.checkpoint_path
        if path is None:
            raise ValueError("save_checkpoint() needs checkpoint_dir= in the constructor")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        state = self.state_dict(train_loader)
        atomic_write(path, lambda f: torch.save(state, f))
        return path

    def _read_checkpoint(self) -> dict[str, Any]:
        path = self.checkpoint_path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume=True but there is no checkpoint at {path!r}; run without resume first (it saves one "
                "after every epoch) or point checkpoint_dir at the directory holding last.pt"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling, zip and end-of-file errors, whatever the file holds
            raise CheckpointError(
                f"the checkpoint at {path!r} cannot be read ({_first_sentence(err)}): it is not a {CHECKPOINT_NAME} "
                "written by GuessedGradientTrainer, or it is damaged"
            ) from err
        missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(_CHECKPOINT_KEYS)
        if missing:
            raise CheckpointError(f"the file at {path!r} is not a checkpoint of GuessedGradientTrainer (it has no "
                                  f"{', '.join(missing)})")
        if state["method"] != self.method:
            raise CheckpointError(
                f"the checkpoint at {path!r} was written by method {state['method']!r}, not {self.method!r}",
                part="method",
            )
        why = _model_mismatch(state["model"], self.model.state_dict())
        if why:
            raise CheckpointError(f"the checkpoint at {path!r} was written for another model: {why}", part="model")
        written, here = state.get("optimizer_type"), _optimizer_type(self.optimizer)
        why = (f"it was written with {written}, this trainer has {here}" if written is not None and written != here
               else _optimizer_mismatch(state["optimizer"], self.optimizer.state_dict()))
        if why:
            raise CheckpointError(f"the checkpoint at {path!r} does not fit this optimizer: {why}", part="optimizer")
        return state

    def _restore(self, state: dict[str, Any], train_loader: Iterable) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("handle") is not None:
            self.handle.load_state_dict(state["handle"])
        gen = getattr(train_loader, "generator", None)
        if state.get("loader_generator") is not None and isinstance(gen, torch.Generator):
            gen.set_state(state["loader_generator"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.skipped_steps = int(state["skipped_steps"])
        self.cosines = [(int(s), float(c)) for s, c in state.get("cosines", [])]


_CHECKPOINT_KEYS = ("method", "epoch", "global_step", "model", "optimizer", "rng", "history", "skipped_steps")
"""What :meth:`GuessedGradientTrainer._restore` reads from every checkpoint."""


def _first_sentence(err: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's load errors run to several paragraphs)."""
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _model_mismatch(saved: Any, current: dict[str, Tensor]) -> str | None:
    """How the checkpoint's model ``state_dict`` differs from ``current`` (names and shapes); ``None`` if it fits."""
    if not isinstance(saved, dict):
        return f"its model state is a {type(saved).__name__}, not a state_dict"
    shapes = [f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here" for k, v in current.items()
              if isinstance(saved.get(k), Tensor) and tuple(saved[k].shape) != tuple(v.shape)]
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    parts = [_few(shapes)] if shapes else []
    parts += [f"not in the checkpoint: {_few(missing)}"] if missing else []
    parts += [f"not in this model: {_few(unexpected)}"] if unexpected else []
    return "; ".join(parts) or None


def _optimizer_type(optimizer: Any) -> str:
    """The optimizer's class name (``OptimizerInBackward(AdamW)`` for one that steps in backward), recorded in
    checkpoints."""
    if isinstance(optimizer, OptimizerInBackward):
        inner = sorted({type(o).__name__ for o in optimizer.optimizers.values()})
        return f"{type(optimizer).__name__}({', '.join(inner)})"
    return type(optimizer).__name__


def _optimizer_mismatch(saved: Any, current: dict[str, Any]) -> str | None:
    """How the checkpoint's optimizer ``state_dict`` differs from ``current`` in structure (entries, parameter groups
    and their sizes, hyper-parameter names); ``None`` if it fits.

    Hyper-parameters are compared leniently (a checkpoint of an older or newer torch may lack or add a few): they
    differ only when each side has names the other lacks (AdamW's ``betas`` against SGD's ``momentum``).
    """
    if not isinstance(saved, dict) or set(saved) != set(current):
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        return f"its optimizer state holds {keys}, this optimizer's {sorted(current)}"
    if "optimizers" in current:  # OptimizerInBackward: one optimizer per parameter
        if len(saved["optimizers"]) != len(current["optimizers"]):
            return f"{len(saved['optimizers'])} per-parameter optimizers there, {len(current['optimizers'])} here"
        return next(filter(None, map(_optimizer_mismatch, saved["optimizers"], current["optimizers"])), None)
    groups, here = saved.get("param_groups", []), current.get("param_groups", [])
    if len(groups) != len(here):
        return f"{len(groups)} parameter groups there, {len(here)} here"
    for i, (g, h) in enumerate(zip(groups, here, strict=True)):
        if len(g["params"]) != len(h["params"]):
            return f"parameter group {i} holds {len(g['params'])} parameters there, {len(h['params'])} here"
        only_there, only_here = sorted(set(g) - set(h)), sorted(set(h) - set(g))
        if only_there and only_here:
            return (f"hyper-parameters {', '.join(only_there)} there, {', '.join(only_here)} here "
                    "(another optimizer type)")
    return None


def _check_in_backward(method: str, track_cosine: int, attach_kwargs: dict[str, Any]) -> None:
    """What an :class:`~guess_optim.optim.OptimizerInBackward` cannot be trained with (ValueError naming the fix)."""
    if get_estimator(method).space == "backprop":
        raise ValueError("method='backprop' with an OptimizerInBackward would step each parameter before the trainer "
                         "can see a non-finite loss; use a regular torch.optim optimizer for backprop")
    if track_cosine:
        raise ValueError("track_cosine reads the estimate in p.grad after backward(), but an OptimizerInBackward "
                         "applies and frees it inside backward(): pass track_cosine=0, or a regular optimizer")
    if attach_kwargs.get("gradient_release", True) is not True:
        raise ValueError("an OptimizerInBackward needs gradient_release=True (each estimate handed to its parameter's "
                         "hook as soon as it is complete); leave gradient_release out or pass True")


def _check_regular(optimizer: torch.optim.Optimizer, attach_kwargs: dict[str, Any]) -> None:
    """What a regular ``torch.optim`` optimizer (stepped after ``backward()``) cannot be trained with (ValueError
    naming the fix)."""
    if attach_kwargs.get("gradient_release"):
        raise ValueError(
            f"gradient_release=True hands each estimate to a hook that steps its parameter inside backward(), but "
            f"{type(optimizer).__name__} is a regular optimizer stepped after backward(): nothing would step in "
            "backward (a warning every step, and a plain loop). Pass a guess_optim.optim.OptimizerInBackward "
            "(gradient_release is then set for you), or drop gradient_release"
        )
