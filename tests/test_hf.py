"""Hugging Face Trainer integration (guess_optim/integrations/hf.py): estimates, accumulation, clipping, skipped steps,
checkpoints and resume, evaluation, logging, head discovery, optional dependency."""

from __future__ import annotations

import copy
import importlib
import math
import os
import stat
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from guess_optim import StableAdamW, attach, handle_of  # noqa: E402
from guess_optim.integrations.hf import (  # noqa: E402
    STATE_NAME,
    GuessedGradientCallback,
    HFGuessedGradientTrainer,
    find_head,
)
from guess_optim.integrations.vpt import VisualPromptTuning, VPTConfig  # noqa: E402

HINT = r'pip install "guess-optim\[hf\]"'
GUESS_KEYS = {"guess_skipped_steps", "guess_skipped_optimizer_steps"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Images(torch.utils.data.Dataset):
    """Random 16x16 images with 3 classes, as dicts the Trainer's default collator stacks."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3))


def vpt_model(seed: int = 0) -> VisualPromptTuning:
    # prompt_dropout=0: the plain-PyTorch replay below then needs no RNG bookkeeping
    return VisualPromptTuning(tiny_vit(seed), VPTConfig(num_prompt_tokens=2, deep=True, prompt_dropout=0.0))


def arguments(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-2, max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


class Spy(TrainerCallback):
    """Keeps p.grad as the optimizer is about to see it, and the trainable parameters after each step."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: None if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters() if p.requires_grad})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def record_inputs(model, calls, *, corrupt_call=None):
    """Forward pre-hook keeping each training forward's kwargs (optionally NaN-ing one call's pixels). Nested calls
    (the engine's graph-discovery forward runs inside the step's forward) are not recorded."""
    depth = [0]

    def hook(module, args, kwargs):
        depth[0] += 1
        if depth[0] > 1 or not (module.training and torch.is_grad_enabled()):
            return None
        calls.append({k: v.clone() for k, v in kwargs.items()})
        if corrupt_call is not None and len(calls) - 1 == corrupt_call:
            return args, {**kwargs, "pixel_values": torch.full_like(kwargs["pixel_values"], float("nan"))}
        return None

    def leave(module, args, output):
        depth[0] -= 1

    pre = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    post = model.register_forward_hook(leave, always_call=True)
    return _BothHooks(pre, post)


class _BothHooks:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A plain Trainer + GuessedGradientCallback: 4 optimizer steps of 2 micro-batches, checkpoints every 2 steps,
    evaluation every 2 steps, the cosine to backprop logged every 2 steps."""
    out = tmp_path_factory.mktemp("trainer")
    model = vpt_model()
    initial = copy.deepcopy(model)
    spy, calls = Spy(), []
    hook = record_inputs(model, calls)
    args = arguments(out, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)
    callback = GuessedGradientCallback("wt", log_cosine_every=2)
    trainer = Trainer(model=model, args=args, train_dataset=Images(), eval_dataset=Images(8, seed=1),
                      callbacks=[callback, spy])
    trainer.train()
    hook.remove()
    return {"out": out, "model": model, "initial": initial, "spy": spy, "calls": calls, "trainer": trainer,
            "callback": callback}


def test_estimates_equal_plain_pytorch_accumulation(run):
    """The Trainer's first optimizer step sees exactly attach() + the same two micro-batches + (loss / 2).backward()."""
    model = run["initial"]
    calls = run["calls"]
    # 4 steps x 2 micro-batches, and the backprop replays of steps 2 and 4's micro-batches for the cosine
    assert len(calls) == 12
    for replay, original in ((4, 2), (5, 3), (10, 8), (11, 9)):
        assert all(torch.equal(calls[replay][k], calls[original][k]) for k in calls[original])
    with attach(model.train(), "wt", head=model.classifier, seed=0):  # seed = TrainingArguments.seed + rank 0
        for kwargs in calls[:2]:
            (model(**kwargs).loss / 2).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = run["spy"].grads[0]
    assert set(got) == set(expected) and all(g is not None for g in got.values())
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-7)


def test_backbone_bit_identical_and_handle_removed(run):
    model, initial = run["model"], run["initial"]
    for (n, p), q in zip(model.vit.named_parameters(), initial.vit.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not any(torch.equal(p, q) for p, q in zip(model.prompts.parameters(), initial.prompts.parameters(),
                                                        strict=True))
    assert handle_of(model) is None and run["callback"].handle is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_logs_checkpoints_and_evaluation(run):
    history = run["trainer"].state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 4 and all(GUESS_KEYS <= set(h) for h in train_logs)
    cosines = {h["step"]: h["guess_cosine"] for h in train_logs if "guess_cosine" in h}
    assert sorted(cosines) == [2, 4] and all(-1.0 <= c <= 1.0 and math.isfinite(c) for c in cosines.values())
    assert all(h["guess_skipped_steps"] == 0 for h in train_logs)
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4] and not any(GUESS_KEYS & set(h) for h in evals)
    for step in (2, 4):
        folder = run["out"] / f"checkpoint-{step}"
        assert (folder / f"{STATE_NAME}.pt").is_file() and (folder / "optimizer.pt").is_file()
        saved = torch.load(folder / f"{STATE_NAME}.pt", weights_only=True)
        assert saved["global_step"] == step and saved["handle"]["seed"] == 0
        if os.name == "posix":  # an ordinary file's mode, not mkstemp's 0600
            assert stat.S_IMODE(os.stat(folder / f"{STATE_NAME}.pt").st_mode) == 0o666 & ~current_umask()
    # evaluation runs the plain model: the Trainer's eval loss is the eval-mode, no-grad loss
    model = run["model"].eval()
    data = Images(8, seed=1)
    with torch.no_grad():
        loss = model(pixel_values=data.x, labels=data.y).loss.item()
    assert evals[-1]["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_resume_matches_uninterrupted_run(run, tmp_path):
    """Resuming from checkpoint-2 (optimizer, scheduler, data order and guess generators) ends bit-identical to the
    uninterrupted run; HFGuessedGradientTrainer restores from exactly the checkpoint it is given."""
    out = tmp_path / "resumed"
    checkpoint = str(out / "checkpoint-2")
    import shutil

    shutil.copytree(run["out"] / "checkpoint-2", checkpoint)
    model = vpt_model()
    args = arguments(out, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = HFGuessedGradientTrainer(model=model, args=args, train_dataset=Images(), eval_dataset=Images(8, seed=1),
                                     guess_method="wt")
    trainer.train(resume_from_checkpoint=checkpoint)
    for (n, p), q in zip(model.named_parameters(), run["model"].parameters(), strict=True):
        assert torch.equal(p, q), n
    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] > 2]
    assert len(logs) == 2 and all(GUESS_KEYS <= set(h) for h in logs)

    # without the guess state the run still resumes, with a warning (the guesses restart from the seed)
    os.remove(os.path.join(checkpoint, f"{STATE_NAME}.pt"))
    model = vpt_model()
    trainer = HFGuessedGradientTrainer(model=model, args=arguments(tmp_path / "again"), train_dataset=Images())
    with pytest.warns(RuntimeWarning, match="without a guess_optim state"):
        trainer.train(resume_from_checkpoint=checkpoint)
    assert not all(torch.equal(p, q) for p, q in zip(model.prompts.parameters(), run["model"].prompts.parameters(),
                                                        strict=True))


def test_cosine_reference_replays_the_dropout_masks(tmp_path):
    """The cosine's backprop reference replays each micro-batch under the global RNG state captured at its forward
    (guess_optim._rng): with method="backprop" and prompt dropout the estimate is the reference, cosine 1."""
    model = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=2, deep=True, prompt_dropout=0.5))
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Images(),
                      callbacks=[GuessedGradientCallback("backprop", log_cosine_every=1)])
    trainer.train()
    cosines = [h["guess_cosine"] for h in trainer.state.log_history if "guess_cosine" in h]
    assert len(cosines) == 2 and all(c == pytest.approx(1.0, abs=1e-6) for c in cosines)


def test_clipping_and_stable_adamw(tmp_path):
    spy = Spy()
    trainer = HFGuessedGradientTrainer(model=vpt_model(), args=arguments(tmp_path, max_steps=2, max_grad_norm=0.05),
                                     train_dataset=Images(), callbacks=[spy], guess_optimizer="stable-adamw")
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, StableAdamW)
    assert optimizer.defaults["lr"] == 1e-2
    for grads, log in zip(spy.grads, [h for h in trainer.state.log_history if "loss" in h], strict=True):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert log["grad_norm"] > 0.05  # the estimate's norm before clipping
        assert norm <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_guess_optimizer_comes_from_the_factory_with_the_trainers_groups(tmp_path, name):
    args = arguments(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-7)
    trainer = HFGuessedGradientTrainer(model=vpt_model(), args=args, train_dataset=Images(), guess_optimizer=name)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]  # none on biases and norms
    assert optimizer.defaults["lr"] == 1e-2
    if name == "adamw":
        assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-7


def test_non_finite_micro_batch_drops_the_optimizer_step(tmp_path):
    """NaN pixels in the first micro-batch of step 2: its estimate is skipped by the engine and the callback drops the
    whole step (the other micro-batch's estimate is not applied); the optimizer state does not advance."""
    model = vpt_model()
    spy, calls = Spy(), []
    hook = record_inputs(model, calls, corrupt_call=2)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Images(),
                      callbacks=[GuessedGradientCallback("wt"), spy])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.train()
    hook.remove()
    assert all(g is None for g in spy.grads[1].values())
    for n in spy.params[0]:
        assert torch.equal(spy.params[0][n], spy.params[1][n]), n
        assert not torch.equal(spy.params[1][n], spy.params[2][n]), n
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["guess_skipped_optimizer_steps"] for h in logs] == [0, 1, 1, 1]
    assert [h["guess_skipped_steps"] for h in logs] == [0, 1, 1, 1]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert all(int(s["step"]) == 3 for s in optimizer.state.values())


class ScaledOptimizer:
    """What accelerate's ``AcceleratedOptimizer`` does under fp16 (accelerate/optimizer.py, ``step``): holds the
    ``GradScaler`` as ``.scaler`` and the optimizer as ``.optimizer``; ``step()`` is ``scaler.step`` + ``update``."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


def test_dropped_step_under_grad_scaler_backs_off_the_scale():
    """fp16 + GradScaler: a dropped step must not crash GradScaler.step (which refuses an optimizer without
    gradients: "No inf checks were recorded") and must back off the scale, as an overflow under backprop does."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = ScaledOptimizer(torch.optim.AdamW(model.parameters()), scaler)
    args, state, control = TrainingArguments("unused", use_cpu=True, report_to=[]), TrainerState(), TrainerControl()
    callback = GuessedGradientCallback("wt", seed=0)
    callback.on_train_begin(args, state, control, model=model)
    callback.on_step_begin(args, state, control)
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        scaler.scale(nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0]))).backward()
    callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
    optimizer.step()
    callback.on_optimizer_step(args, state, control, optimizer=optimizer)
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert callback.skipped_optimizer_steps == 1
    callback.on_train_end(args, state, control)
    assert handle_of(model) is None


def test_plain_hf_model_head_found_and_raw_parameters(tmp_path):
    """A plain ViTForImageClassification (ModelOutput, loss inside forward): the head is found; its cls_token and
    position embeddings need raw_parameters="directional"."""
    spy = Spy()
    trainer = HFGuessedGradientTrainer(model=tiny_vit(), args=arguments(tmp_path, max_steps=1,
                                                                       gradient_accumulation_steps=1),
                                     train_dataset=Images(), callbacks=[spy], guess_method="wt",
                                     guess_kwargs={"raw_parameters": "directional"})
    trainer.train()
    grads = spy.grads[0]
    assert "vit.embeddings.cls_token" in grads
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers attribute
def test_find_head():
    vit = tiny_vit()
    assert find_head(vit) is vit.classifier
    wrapped = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=1))
    assert find_head(wrapped) is wrapped.classifier

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.score = nn.Linear(2, 2), nn.Linear(2, 3)

    decoder = Decoder()
    assert find_head(decoder) is decoder.score
    assert find_head(nn.Sequential(nn.Linear(2, 2))) is None
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                           modules_to_save=["classifier"]))
    head = find_head(lora)
    assert head is lora.base_model.model.classifier and type(head).__name__ == "ModulesToSaveWrapper"


def test_head_required_for_hf_model_without_one():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64))
    callback = GuessedGradientCallback("wt")
    args, state, control = TrainingArguments("unused", use_cpu=True, report_to=[]), TrainerState(), TrainerControl()
    with pytest.raises(ValueError, match="head"):
        callback.on_train_begin(args, state, control, model=model)
    head_fn = GuessedGradientCallback("wt", head_fn=lambda m: m.pooler, raw_parameters="directional")
    head_fn.on_train_begin(args, state, control, model=model)
    assert handle_of(model).head is model.pooler and handle_of(model).seed == args.seed
    with pytest.raises(RuntimeError, match="already has guessed gradients"):
        GuessedGradientCallback("wt", head=model.pooler).on_train_begin(args, state, control, model=model)
    head_fn.on_train_end(args, state, control)
    assert handle_of(model) is None


BAD_ARGUMENTS = [
    (lambda: GuessedGradientCallback("sgd"), ValueError, "method"),
    (lambda: GuessedGradientCallback(log_cosine_every=-1), ValueError, "log_cosine_every"),
    (lambda: GuessedGradientCallback(log_cosine_every=1.5), ValueError, "log_cosine_every"),
    (lambda: GuessedGradientCallback(seed=-3), ValueError, "seed"),
    (lambda: GuessedGradientCallback(head=nn.Linear(1, 1), head_fn=lambda m: m), ValueError, "either"),
    (lambda: GuessedGradientCallback(method="wt", model=None), ValueError, "model"),
    (lambda: HFGuessedGradientTrainer(model=nn.Linear(1, 1), guess_optimizer="lion"), ValueError, "guess_optimizer"),
    (lambda: HFGuessedGradientTrainer(model=nn.Linear(1, 1), guess_optimizer="stable-adamw",
                                    optimizer_cls_and_kwargs=(torch.optim.SGD, {})), ValueError, "guess_optimizer"),
]


@pytest.mark.parametrize(("build", "error", "pattern"), BAD_ARGUMENTS)
def test_bad_arguments(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


def test_old_trainer_name_is_a_deprecated_alias():
    """Regression: two public classes were named GuessedGradientTrainer (the plain loop and this subclass)."""
    import guess_optim
    from guess_optim.integrations import hf

    with pytest.warns(DeprecationWarning, match="renamed HFGuessedGradientTrainer"):
        from guess_optim.integrations.hf import GuessedGradientTrainer
    assert GuessedGradientTrainer is HFGuessedGradientTrainer
    with pytest.warns(DeprecationWarning, match="renamed HFGuessedGradientTrainer"):
        assert hf.GuessedGradientTrainer is HFGuessedGradientTrainer
    assert "GuessedGradientTrainer" not in hf.__all__
    assert guess_optim.GuessedGradientTrainer is not HFGuessedGradientTrainer
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hf.Nope  # noqa: B018


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "guess_optim.integrations.hf")
    with pytest.raises(ImportError, match=HINT):
        importlib.import_module("guess_optim.integrations.hf")
