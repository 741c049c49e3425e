"""Bad input gets a clear error naming the fix; nothing is left half-done (issue: reliability)."""

from __future__ import annotations

import gc
import re
import warnings
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from guess_optim import GuessingNotSupportedError, NonFiniteEstimateWarning, attach, handle_of


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


class WithRawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * self.scale


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class WithNoJvp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(NoJvp.apply(self.fc1(x)))


def frozen():
    m = mlp()
    m.requires_grad_(False)
    return m


# (what to call, exception type, message pattern)
BAD_ATTACH = [
    ("unknown method", lambda: attach(mlp(), "sgd"), ValueError, r"Unknown method: 'sgd'; expected one of .*'wt'"),
    ("num_guesses 0", lambda: attach(mlp(), "wt", num_guesses=0), ValueError, r"num_guesses: 0; expected an int >= 1"),
    ("num_guesses -1", lambda: attach(mlp(), "wt", num_guesses=-1), ValueError, r"num_guesses"),
    ("num_guesses float", lambda: attach(mlp(), "wt", num_guesses=2.0), ValueError, r"num_guesses"),
    ("downstream_layers 0", lambda: attach(mlp(), "downstream", downstream_layers=0), ValueError,
     r"downstream_layers"),
    ("negative seed", lambda: attach(mlp(), "wt", seed=-1), ValueError, r"seed"),
    ("bad distribution", lambda: attach(mlp(), "downstream", distribution="cauchy"), ValueError, r"distribution"),
    ("bad store", lambda: attach(mlp(), "wt", store="disk"), ValueError, r"store"),
    ("bad on_nonfinite", lambda: attach(mlp(), "wt", on_nonfinite="ignore"), ValueError, r"on_nonfinite"),
    ("wt_power nan", lambda: attach(mlp(), "wt", wt_power=float("nan")), ValueError, r"wt_power"),
    ("wt_power other method", lambda: attach(mlp(), "mixing", wt_power=2.0), ValueError, r"wt_power"),
    ("backprop with num_guesses", lambda: attach(mlp(), "backprop", num_guesses=3), ValueError,
     r"apply to guessed methods"),
    ("not a module", lambda: attach(lambda x: x, "wt"), TypeError, r"expects an nn.Module"),
    ("no trainable parameters", lambda: attach(frozen(), "wt"), ValueError, r"no trainable parameters"),
    ("refused layer", lambda: attach(nn.Sequential(nn.LSTM(4, 4)), "wt", raw_parameters="error"), ValueError,
     r"LSTM.*trainable parameters.*freeze them"),
    ("refused raw parameter", lambda: attach(WithRawParameter(), "wt", raw_parameters="error"), ValueError,
     r"raw_parameters='guess'"),
    ("bad raw_parameters", lambda: attach(mlp(), "wt", raw_parameters="no"), ValueError, r"raw_parameters"),
    ("compiled model", lambda: attach(torch.compile(mlp()), "wt"), ValueError, r"torch.compile"),
    ("head not a submodule", lambda: attach(mlp(), "wt", head=nn.Linear(2, 2)), ValueError, r"head"),
]


@pytest.mark.parametrize("name,call,exc,pattern", BAD_ATTACH, ids=[b[0] for b in BAD_ATTACH])
def test_bad_attach_arguments(name, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_attach_twice_and_remove_twice():
    model = mlp()
    h = attach(model, "wt")
    with pytest.raises(RuntimeError, match=r"already has guessed gradients attached.*remove\(\)"):
        attach(model, "activation")
    h.remove()
    h.remove()  # safe to call twice, like torch.utils.hooks.RemovableHandle.remove
    assert handle_of(model) is None
    attach(model, "activation").remove()


class LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        logits = self.fc(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def test_loss_inside_forward_without_head_is_a_clear_error():
    """A loss computed inside forward from guessed activations mixes the examples: refused, naming the fix."""
    model = LossInside()
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    with attach(model, "wt"):
        with pytest.raises(GuessingNotSupportedError, match=r"output of the model\['loss'\].*pass head="):
            model(x, y)
        # the model stays usable: the dual level and the contexts were closed
        assert torch.is_grad_enabled() and fwAD._current_level == -1
    with attach(model, "wt", head=model.fc):  # the fix
        model(x, y)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dict_output_without_head_works():
    model = DictOutput()
    with attach(model, "activation", seed=0):
        out = model(torch.randn(2, 4))["logits"]
        assert "GuessedGradient" in type(out.grad_fn).__name__
        out.sum().backward()
    assert model.fc.weight.grad is not None


def test_dict_output_with_head_works():
    model = DictOutput()
    x = torch.randn(5, 4)
    with attach(model, "activation", head=model.fc, seed=0):
        model(x)["logits"].pow(2).sum().backward()
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()


def test_loss_not_a_scalar_is_pytorchs_usual_error():
    model = mlp()
    with attach(model, "wt"), pytest.raises(RuntimeError, match=r"grad can be implicitly created only for scalar"):
        model(torch.randn(2, 4)).backward()


def test_op_without_forward_ad_formula():
    model = WithNoJvp()
    with attach(model, "activation", seed=0):
        with pytest.raises(GuessingNotSupportedError, match=r"no forward-mode AD formula.*method='backprop'"):
            model(torch.randn(3, 4))
        assert torch.is_grad_enabled() and fwAD._current_level == -1
        model.eval()
        assert model(torch.randn(3, 4)).shape == (3, 3)  # still usable


def test_train_mode_batchnorm_refused_with_alternative():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with attach(model, "wt"):
        with pytest.raises(RuntimeError, match=r"training mode.*GroupNorm"):
            model(torch.randn(4, 4))
        model[1].eval()
        model(torch.randn(4, 4)).sum().backward()
    assert model[0].weight.grad is not None


def test_inputs_on_other_device_than_model():
    model = mlp().to("meta")
    with attach(model, "wt"), pytest.raises(ValueError, match=r"different devices"):
        model(torch.randn(2, 4))


def test_exception_in_forward_leaves_model_usable():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.fail = True

        def forward(self, x):
            y = self.fc(x)
            if self.fail:
                raise KeyError("boom")
            return y

    model = Boom()
    with attach(model, "activation", seed=0):
        with pytest.raises(KeyError):
            model(torch.randn(2, 4))
        assert torch.is_grad_enabled() and fwAD._current_level == -1
        assert all(p.requires_grad for p in model.parameters())  # briefly off during the guessing forward
        model.fail = False
        model(torch.randn(2, 4)).sum().backward()
    assert model.fc.weight.grad is not None


def test_nonfinite_estimate_is_skipped_with_a_warning():
    model = mlp()
    x = torch.randn(4, 4)
    with attach(model, "wt", seed=0) as h:
        with pytest.warns(NonFiniteEstimateWarning, match=r"not written") as caught:
            (model(x).sum() * float("nan")).backward()
        ours = [w for w in caught if w.category is NonFiniteEstimateWarning]
        assert ours[0].filename == __file__  # points at the user's backward() line, not into the engine
        assert h.last_step_skipped and h.skipped_steps == 1
        assert all(p.grad is None for p in model.parameters())
        model(x).sum().backward()  # next step is fine again
        assert not h.last_step_skipped and h.skipped_steps == 1
    with attach(model, "wt", seed=0, on_nonfinite="raise"):
        with pytest.raises(FloatingPointError):
            (model(x).sum() * float("inf")).backward()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_loss_scales_give_finite_proportional_estimates(scale):
    model = mlp().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    with attach(model, "wt", seed=0):
        model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with attach(model, "wt", seed=0), warnings.catch_warnings():
        warnings.simplefilter("error")
        (model(x).sum() * scale).backward()
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r * scale, rtol=1e-10, atol=0)


def test_bfloat16_autocast_gives_finite_estimates():
    model = mlp()
    x = torch.randn(8, 4)
    with attach(model, "wt", seed=0), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).sum().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


def test_global_rng_untouched():
    """Guesses come from the handle's generator: the user's global RNG stream is the same with and without."""
    model = mlp()
    x = torch.randn(4, 4)
    torch.manual_seed(5)
    model(x).sum().backward()
    plain = torch.rand(3)
    for method in ["wt", "mixing", "directional", "self-sharpening"]:
        torch.manual_seed(5)
        with attach(model, method, seed=0, store="recompute" if method == "wt" else "activations"):
            model(x).sum().backward()
        assert torch.equal(torch.rand(3), plain), method


def test_remove_leaves_no_hook_no_dual_no_batch_reference():
    model = mlp()
    x = torch.randn(4, 4)
    ref = weakref.ref(x)
    h = attach(model, "wt", seed=0)
    loss = model(x).sum()
    loss.backward()
    h.remove()
    del x, loss
    gc.collect()
    assert ref() is None, "a reference to the batch outlived the step"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert "forward" not in model.__dict__
    assert fwAD._current_level == -1
    assert re.search("GuessHandle", repr(h))


@pytest.mark.parametrize("method", ["activation", "wt", "directional"])
def test_a_layers_tangent_dies_once_the_next_layers_have_used_it(method):
    """Records keep a layer's input and guess for backward, never its tangent: during the guessing forward, the
    tangents of layers already passed are freed (peak memory of a deep model stays one tangent, not one per layer)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8),
                          nn.Tanh(), nn.Linear(8, 3))
    tangents, alive = [], []

    def keep(module, args, out):
        tangent = fwAD.unpack_dual(out).tangent
        if tangent is not None:  # not wt's graph-discovery forward
            tangents.append(weakref.ref(tangent))

    def check(module, args):
        if tangents:
            gc.collect()
            alive.append([t() is not None for t in tangents])

    hooks = [model[i].register_forward_hook(keep) for i in (1, 3, 6)]
    hooks.append(model[7].register_forward_pre_hook(check))
    with attach(model, method, seed=0):
        model(torch.randn(5, 4)).sum().backward()
    for h in hooks:
        h.remove()
    assert alive == [[False, False, True]]  # only the last Tanh's output (model[7]'s input) is still in use


def test_second_backward_through_one_forward_is_refused_clearly():
    model = mlp()
    with attach(model, "wt", seed=0):
        loss = model(torch.randn(3, 4)).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=r"second backward.*Sum the losses"):
            loss.backward()


def test_deep_copy_of_an_attached_model_can_be_detached():
    import copy

    from guess_optim import handle_of

    model = mlp()
    h = attach(model, "wt", seed=0)
    clone = copy.deepcopy(model)
    h.remove()
    with pytest.raises(RuntimeError, match=r"handle_of\(model\)\.remove\(\)"):
        attach(clone, "wt")
    handle_of(clone).remove()
    assert handle_of(clone) is None
    attach(clone, "activation").remove()


@pytest.mark.parametrize("kind", ["full", "pre", "global"])
def test_module_backward_hooks_are_refused_and_parameter_hooks_run(kind):
    """No gradient flows backward through the modules while guessing: a module backward hook would never run (a hook
    that changes gradients would silently not change the estimate). Refused, naming the module; parameter hooks run
    on the estimates."""
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 4)
    if kind == "global":
        hook = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    elif kind == "full":
        hook = model[2].register_full_backward_hook(lambda m, gi, go: None)
    else:
        hook = model[2].register_full_backward_pre_hook(lambda m, go: None)
    try:
        with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError,
                                                                match="backward hook.*never run"):
            model(x)
        assert fwAD._current_level == -1
    finally:
        hook.remove()
    with attach(model, "activation", seed=0):
        model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for p in model.parameters():
        p.register_hook(lambda g: 2 * g)
    with attach(model, "activation", seed=0):
        model(x).sum().backward()
    for p, g in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_nested_attach_is_refused():
    """A submodule of an attached model, or a model containing an attached submodule: refused at attach (it used to
    fail at the next forward with a misleading forward-AD error)."""
    model = mlp()
    with attach(model, "activation"), pytest.raises(RuntimeError, match="submodule of a model that already"):
        attach(model[0], "activation")
    with attach(model[0], "activation"), pytest.raises(RuntimeError, match="submodule '0' of this model already"):
        attach(model, "activation")
    with attach(model, "activation"):  # both removed: attaching again is fine
        model(torch.randn(2, 4)).sum().backward()


def test_lazy_module_not_materialized_is_refused_at_attach():
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'0.weight' is not initialized yet.*run one forward"):
        attach(model, "activation")
    with torch.no_grad():
        model(torch.randn(2, 4))
    with attach(model, "activation", seed=0):
        model(torch.randn(2, 4)).sum().backward()
    assert model[0].weight.grad is not None
