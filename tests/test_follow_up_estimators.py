"""The follow-up estimators' expectations, in float64, against references computed here (research/
follow-up-estimators.md; Wang, Markou, Campbell 2025).

* ``wt-perp`` with full rank (``rank=None``) and ``wt-precond`` (small ``σ``) are unbiased: the average of many
  estimates is backprop's gradient per parameter.
* ``wt-perp`` with ``rank=k`` averages to ``Σ_b (V_k V_kᵀ g_b) x_bᵀ``: each example's pre-activation gradient
  projected onto the top-``k`` right singular vectors of its masked upstream Jacobian ``J_b = W_{i+1} D_b``. The test
  forms ``J_b`` from the weights and the ReLU masks and takes its SVD with ``torch.linalg.svd`` (not through
  ``guess_optim.jacobian`` or ``guess_optim.spectral``); the per-example gradients come from plain autograd.

Each average is checked twice (``tests/unbiased.py``): cosine and projection ratio to the reference, and the error
within its measured noise. The guesses of a step ride the batch (``num_guesses``), so 200,000 guesses take about a
second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from unbiased import averaged, backprop, compare

GUESSES = {"guesses": 200000, "per_step": 20000}


@pytest.fixture(autouse=True)
def _float64_one_thread():
    n, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(dtype)


def mlp_and_batch():
    """A ReLU MLP 5 → 6 → 4 → 3 and three examples: ``J_b`` is 4 x 6 (rank <= 4) at the first layer, 3 x 4 at the
    second; the output layer gets an isotropic guess."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 5, generator=g), torch.tensor([0, 0, 2])  # not one of each: the output bias has a gradient
    return model, lambda m: F.cross_entropy(m(x), y)


def per_example(model, run):
    """For each Linear: its inputs ``x_b`` ``[B, in]``, pre-activations ``s_b`` and their gradients ``g_b`` ``[B, out]``
    (plain autograd on the unattached model)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append((args[0].detach(), out))

    hooks = [m.register_forward_hook(keep) for m in linears]
    try:
        run(model).backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return linears, [(x, s.detach(), s.grad.detach()) for x, s, in seen]


def projected_gradient(model, run, rank):
    """``{name: Σ_b (V_k V_kᵀ g_b) x_bᵀ}`` (bias: ``Σ_b V_k V_kᵀ g_b``) for the hidden layers, the plain gradient for
    the output layer; ``V_k`` from ``torch.linalg.svd`` of ``J_b = W_{i+1} diag(s_b > 0)``."""
    linears, acts = per_example(model, run)
    names = {m: n for n, m in model.named_children()}
    out = {}
    for i, (lin, (x, s, g)) in enumerate(zip(linears, acts, strict=True)):
        if i + 1 < len(linears):
            W = linears[i + 1].weight.detach()
            rows = []
            for b in range(len(x)):
                J = W * (s[b] > 0).to(W.dtype)  # [m, n]: columns of dead units are zero
                _, sv, Vh = torch.linalg.svd(J, full_matrices=False)
                r = int((sv > 1e-10 * sv[0]).sum())
                k = r if rank is None else min(rank, r)
                Vk = Vh[:k].T  # [n, k]
                rows.append(Vk @ (Vk.T @ g[b]))
            g = torch.stack(rows)
        out[f"{names[lin]}.weight"] = g.T @ x
        out[f"{names[lin]}.bias"] = g.sum(0)
    return out


def check_average(model, run, reference, **options):
    noise = {}
    est = averaged(model, run, noise=noise, **GUESSES, **options)
    compare(est, reference)
    compare(est, reference, noise=noise)


@pytest.mark.parametrize("options", [{"method": "wt-perp", "rank": None},
                                     {"method": "wt-perp", "rank": "full", "solver": "exact"},
                                     {"method": "wt-precond", "sigma": 1e-8}],
                         ids=["wt-perp-full", "wt-perp-full-exact", "wt-precond"])
def test_full_rank_guesses_average_to_the_backprop_gradient(options):
    model, run = mlp_and_batch()
    check_average(model, run, backprop(model, run), **options)


@pytest.mark.parametrize(("rank", "solver"), [(1, "auto"), (2, "exact"), (2, "randomized")])
def test_rank_k_wt_perp_averages_to_the_projection_onto_the_top_k_right_singular_vectors(rank, solver):
    model, run = mlp_and_batch()
    expected = projected_gradient(model, run, rank)
    full = backprop(model, run)
    torch.testing.assert_close(projected_gradient(model, run, None), full)  # the test's own reference is consistent
    differ = [n for n, g in expected.items() if float((g - full[n]).norm()) > 0.2 * float(full[n].norm())]
    assert "0.weight" in differ and ("2.weight" in differ or rank > 1)  # a different target: the test can fail
    check_average(model, run, expected, method="wt-perp", rank=rank, solver=solver)


def test_wt_is_biased_where_wt_perp_full_is_not():
    """The same check rejects ``wt`` (``E[u uᵀ] = J_bᵀ J_b``, not a projector): the comparison has teeth."""
    model, run = mlp_and_batch()
    est = averaged(model, run, method="wt", **GUESSES)
    with pytest.raises(AssertionError, match=r"0.weight"):
        compare(est, backprop(model, run))


@pytest.mark.parametrize(("options", "pattern"), [
    ({"rank": 0}, r"Invalid rank"),
    ({"rank": "101%"}, r"Invalid rank"),
    ({"rank": None, "solver": "randomized"}, r"needs the exact spectrum"),
    ({"solver": "lanczos"}, r"Invalid solver"),
])
def test_bad_wt_perp_options(options, pattern):
    from guess_optim.estimators import make_estimator

    with pytest.raises(ValueError, match=pattern):
        make_estimator("wt-perp", **options)


@pytest.mark.parametrize(("options", "pattern"), [({"sigma": 0.0}, r"Invalid sigma"),
                                                  ({"clip": -1.0}, r"Invalid clip")])
def test_bad_wt_precond_options(options, pattern):
    from guess_optim.estimators import make_estimator

    with pytest.raises(ValueError, match=pattern):
        make_estimator("wt-precond", **options)
