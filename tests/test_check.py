"""guess_optim.check flags each kind of problem it claims to find on purpose-built broken models, and passes correct
models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guess_optim
from guess_optim import check


class ScaledJvp(torch.autograd.Function):
    """tanh with a forward-mode formula scaled by ``scale`` (a custom op with a wrong JVP: 0 drops the tangent)."""

    @staticmethod
    def forward(x, scale):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]
        ctx.save_for_forward(output)
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):  # the right derivative: backprop, the reference, is exact
        (y,) = ctx.saved_tensors
        return g * (1 - y * y), None

    @staticmethod
    def jvp(ctx, t, _):
        (y,) = ctx.saved_tensors
        return ctx.scale * t * (1 - y * y)


class Net(nn.Module):
    def __init__(self, scale=1.0, hidden_outside=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.scale, self.hidden_outside = scale, hidden_outside
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        h = self.fc1(x)
        h = ScaledJvp.apply(h, self.scale) if self.scale != 1.0 else torch.tanh(h)
        if self.hidden_outside:  # an op the engine cannot see (as a C++ extension that skips __torch_function__)
            with torch._C.DisableTorchFunction():
                h = h @ self.w
        else:
            h = h @ self.w
        return self.fc2(h)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def statuses(report):
    return {p.name: p.status for p in report.parameters}


def test_a_correct_model_is_safe():
    torch.manual_seed(0)
    for method in ("activation", "directional"):
        report = check(Net(), batch(), F.cross_entropy, method=method)
        assert report.safe, str(report)
        assert "safe" in report.verdict and "NOT" not in report.verdict
        assert all(p.status == "ok" for p in report.parameters)


def test_a_dropped_tangent_is_flagged_as_lost():
    torch.manual_seed(0)
    report = check(Net(scale=0.0), batch(), F.cross_entropy, num_guesses=8192)
    s = statuses(report)
    assert s["fc1.weight"] == s["fc1.bias"] == "tangent lost"
    assert s["fc2.weight"] == "ok" and not report.safe and "tangent lost: fc1.weight" in report.verdict


def test_a_wrong_forward_formula_is_flagged_as_biased():
    torch.manual_seed(0)
    report = check(Net(scale=2.0), batch(), F.cross_entropy, num_guesses=8192)
    s = statuses(report)
    assert s["fc1.weight"] == "biased" and s["fc2.bias"] == "ok"
    assert 1.5 < next(p for p in report.parameters if p.name == "fc1.weight").ratio < 2.5


def test_a_sign_flipped_formula_is_biased_not_lost_even_when_noisy():
    """With few guesses the average of a sign-flipped estimate may be within the noise of zero; it points against the
    gradient (ratio about -1), so it is ``biased``, not ``tangent lost``."""
    torch.manual_seed(0)
    report = check(Net(scale=-1.0), batch(), F.cross_entropy, num_guesses=256)
    fc1 = next(p for p in report.parameters if p.name == "fc1.weight")
    assert fc1.status == "biased" and fc1.ratio < -0.5, str(report)


def test_an_op_the_engine_cannot_see_is_flagged_as_no_estimate():
    torch.manual_seed(0)
    report = check(Net(hidden_outside=True), batch(), F.cross_entropy)
    assert statuses(report)["w"] == "no estimate" and "no estimate: w" in report.verdict
    text = str(report)
    assert "parameter" in text.splitlines()[1] and "NOT safe" in text.splitlines()[-1]


def test_unused_parameters_are_not_problems():
    torch.manual_seed(0)
    model = Net()
    model.extra = nn.Parameter(torch.ones(2))
    report = check(model, batch(), F.cross_entropy)
    assert statuses(report)["extra"] == "unused" and report.safe


@pytest.mark.parametrize(("call", "pattern"), [
    (lambda m: check(m, batch(), F.cross_entropy, method="wt"), r"'wt' is biased"),
    (lambda m: check(m, batch(), F.cross_entropy, method="backprop"), r"backprop itself"),
    (lambda m: check(m.eval(), batch(), F.cross_entropy), r"training mode"),
    (lambda m: check(m, batch(), F.cross_entropy, num_guesses=1), r"num_guesses"),
])
def test_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(Net())


def test_leaves_grads_and_attach_state_alone():
    model = Net()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    check(model, batch(), F.cross_entropy, num_guesses=64)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert guess_optim.handle_of(model) is None
    with guess_optim.attach(model, "wt"), pytest.raises(ValueError, match=r"remove the model's handle"):
        check(model, batch(), F.cross_entropy)
