"""Guessed gradients in the Hugging Face ``Trainer``: a callback, and a ``Trainer`` subclass that adds it.

:class:`GuessedGradientCallback` attaches :func:`guess_optim.attach` to the Trainer's model when training begins and
removes it when training ends. Everything else is the Trainer's own loop: the estimates reach ``p.grad`` through
autograd (README, "How it works"), so gradient accumulation, loss scaling, ``max_grad_norm`` clipping, DDP's
all-reduce, LR schedulers, logging, checkpoints and evaluation (which runs the plain model: eval mode, no grad) work
unchanged.
What the callback adds:

* **Head.** Hugging Face models return a ``ModelOutput`` and compute their loss inside ``forward``; the guessing
  region must end at the module producing the logits. It is found automatically (``classifier`` or ``score`` of the
  model, or of a ``peft`` model's base model; else a language model's ``lm_head``), or given as ``head=`` /
  ``head_fn=``.
* **Seeds.** The handle's seed is ``seed`` (default: ``TrainingArguments.seed``) plus the process index, so the
  processes of a distributed run draw independent guesses; a single process draws exactly what
  ``attach(model, seed=seed)`` draws.
* **Skipped steps.** A micro-batch whose estimate is not finite writes nothing (``handle.skipped_steps`` counts
  it). The Trainer steps the optimizer unconditionally, so in ``on_pre_optimizer_step`` the callback drops the whole
  optimizer step when any micro-batch of it (on any process) was skipped: every trainable ``p.grad`` is set to
  ``None``, which PyTorch optimizers skip (no update, no weight decay, no moment update); the LR scheduler still
  advances. Counted in ``guess_skipped_optimizer_steps``; without this, gradient accumulation would step on the
  sum of the finite micro-batches only (and, under DDP, a skipped process contributes zeros to the average). Under
  fp16 with a ``GradScaler`` the dropped step also backs off the loss scale, as an overflow does with backprop.
* **Checkpoints.** ``on_save`` writes the handle's generator state to ``checkpoint-N/guess_optim_state.pt``
  (``guess_optim_state_rank{r}.pt`` per process when distributed); resuming restores it, so a resumed run draws
  the guesses an uninterrupted run would have drawn.
* **Logging.** ``guess_skipped_steps``, ``guess_skipped_optimizer_steps`` and, every ``log_cosine_every`` optimizer
  steps, ``guess_cosine`` are added to the Trainer's training logs (see :class:`GuessedGradientCallback` for what
  the cosine measures).

Example::

    from transformers import TrainingArguments
    from guess_optim.integrations.hf import HFGuessedGradientTrainer

    trainer = HFGuessedGradientTrainer(
        model=model, args=TrainingArguments("out", max_steps=1000, gradient_accumulation_steps=4),
        train_dataset=train, eval_dataset=test,
        guess_method="wt", guess_kwargs={"log_cosine_every": 100}, guess_optimizer="stable-adamw",
    )
    trainer.train()

Requires ``transformers`` (``pip install "guess-optim[hf]"``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from guess_optim import attach, handle_of
from guess_optim._checks import check_choice, check_int
from guess_optim._io import atomic_write
from guess_optim._rng import capture_rng, cuda_devices, replayed_rng
from guess_optim.diagnostics import gradient_cosine
from guess_optim.estimators import get_estimator
from guess_optim.optim import OPTIMIZERS, optimizer_cls_and_kwargs

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as _err:  # pragma: no cover - exercised by a test with transformers hidden
    raise ImportError(
        f'guess_optim.integrations.hf needs transformers: pip install "guess-optim[hf]" ({_err})'
    ) from _err

__all__ = ["GUESS_OPTIMIZERS", "STATE_NAME", "GuessedGradientCallback", "HFGuessedGradientTrainer", "find_head"]


STATE_NAME = "guess_optim_state"
"""Stem of the file the callback writes into each checkpoint folder (``.pt``; ``_rank{r}.pt`` when distributed)."""

GUESS_OPTIMIZERS: tuple[str, ...] = OPTIMIZERS
"""Values of ``guess_optimizer=`` besides ``None`` (the Trainer's ``args.optim``): :data:`guess_optim.optim.OPTIMIZERS`,
built by :func:`guess_optim.optim.optimizer_cls_and_kwargs`."""

_HEAD_NAMES = ("classifier", "score")


def find_head(model: nn.Module) -> nn.Module | None:
    """The module that produces the logits of a Hugging Face classification model, for ``attach(head=...)``.

    Looks for ``classifier`` (``*ForImageClassification``, most ``*ForSequenceClassification``, and
    :class:`~guess_optim.integrations.vpt.VisualPromptTuning`) or ``score`` (decoder-only
    ``*ForSequenceClassification``) on the model, or on the base model of a ``peft`` model (where it may be a
    ``ModulesToSaveWrapper``); failing that, the output embeddings of a language model
    (``get_output_embeddings()``: ``lm_head`` of ``*ForCausalLM``, also when tied to the input embeddings).

    Returns:
        The head module, or ``None`` if the model has none of these attributes.
    """
    candidates = [model]
    if callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
        candidates.insert(0, model.get_base_model())
    for base in candidates:
        for name in _HEAD_NAMES:
            head = getattr(base, name, None)
            if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
                return head
    for base in candidates:  # language models: the output embeddings (``lm_head``)
        get = getattr(base, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module):
            return head
    return None


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GuessedGradientCallback(TrainerCallback):
    """Train with guessed gradients in a ``transformers.Trainer``: ``trainer.add_callback(GuessedGradientCallback())``.

    Attaches :func:`guess_optim.attach` to the Trainer's (unwrapped) model in ``on_train_begin`` — after the model was
    wrapped (DDP) and the optimizer was created — and removes it in ``on_train_end``. Under DDP the handle sits on
    the inner module: its forward hooks run inside DDP's forward, and the estimates reach DDP's gradient hooks
    through autograd like backprop's gradients. See the module docstring for skipped steps, checkpoints and seeds.

    **Cosine logging** (``log_cosine_every=N``): on every ``N``-th optimizer step the callback keeps the inputs
    (and the global RNG state, for dropout) of the step's training micro-batches, and in ``on_pre_optimizer_step``
    compares the estimate the optimizer is about to apply — ``p.grad`` accumulated over those micro-batches, after
    ``max_grad_norm`` clipping and DDP averaging (clipping and loss scaling do not change a cosine) — with the exact
    backprop gradient of the same micro-batches: each is replayed through the model with the handle paused, the
    same inputs and dropout masks, and its loss taken as the Trainer's default ``compute_loss`` does
    (``outputs["loss"]``, or ``outputs[0]``), differentiated with ``torch.autograd.grad`` (``p.grad`` is not
    touched), summed, and averaged over processes. The result, over all trainable parameters concatenated, is
    logged as ``guess_cosine`` (paper §3, Fig. 1). It costs one backprop pass per micro-batch of that step. A
    custom ``compute_loss``, ``compute_loss_func`` or label smoothing is not reflected in the reference.

    Args:
        method: guessing method, one of :data:`guess_optim.METHODS` (paper §2, A.4). (default: ``"wt"``)
        seed: seed of the guesses; process ``r`` of a distributed run uses ``seed + r``. (default: ``None``:
            ``TrainingArguments.seed``)
        log_cosine_every: log the cosine similarity to backprop every this many optimizer steps; 0 disables it.
            (default: 0)
        head: the module producing the logits (the end of the guessing region). (default: found by
            :func:`find_head`; the model itself if it has no ``classifier``/``score``/``lm_head`` and is not a
            ``transformers.PreTrainedModel``)
        head_fn: ``head_fn(model) -> module``, called at ``on_train_begin`` instead of ``head=``. (default: ``None``)
        **attach_kwargs: passed on to :func:`guess_optim.attach` (``num_guesses``, ``exact_head``,
            ``raw_parameters``, ``store``, ...).

    Attributes:
        handle: the :class:`~guess_optim.GuessHandle` while training, else ``None``.
        skipped_optimizer_steps: optimizer steps dropped because an estimate was not finite.
        last_cosine: the last cosine measured (``None`` before the first).
        resume_from_checkpoint: a checkpoint folder to restore the guess state from on resume (set by
            :meth:`HFGuessedGradientTrainer.train`); otherwise ``args.resume_from_checkpoint`` or
            ``output_dir/checkpoint-{global_step}`` is searched.

    Raises:
        ValueError: unknown method, invalid ``seed``/``log_cosine_every``, both ``head`` and ``head_fn``, or (at
            ``on_train_begin``) a Hugging Face model whose head cannot be found.
        RuntimeError: (at ``on_train_begin``) the model already has a handle attached by someone else.
    """

    def __init__(
        self,
        method: str = "wt",
        *,
        seed: int | None = None,
        log_cosine_every: int = 0,
        head: nn.Module | None = None,
        head_fn: Callable[[nn.Module], nn.Module] | None = None,
        **attach_kwargs: Any,
    ):
        get_estimator(method)  # the registry's ValueError for an unknown method, before any training starts
        seed = check_int("seed", seed, low=0, none_ok=True)
        n = check_int("log_cosine_every", log_cosine_every, low=0)
        if head is not None and head_fn is not None:
            raise ValueError("pass either head= or head_fn=, not both")
        for key in ("model", "method", "seed", "head"):
            if key in attach_kwargs:
                raise ValueError(f"{key}= is set by the callback; it cannot be passed in attach_kwargs")
        self.method = method
        self.seed = seed
        self.log_cosine_every = n
        self.head = head
        self.head_fn = head_fn
        self.attach_kwargs = attach_kwargs
        self.handle = None
        self.skipped_optimizer_steps = 0
        self.last_cosine: float | None = None
        self.resume_from_checkpoint: str | None = None
        self._model: nn.Module | None = None
        self._recorder = None
        self._records: list[tuple[tuple, dict, dict]] = []
        self._measure = False
        self._replaying = False
        self._skips_at_step_begin = 0
        self._cosine_pending = False
        self._backoff: tuple[Any, float] | None = None

    # ------------------------------------------------------------------------------------------ attach/remove
    def _resolve_head(self, model: nn.Module) -> nn.Module | None:
        if self.head_fn is not None:
            return self.head_fn(model)
        if self.head is not None:
            return self.head
        head = find_head(model)
        if head is None and isinstance(model, transformers.PreTrainedModel):
            raise ValueError(
                f"cannot find the module producing the logits of {type(model).__name__} (no 'classifier', 'score' or "
                "output embeddings); "
                "pass GuessedGradientCallback(head=<module>) or head_fn=lambda model: <module>"
            )
        return head

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("GuessedGradientCallback needs the Trainer's model (on_train_begin got model=None)")
        self._detach()  # a previous train() that raised leaves its handle attached
        existing = handle_of(model)
        if existing is not None:
            raise RuntimeError(
                f"the model already has guessed gradients attached ({existing!r}); remove that handle, or drop "
                "GuessedGradientCallback and keep your own attach()"
            )
        rank, _ = _world()
        seed = (args.seed if self.seed is None else self.seed) + rank
        self.handle = attach(model, self.method, seed=seed, head=self._resolve_head(model), **self.attach_kwargs)
        self._model = model
        self.skipped_optimizer_steps = 0
        self.last_cosine, self._cosine_pending = None, False
        if state.global_step > 0:
            self._restore(args, state)
        if self.log_cosine_every:
            self._recorder = model.register_forward_pre_hook(self._record, with_kwargs=True, prepend=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()
        return control

    def _detach(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        if self.handle is not None:
            with contextlib.suppress(RuntimeError):  # already removed by the user
                self.handle.remove()
        self.handle, self._model, self._records = None, None, []

    # ------------------------------------------------------------------------------------- skipped steps, cosine
    def on_step_begin(self, args, state, control, **kwargs):
        if self.handle is not None:
            self._skips_at_step_begin = self.handle.skipped_steps
            n = self.log_cosine_every
            self._measure = bool(n) and (state.global_step + 1) % n == 0
            self._records = []
        return control

    def _record(self, module, args, kwargs):
        """Forward pre-hook (runs before the engine's): keep a measured step's micro-batch inputs and RNG state."""
        if (not self._measure or self._replaying or not module.training or not torch.is_grad_enabled()
                or torch.is_inference_mode_enabled() or (self.handle is not None and self.handle.in_internal_forward)):
            return None
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        self._records.append((args, dict(kwargs), capture_rng(cuda_devices(tensors))))
        return None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        model, handle = self._model, self.handle
        if handle is None:
            return control
        skipped = handle.skipped_steps > self._skips_at_step_begin
        rank, world = _world()
        if world > 1:  # every process must drop the step, or the replicas diverge
            flag = torch.tensor([float(skipped)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skipped = bool(flag.item())
        if skipped:
            self._drop_step(model, optimizer)
        elif self._measure and self._records:
            self.last_cosine = self._cosine(model, world)
            self._cosine_pending = True
        self._records, self._measure = [], False
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._backoff is not None:  # a dropped step under a GradScaler: back off as for an overflow
            scaler, scale = self._backoff
            self._backoff = None
            scaler.update(new_scale=scale * scaler.get_backoff_factor())
        return control

    def _drop_step(self, model: nn.Module, optimizer: Any) -> None:
        """Make the coming ``optimizer.step()`` a no-op: every trainable ``p.grad`` becomes ``None``.

        Under fp16 with a ``GradScaler`` (accelerate's optimizer wrapper holds it as ``.scaler``), a non-finite
        estimate is most likely an overflow of the scaled loss, which backprop would have reported to the scaler as an
        ``inf`` gradient. ``GradScaler.step`` refuses an optimizer without gradients, so the gradients are first
        unscaled as zeros (a no-op when ``clip_grad_norm_`` already unscaled them), and after the step the scale is
        backed off (``on_optimizer_step``), as the scaler does on an overflow.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and callable(getattr(scaler, "unscale_", None)) and scaler.is_enabled():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            with contextlib.suppress(RuntimeError):  # "unscale_() has already been called" by clip_grad_norm_
                scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
            self._backoff = (scaler, scaler.get_scale())
        for p in params:
            p.grad = None
        self.skipped_optimizer_steps += 1

    def _cosine(self, model: nn.Module, world: int) -> float:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        estimate = {n: p.grad for n, p in named}
        reference = [torch.zeros_like(p) for p in params]
        self._replaying = True
        try:
            for fargs, fkwargs, rng in self._records:
                with replayed_rng(rng), self.handle.paused(), torch.enable_grad():
                    out = model(*fargs, **fkwargs)
                    loss = out["loss"] if isinstance(out, dict) else out[0]
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for r, g in zip(reference, grads, strict=True):
                    if g is not None:
                        r.add_(g)
        finally:
            self._replaying = False
        if world > 1:
            for r in reference:
                torch.distributed.all_reduce(r)
        return gradient_cosine(model, estimate, dict(zip(names, reference, strict=True))).total

    # ------------------------------------------------------------------------------------------------ logging
    def metrics(self, logs: dict[str, float] | None = None) -> dict[str, float]:
        """The guess metrics to add to a training log: ``guess_skipped_steps`` (micro-batches whose estimate was not
        finite, since the run began), ``guess_skipped_optimizer_steps`` (optimizer steps dropped for it) and
        ``guess_cosine`` (when a new one was measured since the last log). Empty for evaluation logs."""
        if self.handle is None or (logs is not None and "loss" not in logs and "train_loss" not in logs):
            return {}
        out = {"guess_skipped_steps": float(self.handle.skipped_steps),
               "guess_skipped_optimizer_steps": float(self.skipped_optimizer_steps)}
        if self._cosine_pending:
            out["guess_cosine"] = self.last_cosine
            self._cosine_pending = False
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        # HFGuessedGradientTrainer adds the metrics before Trainer.log; with a plain Trainer they are added here, which
        # reaches state.log_history and the callbacks after this one (progress bar/printer), not the reporting
        # integrations (tensorboard, wandb, ...) that the Trainer places before user callbacks.
        if logs is None or "guess_skipped_steps" in logs:
            return control
        extra = self.metrics(logs)
        if extra:
            logs.update(extra)
            if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items()
                                          if k not in extra):
                state.log_history[-1].update(extra)
        return control

    # ------------------------------------------------------------------------------------ checkpoints, resume
    @staticmethod
    def state_file(checkpoint_dir: str, rank: int = 0, world_size: int = 1) -> str:
        """Path of the guess state of process ``rank`` in a checkpoint folder."""
        name = f"{STATE_NAME}.pt" if world_size <= 1 else f"{STATE_NAME}_rank{rank}.pt"
        return os.path.join(checkpoint_dir, name)

    def on_save(self, args, state, control, **kwargs):
        if self.handle is None:
            return control
        rank, world = _world()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        saved = {"handle": self.handle.state_dict(), "skipped_optimizer_steps": self.skipped_optimizer_steps,
                 "global_step": state.global_step, "method": self.method}
        atomic_write(self.state_file(folder, rank, world), lambda f: torch.save(saved, f))
        return control

    def _restore(self, args, state) -> None:
        rank, world = _world()
        folders = [self.resume_from_checkpoint, getattr(args, "resume_from_checkpoint", None),
                   os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in folders:
            if not isinstance(folder, str):
                continue
            path = self.state_file(folder, rank, world)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("global_step") != state.global_step:
                continue
            self.handle.load_state_dict(saved["handle"])
            self.skipped_optimizer_steps = int(saved.get("skipped_optimizer_steps", 0))
            return
        warnings.warn(
            f"resuming at step {state.global_step} without a guess_optim state ({STATE_NAME}*.pt) in the checkpoint: "
            "the guesses restart from the seed, so the run will not match an uninterrupted one",
            RuntimeWarning,
            stacklevel=2,
        )


class HFGuessedGradientTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with guessed gradients (adds a :class:`GuessedGradientCallback`).

    Compared with ``Trainer(..., callbacks=[GuessedGradientCallback(...)])`` it also puts the guess metrics into
    every training log before the reporting integrations see it, restores the guess state from exactly the
    checkpoint passed to ``train(resume_from_checkpoint=...)``, and builds any optimizer of
    :data:`guess_optim.optim.OPTIMIZERS` by name (``guess_optimizer=``).

    Args:
        *args: the ``Trainer``'s positional arguments.
        guess_method: the guessing method (``"backprop"`` trains exactly like the plain Trainer). (default: ``"wt"``)
        guess_kwargs: keyword arguments of :class:`GuessedGradientCallback` (``seed``, ``log_cosine_every``,
            ``head``, ``head_fn``, and :func:`guess_optim.attach`'s options). (default: ``None``)
        guess_optimizer: a name of :data:`guess_optim.optim.OPTIMIZERS` (``"stable-adamw"`` is
            :class:`~guess_optim.StableAdamW`), built by :func:`guess_optim.optim.optimizer_cls_and_kwargs` with the
            Trainer's parameter groups (no weight decay on biases and norms), ``lr=args.learning_rate``,
            ``args.weight_decay`` and, for the Adam family, ``betas=(args.adam_beta1, args.adam_beta2)`` and
            ``eps=args.adam_epsilon``; ``None`` keeps ``args.optim``. (default: ``None``)
        **kwargs: the ``Trainer``'s keyword arguments (``callbacks`` are kept, after the guess callback).

    Attributes:
        guess_callback: the :class:`GuessedGradientCallback`.

    Raises:
        ValueError: unknown ``guess_optimizer``, or ``guess_optimizer`` with ``optimizers=`` or
            ``optimizer_cls_and_kwargs=``; the callback's own errors.
    """

    def __init__(
        self,
        *args: Any,
        guess_method: str = "wt",
        guess_kwargs: dict[str, Any] | None = None,
        guess_optimizer: str | None = None,
        **kwargs: Any,
    ):
        check_choice("guess_optimizer", guess_optimizer, (None, *OPTIMIZERS))
        if guess_optimizer is not None and (
            kwargs.get("optimizer_cls_and_kwargs") is not None
            or any(o is not None for o in kwargs.get("optimizers", (None, None))[:1])
        ):
            raise ValueError("guess_optimizer cannot be combined with optimizers= or optimizer_cls_and_kwargs=")
        self.guess_optimizer = guess_optimizer
        self.guess_callback = GuessedGradientCallback(guess_method, **dict(guess_kwargs or {}))
        callbacks = [self.guess_callback, *(kwargs.pop("callbacks", None) or [])]
        super().__init__(*args, callbacks=callbacks, **kwargs)

    @property
    def guess_handle(self):
        """The :class:`~guess_optim.GuessHandle` while training, else ``None``."""
        return self.guess_callback.handle

    def create_optimizer(self, *args: Any, **kwargs: Any):
        if self.guess_optimizer is not None and self.optimizer is None:
            a = self.args
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(
                self.guess_optimizer, lr=a.learning_rate, weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
            )
        return super().create_optimizer(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        self.guess_callback.resume_from_checkpoint = path if isinstance(path, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(self.guess_callback.metrics(logs))
        super().log(logs, *args, **kwargs)


_DEPRECATED = {"GuessedGradientTrainer": "HFGuessedGradientTrainer"}


def __getattr__(name: str) -> Any:
    # ``GuessedGradientTrainer`` was this class's name until it was renamed so as not to share it with the plain loop,
    # guess_optim.GuessedGradientTrainer; the old name still works, with a DeprecationWarning.
    if name in _DEPRECATED:
        warnings.warn(
            f"guess_optim.integrations.hf.{name} is deprecated: it was renamed {_DEPRECATED[name]} "
            f"(guess_optim.GuessedGradientTrainer is the plain PyTorch loop); import {_DEPRECATED[name]} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_DEPRECATED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
