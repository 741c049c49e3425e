"""``combine="project"``: the K guesses of a step give each example the projection of its gradient onto their span."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from unbiased import averaged, backprop, compare

from guess_optim import attach


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(3, 5, generator=g), torch.tensor([0, 1, 2])


def test_one_step_is_the_projection_onto_the_span_of_the_guesses():
    """Per example, the pre-activation estimates are P g with P the orthogonal projector onto the span of the K guesses
    (over both layers' coordinates), computed here from backprop's per-example gradients."""
    model, x, y = model_and_data()
    k = 3
    acts = []
    ref = nn.Sequential(*[m for m in model])  # same modules: retain the pre-activations' gradients
    hooks = [m.register_forward_hook(lambda mod, a, o: (o.retain_grad(), acts.append((a[0].detach(), o)))[-1])
             for m in (ref[0], ref[2])]
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    with attach(model, "activation", seed=0, num_guesses=k, combine="project") as handle, handle.capture() as cap:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    u = torch.cat([c["guess"].reshape(k, 3, -1) for c in cap], -1)  # [K, B, n]: each example's K guesses
    g = torch.cat([o.grad for _, o in acts], -1)  # [B, n]
    expected = []
    for b in range(3):
        basis = u[:, b].T  # [n, K]
        proj = basis @ torch.linalg.pinv(basis) @ g[b]  # the projection of example b's gradient
        expected.append(proj)
    expected = torch.stack(expected)  # [B, n]
    g1, g2 = expected[:, :6], expected[:, 6:]
    torch.testing.assert_close(model[0].weight.grad, g1.T @ acts[0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model[2].bias.grad, g2.sum(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_rescaled_projection_of_isotropic_guesses_is_unbiased(k):
    """E[P g] = (K / n) g for isotropic guesses: times n / K, the average is backprop's gradient per parameter. The
    batch is the 3 examples repeated 1,000 times (same mean loss, same gradient): every replica draws its own
    guesses."""
    model, x, y = model_and_data()
    reps = 1000
    xr, yr = x.repeat(reps, 1), y.repeat(reps)

    def run(m):
        return F.cross_entropy(m(xr), yr)

    n = 6 + 3  # guessed coordinates per example: both layers' outputs
    est = averaged(model, run, method="activation", guesses=40 * k, per_step=k, combine="project")
    compare({name: v * n / k for name, v in est.items()}, backprop(model, run))


@pytest.mark.parametrize(("options", "pattern"), [
    ({"combine": "sum"}, r"Invalid combine"),
    ({"combine": "project", "store": "recompute"}, r"store='activations'"),
])
def test_bad_combine(options, pattern):
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=pattern):
        attach(model, "activation", **options)
