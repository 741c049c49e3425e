"""guess_optim.diagnostics: guessed_gradient (one estimate without touching p.grad), backprop_gradient and their
cosine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import attach, handle_of
from guess_optim.diagnostics import backprop_gradient, cosine_similarity, guessed_gradient
from guess_optim.models import MLP


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, 3, depth=3, width=8).double()


def batch(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("method", ["wt", "directional", "activation"])
def test_equals_what_backward_writes_with_the_same_seed(method):
    model, (x, y) = mlp(), batch()
    est = guessed_gradient(model, method, (x, y), F.cross_entropy, seed=3, num_guesses=2)
    with attach(model, method, seed=3, num_guesses=2):
        F.cross_entropy(model(x), y).backward()
    assert list(est) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert est[n].shape == p.shape and est[n].dtype == p.dtype
        assert torch.equal(est[n], p.grad), n


def test_leaves_p_grad_and_the_attach_state_untouched():
    model, data = mlp(), batch()
    model.layers[1].weight.requires_grad_(False)
    grads = {n: (None if i % 2 else torch.full_like(p, 7.0)) for i, (n, p) in enumerate(model.named_parameters())}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    est = guessed_gradient(model, "wt", data, F.cross_entropy, seed=0)
    assert "layers.1.weight" not in est  # frozen: no estimate, not returned
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert handle_of(model) is None
    # also when the loss raises
    with pytest.raises(RuntimeError, match="boom"):
        guessed_gradient(model, "wt", data, lambda out, y: (_ for _ in ()).throw(RuntimeError("boom")), seed=0)
    assert all(p.grad is grads[n] for n, p in model.named_parameters()) and handle_of(model) is None


def test_with_a_handle_it_stays_attached_and_draws_new_guesses():
    model, data = mlp(), batch()
    with attach(model, "wt", seed=0) as handle:
        a = guessed_gradient(model, handle, data, F.cross_entropy)
        b = guessed_gradient(model, handle, data, F.cross_entropy)
        assert handle_of(model) is handle
        assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(a["layers.1.weight"], b["layers.1.weight"])
    assert torch.equal(a["layers.1.weight"], guessed_gradient(model, "wt", data, F.cross_entropy, seed=0)[
        "layers.1.weight"])


def test_backprop_is_the_exact_gradient_in_any_mode():
    model, data = mlp(), batch()
    for mode in (True, False):
        model.train(mode)
        est = guessed_gradient(model, "backprop", data, F.cross_entropy)
        ref = backprop_gradient(model, data, F.cross_entropy)
        assert all(torch.allclose(est[n], ref[n], rtol=1e-12, atol=1e-15) for n in ref)


def test_errors():
    model, data = mlp(), batch()
    with pytest.raises(ValueError, match="Unknown method"):
        guessed_gradient(model, "nope", data, F.cross_entropy)
    with pytest.raises(ValueError, match="training mode"):
        guessed_gradient(model.eval(), "wt", data, F.cross_entropy)
    model.train()
    with attach(model, "wt", seed=0) as handle:
        with pytest.raises(RuntimeError, match="already has guessed gradients"):
            guessed_gradient(model, "wt", data, F.cross_entropy)
        with pytest.raises(ValueError, match="seed= and attach options"):
            guessed_gradient(model, handle, data, F.cross_entropy, seed=1)
        with pytest.raises(ValueError, match="not attached to this model"):
            guessed_gradient(mlp(1), handle, data, F.cross_entropy)


def test_cosine_similarity_shares_the_dropout_masks():
    """Regression: the reference and the estimate ran two forwards with different dropout masks, so even backprop
    measured against itself had a cosine below 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    rep = cosine_similarity(model, "backprop", batch(), F.cross_entropy)
    assert rep.total == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in rep.per_layer.values())


def test_the_reproductions_use_it():
    """Regression: bias.py and one_step.py had their own copies of "estimate without touching p.grad"."""
    from guess_optim.reproduce import bias, one_step

    assert bias.guessed_gradient is guessed_gradient and one_step.guessed_gradient is guessed_gradient
    assert not hasattr(one_step, "_estimate")


# ------------------------------------------------------------------------------------------------------ bias_variance
def test_bias_variance_activation_is_unbiased_wt_is_not():
    """``activation``'s bias is within its noise in every layer; ``wt``'s (``E[u uᵀ] = J_bᵀ J_b``) is many times its
    noise and a sizeable fraction of the gradient; and the variance is a property of one guess, not of ``per_step``."""
    from guess_optim.diagnostics import bias_variance

    model, data = mlp(), batch()
    act = bias_variance(model, "activation", data, F.cross_entropy, guesses=8192, per_step=512, single=8)
    wt = bias_variance(model, "wt", data, F.cross_entropy, guesses=8192, per_step=512, single=8)
    assert set(act.per_layer) == {"layers.1", "layers.3", "layers.5"} and act.guesses == 8192 and act.single == 8
    for name, row in [*act.per_layer.items(), ("all", act.total)]:
        assert row.bias <= 4 * row.bias_noise, (name, row)
        assert 0.9 < row.scale < 1.1 and row.cosine_of_mean > 0.95, (name, row)
    hidden = wt.per_layer["layers.1"]
    assert hidden.bias > 5 * hidden.bias_noise and hidden.relative_bias > 0.3, hidden
    assert wt.total.bias > 5 * wt.total.bias_noise
    fine = bias_variance(model, "activation", data, F.cross_entropy, guesses=8192, per_step=64, single=0)
    assert fine.total.variance == pytest.approx(act.total.variance, rel=0.25)
    assert fine.total.cosine != fine.total.cosine  # single=0: nan
    assert "layers.1" in str(act) and "rel. bias" in str(act)
    assert act.as_dict()["per_layer"]["layers.1"]["relative_variance"] == act.per_layer["layers.1"].relative_variance


def test_bias_variance_directional_variance_matches_its_closed_form():
    """``directional`` (``V`` of each parameter uniform on the sphere of radius ``sqrt(numel)``): ``ĝ_l = (V·g) V_l``,
    so ``E‖ĝ_l‖² = P_l ‖g‖²`` (``‖V_θ‖² = numel`` exactly, ``E[(V·g)²] = ‖g‖²``) and the variance of layer ``l`` is
    ``P_l ‖g‖² - ‖g_l‖²``; the whole model's is ``(P - 1) ‖g‖²``. A linear model, in float64."""
    from guess_optim.diagnostics import backprop_gradient, bias_variance

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    report = bias_variance(model, "directional", (x, t), F.mse_loss, guesses=12800, per_step=32, single=0)
    ref = backprop_gradient(model, (x, t), F.mse_loss)
    total = sum(float(v.pow(2).sum()) for v in ref.values())
    for name, row in report.per_layer.items():
        size = sum(p.numel() for p in model.get_submodule(name).parameters())
        own = sum(float(ref[f"{name}.{p}"].pow(2).sum()) for p in ("weight", "bias"))
        assert row.norm == pytest.approx(own**0.5, rel=1e-9)
        assert row.variance == pytest.approx(size * total - own, rel=0.15), name
        assert row.bias <= 4 * row.bias_noise, (name, row)
    assert report.total.variance == pytest.approx((23 - 1) * total, rel=0.15)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"method": "backprop"}, r"Invalid method: 'backprop'"),
    ({"method": "nope"}, r"Unknown method"),
    ({"method": "activation", "guesses": 0}, r"Invalid guesses"),
    ({"method": "activation", "per_step": 0}, r"Invalid per_step"),
    ({"method": "activation", "single": -1}, r"Invalid single"),
])
def test_bias_variance_bad_arguments(kwargs, pattern):
    from guess_optim.diagnostics import bias_variance

    model, data = mlp(), batch()
    with pytest.raises(ValueError, match=pattern):
        bias_variance(model, loss_fn=F.cross_entropy, batch=data, **kwargs)


def test_bias_variance_refuses_eval_mode_and_an_attached_model():
    from guess_optim.diagnostics import bias_variance

    model, data = mlp(), batch()
    with attach(model, "wt"), pytest.raises(ValueError, match=r"remove the model's handle"):
        bias_variance(model, "activation", data, F.cross_entropy)
    with pytest.raises(ValueError, match=r"training mode"):
        bias_variance(model.eval(), "activation", data, F.cross_entropy)
    model.train()
    grads = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    bias_variance(model, "wt-perp", data, F.cross_entropy, guesses=4, per_step=2, single=1, rank=1)
    assert all(p.grad is grads[n] for n, p in model.named_parameters()) and handle_of(model) is None
