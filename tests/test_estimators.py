"""Estimates against backprop, computed independently in each test (float64).

The reference for a fixed guess: from backprop's per-example pre-activation gradients ``g_{i,b} = ∂L/∂s_{i,b}``,
the directional derivative is ``d_b = Σ_i <g_{i,b}, u_{i,b}>`` and the estimate of ``W_i`` is
``Σ_b d_b u_{i,b} x_{i,b}^T`` (paper §2.1, A.4); for ``directional`` ``d = Σ_i <∂L/∂W_i, V_i>`` and the estimate is
``d V_i``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import METHODS, attach

GUESSED = [m for m in METHODS if m != "backprop"]
ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


class Net(nn.Module):
    """Not an nn.Sequential: functional activations in a hand-written forward."""

    def __init__(self, sizes=(10, 32, 8, 3), act="relu"):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        for fc in self.fcs[:-1]:
            x = self.act(fc(x))
        return self.fcs[-1](x)


def make(act="relu", sizes=(10, 32, 8, 3), batch=6, seed=0):
    torch.manual_seed(seed)
    model = Net(sizes, act).double()
    x = torch.randn(batch, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (batch,))
    return model, x, y


def backprop_reference(model, x, loss_fn):
    """Inputs x_i, outputs s_i and per-example ∂L/∂s_i of every Linear, and ∂L/∂θ, by plain backprop."""
    model = copy.deepcopy(model)
    cache = []

    def hook(mod, args, out):
        out.retain_grad()
        cache.append((args[0].detach(), out))

    hs = [m.register_forward_hook(hook) for m in model.fcs]
    loss = loss_fn(model(x))
    loss.backward()
    for h in hs:
        h.remove()
    xs = [c[0] for c in cache]
    gs = [c[1].grad.detach() for c in cache]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return xs, gs, grads


def expected_activation_space(xs, gs, guesses, k=1, exact_head=False):
    """Σ_b d_b u_b x_b^T (averaged over K guess blocks); exact head: g^T x."""
    n_layers = len(xs)
    guessed = [i for i in range(n_layers) if not (exact_head and i == n_layers - 1)]
    d = sum((gs[i].repeat(k, 1) * guesses[i]).sum(1) for i in guessed)
    out = []
    for i in range(n_layers):
        if i in guessed:
            go = d[:, None] * guesses[i]
            out += [go.T @ xs[i].repeat(k, 1) / k, go.sum(0) / k]
        else:
            out += [gs[i].T @ xs[i], gs[i].sum(0)]
    return out


LOSSES = {
    "ce-mean": lambda y: (lambda z: F.cross_entropy(z, y)),
    "ce-sum": lambda y: (lambda z: F.cross_entropy(z, y, reduction="sum")),
    "mse-softmax": lambda y: (lambda z: ((z.softmax(-1) - F.one_hot(y, z.shape[-1])) ** 2).mean() * 3.0),
}


@pytest.mark.parametrize("method", ["activation", "mixing", "wt", "downstream", "self-sharpening"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("k", [1, 3])
def test_activation_space_estimate_matches_backprop_formula(method, act, k):
    model, x, y = make(act)
    loss_fn = LOSSES["ce-mean"](y)
    xs, gs, _ = backprop_reference(model, x, loss_fn)
    with attach(model, method, seed=1, num_guesses=k) as h, h.capture() as cap:
        loss_fn(model(x)).backward()
    exact_head = METHODS[method].exact_head
    guesses = [c["guess"] for c in cap]
    assert len(guesses) == 3
    assert (guesses[-1] is None) == exact_head  # the exact head draws no guess
    expected = expected_activation_space(xs, gs, guesses, k=k, exact_head=exact_head)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("exact_head", [False, True])
def test_any_loss_and_exact_head(loss, exact_head):
    model, x, y = make("gelu")
    loss_fn = LOSSES[loss](y)
    xs, gs, true = backprop_reference(model, x, loss_fn)
    with attach(model, "wt", seed=3, exact_head=exact_head) as h, h.capture() as cap:
        loss_fn(model(x)).backward()
    guesses = [c["guess"] for c in cap]
    expected = expected_activation_space(xs, gs, guesses, exact_head=exact_head)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    if exact_head:  # the output layer's estimate is its exact gradient
        torch.testing.assert_close(model.fcs[-1].weight.grad, true[-2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_directional_estimate_matches_backprop_formula(k):
    model, x, y = make("tanh")
    loss_fn = LOSSES["ce-mean"](y)
    xs, gs, _ = backprop_reference(model, x, loss_fn)
    with attach(model, "directional", seed=0, num_guesses=k) as h, h.capture() as cap:
        loss_fn(model(x)).backward()
    tangents = [c["tangents"] for c in cap]  # per layer: K dicts {weight, bias}
    n = x.shape[0]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for j in range(k):
        # per-example JVP of each layer's weight perturbation: g_b · (x_b V^T + Vb)
        d = sum(
            (gs[i] * (xs[i] @ tangents[i][j]["weight"].T + tangents[i][j]["bias"])).sum()
            for i in range(len(xs))
        )
        for i in range(len(xs)):
            expected[2 * i] += d * tangents[i][j]["weight"] / k
            expected[2 * i + 1] += d * tangents[i][j]["bias"] / k
    assert n == 6
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["activation", "directional"])
def test_unbiased_methods_average_to_the_gradient(method):
    """E[ĝ] = ∇L: the average of many independent guesses (K = 20000 in one step) approaches backprop."""
    model, x, y = make("relu", sizes=(5, 8, 3), batch=4)
    loss_fn = LOSSES["ce-mean"](y)
    _, _, true = backprop_reference(model, x, loss_fn)
    with attach(model, method, seed=0, num_guesses=20000):
        loss_fn(model(x)).backward()
    est = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = torch.cat([t.flatten() for t in true])
    rel = (est - ref).norm() / ref.norm()
    assert rel < 0.1, f"relative error {rel:.3f}"
    # one guess is far from the gradient: the average is what converges
    model.zero_grad()
    with attach(model, method, seed=0):
        loss_fn(model(x)).backward()
    one = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (one - ref).norm() / ref.norm() > 3 * rel


def test_biased_methods_do_not_average_to_the_gradient():
    model, x, y = make("relu", sizes=(5, 16, 4, 3), batch=4)
    loss_fn = LOSSES["ce-mean"](y)
    _, _, true = backprop_reference(model, x, loss_fn)
    with attach(model, "wt", seed=0, num_guesses=20000):
        loss_fn(model(x)).backward()
    est, ref = model.fcs[0].weight.grad.flatten(), true[0].flatten()
    assert F.cosine_similarity(est, ref, dim=0) < 0.99


def test_wt_guess_lies_in_masked_row_space_of_next_weight():
    model, x, y = make("relu", sizes=(10, 32, 6, 3), batch=5)
    with attach(model, "wt", seed=0) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    s1 = model.fcs[0](x).detach()
    mask = (s1 > 0).double()
    u = cap[0]["guess"]
    assert torch.all(u[mask == 0] == 0)
    w_next = model.fcs[1].weight.detach()  # [6, 32]
    for b in range(x.shape[0]):
        basis = mask[b][:, None] * w_next.T  # columns span the masked row space, rank <= 6 in R^32
        coef = torch.linalg.lstsq(basis, u[b][:, None]).solution
        assert torch.allclose(basis @ coef, u[b][:, None], atol=1e-9)
    # and an isotropic guess does not (sanity of the check itself)
    r = torch.randn(32, dtype=torch.float64) * mask[0]
    coef = torch.linalg.lstsq(mask[0][:, None] * w_next.T, r[:, None]).solution
    assert not torch.allclose(mask[0][:, None] * w_next.T @ coef, r[:, None], atol=1e-3)


def test_downstream_guess_is_masked_vjp_through_next_layer():
    model, x, y = make("relu", sizes=(10, 12, 7, 3), batch=4)
    with attach(model, "downstream", seed=0) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    s1 = model.fcs[0](x).detach()
    s2 = model.fcs[1](F.relu(s1)).detach()
    m1, m2 = (s1 > 0).double(), (s2 > 0).double()
    u = cap[0]["guess"]
    w2 = model.fcs[1].weight.detach()
    # u_b = m1 ⊙ W2^T (m2 ⊙ ε_b) for some ε_b: solve for ε on the active coordinates of layer 2
    for b in range(4):
        basis = m1[b][:, None] * w2.T * m2[b][None, :]
        coef = torch.linalg.lstsq(basis, u[b][:, None]).solution
        assert torch.allclose(basis @ coef, u[b][:, None], atol=1e-9)


def test_guesses_are_normalized_per_example():
    model, x, y = make("gelu", sizes=(10, 32, 8, 3), batch=5)
    for method in ["activation", "mixing", "wt", "downstream"]:
        with attach(model, method, seed=0) as h, h.capture() as cap:
            F.cross_entropy(model(x), y).backward()
        for c in cap:
            n = c["guess"].shape[1]
            torch.testing.assert_close(c["guess"].norm(dim=1), torch.full((5,), n**0.5, dtype=torch.float64))


def test_same_seed_bit_identical_and_different_seed_differs():
    def run(seed):
        model, x, y = make("relu")
        with attach(model, "wt", seed=seed):
            F.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_same_shaped_layers_get_different_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with attach(model, "activation", seed=0) as h, h.capture() as cap:
        model(x).sum().backward()
    assert not torch.equal(cap[0]["guess"], cap[1]["guess"])


def test_gradient_accumulation_sums_like_backprop():
    """Two half-batches with loss / 2 accumulate the sum of the two half-batch estimates."""
    model, x, y = make("silu", batch=8)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    loss_fns = [lambda z, yb=yb: F.cross_entropy(z, yb) / 2 for _, yb in halves]
    refs = [backprop_reference(model, xb, fn) for (xb, _), fn in zip(halves, loss_fns, strict=True)]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    with attach(model, "wt", seed=0) as h:
        for (xb, _), fn, (xs, gs, _) in zip(halves, loss_fns, refs, strict=True):
            with h.capture() as cap:
                fn(model(xb)).backward()
            for e, g in zip(expected, expected_activation_space(xs, gs, [c["guess"] for c in cap]), strict=True):
                e += g
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_remove_restores_exact_backprop():
    model, x, y = make("relu")
    _, _, true = backprop_reference(model, x, LOSSES["ce-mean"](y))
    state = copy.deepcopy(model.state_dict())
    h = attach(model, "wt", seed=0)
    F.cross_entropy(model(x), y).backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for p, t in zip(model.parameters(), true, strict=True):
        torch.testing.assert_close(p.grad, t, rtol=0, atol=0)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    for k_, v in model.state_dict().items():
        assert torch.equal(v, state[k_])
    h2 = attach(model, "wt")  # attachable again after remove
    h2.remove()


def test_backprop_method_is_exact():
    model, x, y = make("relu")
    _, _, true = backprop_reference(model, x, LOSSES["ce-mean"](y))
    with attach(model, "backprop"):
        F.cross_entropy(model(x), y).backward()
    for p, t in zip(model.parameters(), true, strict=True):
        torch.testing.assert_close(p.grad, t, rtol=0, atol=0)


def test_evaluation_runs_the_plain_model():
    model, x, y = make("relu")
    plain = model(x).detach()
    with attach(model, "wt", seed=0) as h:
        model.eval()
        out = model(x)
        assert out.grad_fn is not None and "GuessedGradient" not in type(out.grad_fn).__name__
        model.train()
        with torch.no_grad():
            assert torch.equal(model(x), plain)
        with torch.inference_mode():
            assert torch.equal(model(x), plain)
        guessed = model(x)
        assert "GuessedGradient" in type(guessed.grad_fn).__name__
        assert torch.equal(guessed.detach(), plain)  # the primal output is the plain output
        assert h._step is None
        with h.paused():
            assert "GuessedGradient" not in type(model(x).grad_fn).__name__


def test_no_reverse_graph_through_the_network():
    """The guessing forward records no autograd graph through the layers: the output hangs from one node (the boundary)
    whose only input is the estimate node, whose inputs are the parameters."""
    model, x, y = make("relu")
    with attach(model, "wt", seed=0):
        out = model(x)
    fn = out.grad_fn
    assert "GuessedGradient" in type(fn).__name__
    (anchor,) = [n for n, _ in fn.next_functions if n is not None]
    assert "Estimate" in type(anchor).__name__
    inputs = [n for n, _ in anchor.next_functions if n is not None]
    assert all(type(n).__name__ == "AccumulateGrad" for n in inputs)
    assert len(inputs) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                                     torch.optim.Adagrad])
def test_every_optimizer_steps_with_the_estimate(opt_cls):
    """The optimizer sees the estimate exactly as a gradient: a twin fed the same .grad by hand steps the same."""
    model, x, y = make("relu")
    twin = copy.deepcopy(model)
    opt, opt_twin = opt_cls(model.parameters(), lr=1e-2), opt_cls(twin.parameters(), lr=1e-2)
    with attach(model, "wt", seed=0):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                assert p.grad is not None and torch.isfinite(p.grad).all()
                q.grad = p.grad.clone()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt_twin.step()
            for p, q, b in zip(model.parameters(), twin.parameters(), before, strict=True):
                assert torch.equal(p, q)
                assert not torch.equal(p, b)


def test_frozen_parameters_get_no_estimate():
    model, x, y = make("relu")
    model.fcs[0].requires_grad_(False)
    model.fcs[1].bias.requires_grad_(False)
    with attach(model, "wt", seed=0):
        F.cross_entropy(model(x), y).backward()
    assert model.fcs[0].weight.grad is None and model.fcs[0].bias.grad is None
    assert model.fcs[1].bias.grad is None and model.fcs[1].weight.grad is not None


def test_weight_sharing_sums_both_calls():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))

    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with attach(model, "activation", seed=0, num_guesses=20000):
        model(x).pow(2).sum().backward()
    est = model.fc.weight.grad.clone()
    model.zero_grad()
    model(x).pow(2).sum().backward()
    assert F.cosine_similarity(est.flatten(), model.fc.weight.grad.flatten(), dim=0) > 0.95


def test_normalize_rows_scales_each_row_to_norm_sqrt_n():
    from guess_optim.guesses import normalize_rows

    u = torch.randn(4, 3, 5, dtype=torch.float64)
    u[2] = 0.0
    out = normalize_rows(u)
    norms = out.reshape(4, -1).norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.full((3,), 15.0 ** 0.5, dtype=torch.float64))
    assert torch.equal(out[2], torch.zeros(3, 5, dtype=torch.float64))  # a zero row stays zero, no NaN
    kept = u.clone()
    same = normalize_rows(u, inplace=True)
    assert same is u and torch.equal(same, out)  # in place: the same values, bit for bit
    t = kept.transpose(1, 2)  # not contiguous: falls back to a new tensor, input untouched
    before = t.clone()
    assert torch.equal(normalize_rows(t, inplace=True), normalize_rows(before)) and torch.equal(t, before)
