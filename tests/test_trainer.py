"""GuessedGradientTrainer: history, cosine tracking, skipped steps, checkpoints and resume, clean-up."""

from __future__ import annotations

import copy
import glob
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from guess_optim import NonFiniteEstimateWarning, attach, handle_of
from guess_optim.data import load_dataset, make_loaders
from guess_optim.models import MLP
from guess_optim.trainer import GuessedGradientTrainer

HISTORY_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_eval_loss",
    "test_accuracy",
    "test_loss",
    "mean_cosine",
    "skipped_steps",
    "steps",
    "seconds",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and without OpenMP spin stalls on shared 2-core machines) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def setup(splits, *, seed=0, width=32, lr=3e-3, batch_size=64, optimizer="adamw"):
    torch.manual_seed(seed)
    model = MLP(64, 10, depth=3, width=width)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_loader, test_loader = make_loaders(splits, batch_size, seed=seed)
    return model, opt, train_loader, test_loader


def no_hooks(model):
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
        and handle_of(model) is None
    )


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_history_structure_and_learning(digits):
    model, opt, train_loader, test_loader = setup(digits)
    trainer = GuessedGradientTrainer(model, opt, method="wt", seed=0, progress=False, verbose=False)
    history = trainer.fit(train_loader, test_loader, epochs=5)
    assert history is trainer.history and len(history) == 5
    for i, r in enumerate(history, 1):
        assert set(r) == HISTORY_KEYS
        assert r["epoch"] == i and r["steps"] == len(train_loader) and r["skipped_steps"] == 0
        for key in ("train_accuracy", "test_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        for key in ("train_loss", "train_eval_loss", "test_loss", "seconds"):
            assert math.isfinite(r[key]) and r[key] >= 0
        assert r["mean_cosine"] is None
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.4  # chance is 0.1
    assert trainer.global_step == 5 * len(train_loader) and trainer.epoch == 5
    assert model.training and no_hooks(model)


def test_train_accuracy_is_full_train_set_in_eval_mode(digits):
    model, opt, train_loader, test_loader = setup(digits)
    trainer = GuessedGradientTrainer(model, opt, method="wt", progress=False, verbose=False)
    trainer.fit(train_loader, test_loader, epochs=1)
    model.eval()
    with torch.no_grad():
        x, y = digits.train.tensors
        acc = (model(x).argmax(1) == y).double().mean().item()
        x, y = digits.test.tensors
        test_loss = F.cross_entropy(model(x), y).item()
    assert trainer.history[0]["train_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert trainer.history[0]["test_loss"] == pytest.approx(test_loss, rel=1e-5)


def test_evaluate_restores_mode(digits):
    model, opt, _, test_loader = setup(digits)
    trainer = GuessedGradientTrainer(model, opt, progress=False, verbose=False)
    for training in (True, False):
        model.train(training)
        out = trainer.evaluate(test_loader)
        assert model.training is training
        assert 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["loss"])
    assert trainer.evaluate([]) == {"loss": None, "accuracy": None}


def test_cosine_tracking_matches_independent_recomputation(digits):
    model, opt, train_loader, test_loader = setup(digits)
    init = copy.deepcopy(model)
    trainer = GuessedGradientTrainer(model, opt, method="wt", seed=3, track_cosine=4, progress=False, verbose=False)
    trainer.fit(train_loader, test_loader, epochs=1)
    steps = [s for s, _ in trainer.cosines]
    assert steps == list(range(0, len(train_loader), 4))
    values = [c for _, c in trainer.cosines]
    assert all(-1.0 <= c <= 1.0 for c in values)
    assert trainer.history[0]["mean_cosine"] == pytest.approx(sum(values) / len(values))
    assert sum(values) / len(values) > 0.05  # wt guesses are far better than chance (~1/sqrt(#params))

    # Step 0 by hand: the same first batch, the same guesses, backprop on a copy, cosine in float64.
    x, y = next(iter(make_loaders(digits, 64, seed=0)[0]))
    reference = copy.deepcopy(init)
    loss = F.cross_entropy(reference(x), y)
    true = torch.autograd.grad(loss, list(reference.parameters()))
    with attach(init, "wt", seed=3):
        F.cross_entropy(init(x), y).backward()
    est = torch.cat([p.grad.double().flatten() for p in init.parameters()])
    ref = torch.cat([g.double().flatten() for g in true])
    expected = float(est @ ref / (est.norm() * ref.norm()))
    assert values[0] == pytest.approx(expected, abs=1e-9)


def test_cosine_tracking_does_not_change_the_trajectory(digits):
    finals = []
    for track in (0, 1):
        model, opt, train_loader, _ = setup(digits)
        GuessedGradientTrainer(model, opt, method="wt", track_cosine=track, progress=False, verbose=False).fit(
            train_loader, epochs=1
        )
        finals.append(params(model))
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_cosine_reference_uses_the_steps_dropout_masks(digits):
    """Regression: the reference ran under a forked RNG, so with dropout it drew other masks than the step's forward
    and even backprop measured against itself had a cosine below 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(32, 10))
    train_loader, _ = make_loaders(digits, 64, seed=0)
    trainer = GuessedGradientTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), method="backprop",
                                     track_cosine=3, progress=False, verbose=False)
    trainer.fit(train_loader, epochs=1)
    assert len(trainer.cosines) > 3 and all(c == pytest.approx(1.0, abs=1e-5) for _, c in trainer.cosines)


class NaNOnce:
    """Cross-entropy, but NaN on the training step ``bad`` (0-based); records the parameters at each step."""

    def __init__(self, model, bad):
        self.model, self.bad, self.calls, self.seen = model, bad, 0, []

    def __call__(self, out, y):
        loss = F.cross_entropy(out, y)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        self.seen.append(params(self.model))
        step, self.calls = self.calls, self.calls + 1
        return loss * float("nan") if step == self.bad else loss


@pytest.mark.parametrize("method", ["wt", "directional"])
def test_nonfinite_step_is_skipped(digits, method):
    model, opt, train_loader, _ = setup(digits, optimizer="sgd", lr=0.05)
    loss_fn = NaNOnce(model, bad=2)
    optimizer_steps = []
    opt.register_step_post_hook(lambda *_: optimizer_steps.append(1))
    trainer = GuessedGradientTrainer(model, opt, method=method, loss_fn=loss_fn, progress=False, verbose=False)
    with pytest.warns(NonFiniteEstimateWarning):
        history = trainer.fit(train_loader, epochs=1)
    n = len(train_loader)
    assert trainer.skipped_steps == 1 and history[0]["skipped_steps"] == 1
    assert len(optimizer_steps) == n - 1
    seen = loss_fn.seen
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))  # no step after the NaN
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))  # steps otherwise
    assert math.isfinite(history[0]["train_loss"])  # the mean is over the finite losses


def test_nonfinite_loss_is_skipped_for_backprop(digits):
    model, opt, train_loader, _ = setup(digits, optimizer="sgd", lr=0.05)
    loss_fn = NaNOnce(model, bad=0)
    trainer = GuessedGradientTrainer(model, opt, method="backprop", loss_fn=loss_fn, progress=False, verbose=False)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.fit(train_loader, epochs=1)
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(loss_fn.seen[0], loss_fn.seen[1], strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def run(splits, epochs, *, checkpoint_dir=None, resume=False, method="wt"):
    model, opt, train_loader, test_loader = setup(splits)
    trainer = GuessedGradientTrainer(
        model, opt, method=method, seed=5, track_cosine=3, progress=False, verbose=False, checkpoint_dir=checkpoint_dir
    )
    trainer.fit(train_loader, test_loader, epochs=epochs, resume=resume)
    return model, opt, trainer


def test_resume_is_bit_identical(digits, tmp_path):
    straight, straight_opt, straight_trainer = run(digits, 4)
    run(digits, 2, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    resumed, resumed_opt, resumed_trainer = run(digits, 4, checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(params(straight), params(resumed), strict=True))
    sa, sb = straight_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert len(resumed_trainer.history) == 4
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(resumed_trainer.history) == drop(straight_trainer.history)
    assert resumed_trainer.cosines == straight_trainer.cosines
    assert resumed_trainer.global_step == straight_trainer.global_step
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 4


def test_resume_errors(digits, tmp_path):
    model, opt, train_loader, _ = setup(digits)
    trainer = GuessedGradientTrainer(model, opt, checkpoint_dir=tmp_path / "none", progress=False, verbose=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        trainer.fit(train_loader, epochs=1, resume=True)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        GuessedGradientTrainer(model, opt, progress=False).fit(train_loader, epochs=1, resume=True)
    run(digits, 1, checkpoint_dir=tmp_path, method="wt")
    with pytest.raises(ValueError, match="written by method 'wt'"):
        run(digits, 2, checkpoint_dir=tmp_path, resume=True, method="activation")


def test_checkpoint_write_is_atomic(digits, tmp_path, monkeypatch):
    run(digits, 1, checkpoint_dir=tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        run(digits, 2, checkpoint_dir=tmp_path, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # the temporary file was removed
    assert not glob.glob(str(tmp_path / ".*"))


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_handle_removed_on_error(digits, exc):
    model, opt, train_loader, _ = setup(digits)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return F.cross_entropy(out, y)

    trainer = GuessedGradientTrainer(model, opt, loss_fn=loss_fn, progress=False, verbose=False)
    with pytest.raises(type(exc)):
        trainer.fit(train_loader, epochs=1)
    assert no_hooks(model) and trainer.handle is None
    attach(model, "wt").remove()  # attachable again


def test_progress_and_epoch_lines(digits, capsys):
    model, opt, train_loader, test_loader = setup(digits)
    GuessedGradientTrainer(model, opt, track_cosine=5, progress=False).fit(train_loader, test_loader, epochs=1)
    out = capsys.readouterr().out
    for word in ("epoch 1/1", "train loss", "train acc", "test acc", "cosine", "skipped 0"):
        assert word in out


BAD_INIT = [
    (dict(method="nope"), ValueError, "Unknown method"),
    (dict(track_cosine=-1), ValueError, "Invalid track_cosine"),
    (dict(track_cosine=1.5), ValueError, "Invalid track_cosine"),
    (dict(seed=-1), ValueError, "Invalid seed"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_INIT)
def test_bad_constructor_arguments(digits, kwargs, exc, match):
    model, opt, _, _ = setup(digits)
    with pytest.raises(exc, match=match):
        GuessedGradientTrainer(model, opt, **kwargs)


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True, "2"])
def test_bad_epochs(digits, epochs):
    model, opt, train_loader, _ = setup(digits)
    with pytest.raises(ValueError, match="Invalid epochs"):
        GuessedGradientTrainer(model, opt, progress=False).fit(train_loader, epochs=epochs)
    assert no_hooks(model)


def test_bad_attach_kwargs_propagate(digits):
    model, opt, train_loader, _ = setup(digits)
    with pytest.raises(ValueError, match="num_guesses"):
        GuessedGradientTrainer(model, opt, num_guesses=0, progress=False).fit(train_loader, epochs=1)
    assert no_hooks(model)
    with pytest.raises(TypeError, match="Optimizer"):
        GuessedGradientTrainer(model, [opt])


def test_every_method_trains_one_epoch(digits):
    from guess_optim import METHODS

    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteEstimateWarning)
        for method in METHODS:
            model, opt, train_loader, _ = setup(digits)
            h = GuessedGradientTrainer(model, opt, method=method, track_cosine=7, progress=False, verbose=False).fit(
                train_loader, epochs=1
            )
            # diagnostics' float64 cosine can overshoot 1 by an ulp or two (backprop vs itself)
            assert math.isfinite(h[0]["train_loss"]) and abs(h[0]["mean_cosine"]) <= 1 + 1e-12, method
            if method == "backprop":
                assert h[0]["mean_cosine"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- optimizer step in backward
@pytest.mark.parametrize("store", ["activations", "recompute"])
def test_optimizer_in_backward_trains_as_the_plain_loop(digits, store):
    """An OptimizerInBackward (one AdamW per parameter, stepped inside backward from the released estimates) gives
    the parameters of one AdamW stepped after backward, in float64, and the same history."""
    from guess_optim.optim import OptimizerInBackward

    results = []
    for in_backward in (False, True):
        model, _, train_loader, test_loader = setup(digits)
        model.double()
        loader = [(x.double(), y) for x, y in list(train_loader)[:4]]
        factory = lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0)  # noqa: E731
        opt = OptimizerInBackward(model, factory) if in_backward else factory(model.parameters())
        trainer = GuessedGradientTrainer(model, opt, method="wt", seed=0, progress=False, verbose=False, store=store)
        history = trainer.fit(loader, epochs=2)
        results.append((params(model), [h["train_loss"] for h in history]))
        assert trainer.attach_kwargs.get("gradient_release", False) is in_backward
        if in_backward:
            opt.remove()
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-10)


def test_optimizer_in_backward_refusals(digits):
    from guess_optim.optim import OptimizerInBackward

    model, _, _, _ = setup(digits)
    opt = OptimizerInBackward(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="track_cosine=0"):
        GuessedGradientTrainer(model, opt, method="wt", track_cosine=5)
    with pytest.raises(ValueError, match="regular torch.optim optimizer for backprop"):
        GuessedGradientTrainer(model, opt, method="backprop")
    with pytest.raises(ValueError, match="gradient_release=True"):
        GuessedGradientTrainer(model, opt, method="wt", gradient_release=False)
    with pytest.raises(TypeError, match="OptimizerInBackward"):
        GuessedGradientTrainer(model, [opt], method="wt")
    opt.remove()


def test_gradient_release_with_a_regular_optimizer_is_refused(digits):
    """It was accepted, then warned on every step that no optimizer stepped the estimate in backward (a plain loop)."""
    model, _, _, _ = setup(digits)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Pass a guess_optim.optim.OptimizerInBackward.*or drop gradient_release"):
        GuessedGradientTrainer(model, sgd, method="wt", gradient_release=True)
    GuessedGradientTrainer(model, sgd, method="wt", gradient_release=False, progress=False, verbose=False)


def test_optimizer_in_backward_resumes(digits, tmp_path):
    """Checkpoints hold every per-parameter optimizer's state: a resumed run ends where an uninterrupted one does."""
    from guess_optim.optim import OptimizerInBackward

    def run(epochs, resume, ckpt):
        model, _, train_loader, _ = setup(digits)
        loader = list(train_loader)[:3]
        opt = OptimizerInBackward(model, lambda ps: torch.optim.AdamW(ps, lr=3e-3))
        trainer = GuessedGradientTrainer(model, opt, method="activation", seed=0, progress=False, verbose=False,
                                         checkpoint_dir=ckpt)
        trainer.fit(loader, epochs=epochs, resume=resume)
        opt.remove()
        return params(model)

    straight = run(2, False, str(tmp_path / "a"))
    run(1, False, str(tmp_path / "b"))
    resumed = run(2, True, str(tmp_path / "b"))
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
