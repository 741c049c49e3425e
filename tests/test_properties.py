"""Property-based tests (hypothesis) of the estimators' algebraic identities over random MLPs and batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_estimators import Net, backprop_reference, expected_activation_space

from guess_optim import METHODS, attach

ACTIVATION_SPACE = [m for m, spec in METHODS.items() if spec.space == "activation"]
# E[u uᵀ] of these is a projector or a spectral filter of the upstream Jacobian: rescaling them would bias them
NOT_RESCALED = {"wt-perp", "wt-perp-ns", "wt-precond"}

shapes = st.lists(st.integers(1, 9), min_size=2, max_size=5)
common = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(sizes, batch, act, seed):
    torch.manual_seed(seed)
    model = Net(tuple(sizes), act).double()
    x = torch.randn(batch, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (batch,))
    return model, x, y


@common
@given(sizes=shapes, batch=st.integers(1, 7), method=st.sampled_from(ACTIVATION_SPACE),
       act=st.sampled_from(["relu", "tanh", "gelu"]), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_estimate_is_sum_of_d_times_outer_products(sizes, batch, method, act, k, seed):
    """p.grad == Σ_b d_b u_b x_b^T / K with d_b from backprop's per-example pre-activation gradients."""
    model, x, y = build(sizes, batch, act, seed)
    loss_fn = lambda z: F.cross_entropy(z, y)  # noqa: E731
    xs, gs, _ = backprop_reference(model, x, loss_fn)
    with attach(model, method, seed=seed, num_guesses=k) as h, h.capture() as cap:
        loss_fn(model(x)).backward()
    guesses = [c["guess"] for c in cap]
    expected = expected_activation_space(xs, gs, guesses, k=k, exact_head=METHODS[method].exact_head)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


@common
@given(sizes=shapes, batch=st.integers(1, 6), method=st.sampled_from([m for m in METHODS if m != "backprop"]),
       scale=st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3), seed=st.integers(0, 2**16))
def test_estimate_is_linear_in_the_loss(sizes, batch, method, scale, seed):
    """Same guesses (same seed): estimate(c·L) == c·estimate(L) — the guess does not depend on the loss."""
    model, x, y = build(sizes, batch, "relu", seed)
    grads = []
    for c in (1.0, scale):
        model.zero_grad(set_to_none=True)
        with attach(model, method, seed=seed):
            (c * F.cross_entropy(model(x), y)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, gc in zip(*grads, strict=True):
        torch.testing.assert_close(gc, scale * g1, rtol=1e-9, atol=1e-12)


@common
@given(sizes=shapes, batch=st.integers(1, 6),
       method=st.sampled_from([m for m in ACTIVATION_SPACE if m not in NOT_RESCALED]), seed=st.integers(0, 2**16))
def test_guesses_have_norm_sqrt_n_or_zero(sizes, batch, method, seed):
    model, x, y = build(sizes, batch, "relu", seed)
    with attach(model, method, seed=seed) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    for c in cap:
        if c["guess"] is None:
            continue
        n = c["guess"][0].numel()
        norms = c["guess"].reshape(batch, -1).norm(dim=1)
        ok = torch.isclose(norms, torch.tensor(n**0.5, dtype=norms.dtype)) | (norms == 0)
        assert ok.all()
