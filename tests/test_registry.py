"""The estimator registry: built-ins, a custom estimator registered from this file, options, errors."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import METHODS, Estimator, Site, attach, get_estimator, register_estimator, unregister_estimator
from guess_optim.estimators import WT, Downstream, make_estimator


@dataclass(frozen=True)
class Scaled(Estimator):
    """A test estimator: ``u = scale * (a fixed ramp)``, so the estimate has a closed form."""

    scale: float = 1.0

    name = "test-ramp"
    summary = "deterministic ramp guesses (tests)"
    unbiased = False

    def guess(self, site: Site) -> torch.Tensor:
        out = site.output
        ramp = torch.linspace(-1.0, 1.0, out[0].numel(), dtype=out.dtype).reshape(out.shape[1:])
        return self.scale * ramp.expand_as(out).clone()


@pytest.fixture
def ramp():
    register_estimator(Scaled)
    yield Scaled
    unregister_estimator("test-ramp")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def test_builtins_are_registered_in_order_with_their_metadata():
    assert list(METHODS)[:7] == ["backprop", "directional", "activation", "mixing", "wt", "downstream",
                                 "self-sharpening"]
    assert [n for n, c in list(METHODS.items())[:7] if c.unbiased] == ["backprop", "directional", "activation"]
    assert {c.space for c in METHODS.values()} == {"backprop", "weight", "activation"}
    assert METHODS["self-sharpening"].exact_head and issubclass(METHODS["self-sharpening"], Downstream)
    assert METHODS["wt"].guess_matmuls == 1 and METHODS["activation"].guess_matmuls == 0
    for cls in METHODS.values():
        assert cls.summary and cls.plot_label() and cls.source


def test_custom_estimator_matches_its_formula(ramp):
    """Registered from a test file, used by name: p.grad = Σ_b d_b u_b x_bᵀ with d_b from backprop's per-example
    pre-activation gradients (computed independently, float64)."""
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    ref = copy.deepcopy(model)
    acts = []
    for m in (ref[0], ref[2]):
        m.register_forward_hook(lambda mod, a, o: (o.retain_grad(), acts.append((a[0].detach(), o)))[-1])
    F.cross_entropy(ref(x), y).backward()
    with attach(model, "test-ramp", scale=2.0, seed=0) as h:
        assert isinstance(h.estimator, Scaled) and h.estimator.scale == 2.0
        F.cross_entropy(model(x), y).backward()
    us = [2.0 * torch.linspace(-1, 1, o.shape[1], dtype=torch.float64).expand_as(o) for _, o in acts]
    d = sum((o.grad * u).sum(1) for (_, o), u in zip(acts, us, strict=True))
    for (inp, _), u, lin in zip(acts, us, (model[0], model[2]), strict=True):
        torch.testing.assert_close(lin.weight.grad, (d[:, None] * u).T @ inp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lin.bias.grad, (d[:, None] * u).sum(0), rtol=1e-10, atol=1e-12)


def test_attach_takes_an_instance_and_legacy_option_names():
    model = mlp()
    with attach(model, WT(power=2.0)) as h:
        assert h.estimator == WT(power=2.0)
    with attach(model, "wt", wt_power=3.0) as h:
        assert h.estimator.power == 3.0
    with attach(model, "downstream", downstream_layers=2, distribution="uniform") as h:
        assert h.estimator == Downstream(layers=2, distribution="uniform")
    assert make_estimator("wt", power=2) == WT(power=2.0)


@pytest.mark.parametrize(("call", "exc", "pattern"), [
    (lambda: attach(mlp(), "wt", layers=2), ValueError, r"method 'wt' has no option 'layers'; its options: 'power'"),
    (lambda: attach(mlp(), "activation", power=2), ValueError, r"has no option 'power'; its options: none"),
    (lambda: attach(mlp(), WT(), power=2.0), ValueError, r"set them on the instance"),
    (lambda: attach(mlp(), WT), TypeError, r"pass an instance"),
    (lambda: attach(mlp(), 3), TypeError, r"registered name"),
    (lambda: attach(mlp(), "nope"), ValueError, r"Unknown method: 'nope'; expected one of 'backprop'"),
    (lambda: WT(power=-1.0), ValueError, r"power"),
    (lambda: Downstream(layers=0), ValueError, r"downstream_layers"),
    (lambda: Downstream(distribution="cauchy"), ValueError, r"distribution"),
])
def test_bad_estimator_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_register_errors(ramp):
    with pytest.raises(ValueError, match=r"already registered"):
        register_estimator(type("Again", (Scaled,), {}))
    assert register_estimator(Scaled) is Scaled  # the same class again is a no-op
    with pytest.raises(TypeError, match=r"subclass of guess_optim.Estimator"):
        register_estimator(int)
    with pytest.raises(ValueError, match=r"non-empty class attribute `name`"):
        register_estimator(type("Nameless", (Estimator,), {}))
    with pytest.raises(ValueError, match=r"must implement guess"):
        register_estimator(type("NoGuess", (Estimator,), {"name": "no-guess"}))
    with pytest.raises(ValueError, match=r"Invalid space"):
        register_estimator(type("Odd", (Scaled,), {"name": "odd", "space": "other"}))
    with pytest.raises(ValueError, match=r"Unknown method"):
        get_estimator("no-such")
    with pytest.raises(ValueError, match=r"Unknown method"):
        unregister_estimator("no-such")


def test_replace_and_unregister(ramp):
    other = type("Other", (Scaled,), {"summary": "replacement"})
    register_estimator(other, replace=True)
    assert METHODS["test-ramp"] is other
    unregister_estimator("test-ramp")
    assert "test-ramp" not in METHODS
    register_estimator(Scaled)  # the fixture unregisters it again
