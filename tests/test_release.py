"""``attach(..., gradient_release=True)`` with :class:`~guess_optim.optim.OptimizerInBackward`: the optimizer steps
inside ``backward()``, one parameter at a time, and gives the parameters of the plain loop."""

from __future__ import annotations

import copy
import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import NonFiniteEstimateWarning, attach
from guess_optim.models import MLP, ConvNet
from guess_optim.optim import OptimizerInBackward, StableAdamW

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 throughout


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def mlp_and_batch():
    torch.manual_seed(0)
    model = MLP(12, 4, depth=4, width=10)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)


def conv_and_batch():
    torch.manual_seed(0)
    model = ConvNet(2, 3)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    "stable-adamw": functools.partial(StableAdamW, lr=1e-2, weight_decay=0.1),
}


def plain_and_released(build, method, *, optimizer="adamw", steps=1, **options):
    """The same model trained ``steps`` steps by the plain loop and by stepping in backward; both models."""
    model, x, y = build()
    plain, released = copy.deepcopy(model), copy.deepcopy(model)
    factory = OPTIMIZERS[optimizer]
    attach(plain, method, seed=3, **options)
    opt = factory(plain.parameters())
    attach(released, method, seed=3, gradient_release=True, **options)
    in_backward = OptimizerInBackward(released, factory)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        F.cross_entropy(released(x), y).backward()
    in_backward.remove()
    return model, plain, released


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("build", [mlp_and_batch, conv_and_batch], ids=["mlp", "conv"])
@pytest.mark.parametrize("method", ["activation", "wt", "directional"])
def test_same_parameters_as_the_plain_loop_with_recompute(method, build, steps):
    start, plain, released = plain_and_released(build, method, steps=steps, store="recompute")
    for (name, p), q, p0 in zip(plain.named_parameters(), released.parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, p0), name  # the step moved it
        torch.testing.assert_close(q, p, **TOL, msg=name)
        assert q.grad is None, name


@pytest.mark.parametrize("optimizer", ["sgd", "stable-adamw"])
def test_same_parameters_with_sgd_and_stable_adamw(optimizer):
    _, plain, released = plain_and_released(mlp_and_batch, "wt", optimizer=optimizer, steps=2, store="recompute")
    for p, q in zip(plain.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)


@pytest.mark.parametrize("options", [
    {"store": "activations"},
    {"store": "activations", "num_guesses": 2, "combine": "project"},
    {"store": "recompute", "num_guesses": 2},
    {"store": "recompute", "exact_head": True},
], ids=["activations", "project", "recompute-k2", "exact-head"])
def test_same_parameters_with_other_options(options):
    _, plain, released = plain_and_released(mlp_and_batch, "wt", steps=2, **options)
    for p, q in zip(plain.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)
        assert q.grad is None


class Tied(nn.Module):
    """A weight used twice (input embedding and output projection), a raw parameter, a weight-normed layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.scale = nn.Parameter(torch.ones(5))
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(5, 5))

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids) * self.scale)).mean(1)
        return F.linear(h, self.emb.weight)


@pytest.mark.parametrize("store", ["activations", "recompute"])
def test_tied_raw_and_parametrized_parameters_are_delivered_after_their_last_use(store):
    def build():
        torch.manual_seed(0)
        return Tied(), torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4,))

    _, plain, released = plain_and_released(build, "activation", steps=2, store=store)
    for p, q in zip(plain.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)


class Reused(nn.Module):
    """A module called twice (``shared``: its first call's next module is ``mid``, whose next module is ``shared``
    again); ``tied=True`` also reads ``inp``'s weight at the output (an op-level guess point)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.tied = tied
        self.inp, self.shared, self.mid = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = None if tied else nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        h = torch.tanh(self.shared(torch.tanh(self.mid(h))))
        return F.linear(h, self.inp.weight) if self.tied else self.out(h)


@pytest.mark.parametrize("tied", [False, True], ids=["reused", "reused-tied"])
@pytest.mark.parametrize("method", ["wt", "downstream", "mixing", "activation", "wt-perp", "self-sharpening"])
def test_a_module_called_twice_with_recompute(method, tied):
    """A structured guess reads its next modules' weights: replayed in backward, it must read the values the first
    forward read, although a next module whose uses are all in (``mid``, read again by ``shared``'s second call) could
    already be stepped."""

    def build():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        return Reused(tied), torch.randn(4, 8, generator=g), torch.randint(0, 8 if tied else 3, (4,), generator=g)

    start, plain, released = plain_and_released(build, method, optimizer="sgd", store="recompute")
    for (name, p), q, p0 in zip(plain.named_parameters(), released.parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, p0), name
        torch.testing.assert_close(q, p, **TOL, msg=name)
        assert q.grad is None, name


def test_each_estimate_is_stepped_and_freed_before_the_next_layer_runs():
    """The structure of the memory saving: during ``backward()`` the replayed forward of layer i is followed by the
    steps of layer i's parameters, before layer i+1 is called; when a parameter is stepped, every earlier estimate is
    already gone (no reference anywhere) and no other parameter holds a ``.grad``."""
    model, x, y = mlp_and_batch()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    names = {id(p): n for n, p in model.named_parameters()}
    attach(model, "wt", seed=0, store="recompute", gradient_release=True)
    events, live, in_backward = [], [], [False]

    def forward_pre_hook(module, args):
        if in_backward[0]:
            events.append(("forward", linears.index(module)))

    def step_hook(p):
        assert all(r() is None for r in live), "an earlier estimate is still alive"
        assert [q for q in model.parameters() if q.grad is not None] == [p]
        live.append(weakref.ref(p.grad))
        events.append(("step", names[id(p)]))

    for m in linears:
        m.register_forward_pre_hook(forward_pre_hook)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_hook)  # runs before the optimizer's hook
    opt = OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    loss = F.cross_entropy(model(x), y)
    in_backward[0] = True
    loss.backward()
    expected = []
    for i in range(len(linears)):
        expected += [("forward", i), ("step", f"layers.{2 * i + 1}.weight"), ("step", f"layers.{2 * i + 1}.bias")]
    assert events == expected
    assert all(r() is None for r in live)
    opt.remove()


def test_no_estimate_is_kept_by_the_engine_after_backward():
    model, x, y = mlp_and_batch()
    handle = attach(model, "activation", seed=0, store="activations", gradient_release=True)
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert handle.skipped_steps == 0 and not handle.last_step_skipped


def test_without_a_stepping_hook_the_estimates_accumulate_as_usual_with_a_warning():
    model, x, y = mlp_and_batch()
    plain = copy.deepcopy(model)
    attach(plain, "wt", seed=0, store="recompute")
    attach(model, "wt", seed=0, store="recompute", gradient_release=True)
    F.cross_entropy(plain(x), y).backward()
    with pytest.warns(UserWarning, match="no optimizer stepped it in backward"):
        F.cross_entropy(model(x), y).backward()
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL)


@pytest.mark.parametrize("attached", [False, True])
def test_backprop_steps_in_backward_too(attached):
    """OptimizerInBackward with plain backprop (no attach, or method="backprop") is the same as the plain loop."""
    model, x, y = mlp_and_batch()
    plain = copy.deepcopy(model)
    if attached:
        attach(model, "backprop", gradient_release=True)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    OptimizerInBackward(model, functools.partial(torch.optim.AdamW, lr=1e-2))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        F.cross_entropy(model(x), y).backward()
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)


# ----------------------------------------------------------------------------------------------- non-finite estimates
def huge_input_batch():
    """A batch whose feature 0 is 1e308 with the first layer's column 0 zero: the forward stays finite, and (with the
    loss scaled by 1e3) the first weight's estimate ``(d u) xᵀ`` overflows, while every other estimate (and ``d``) is
    finite."""
    model, x, y = mlp_and_batch()
    with torch.no_grad():
        model.layers[1].weight[:, 0] = 0
    x[:, 0] = 1e308
    return model, x, y


@pytest.mark.parametrize("store", ["activations", "recompute"])
def test_a_non_finite_estimate_never_reaches_its_parameter(store):
    model, x, y = huge_input_batch()
    before = copy.deepcopy(model)
    handle = attach(model, "activation", seed=0, store=store, gradient_release=True)
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.warns(NonFiniteEstimateWarning, match=r"layers\.1\.weight.*skipped"):
        (1e3 * F.cross_entropy(model(x), y)).backward()
    assert handle.skipped_steps == 1 and handle.last_step_skipped
    for (name, p), p0 in zip(model.named_parameters(), before.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, p0) == (name == "layers.1.weight"), name  # only the non-finite one was not stepped
        assert p.grad is None


def test_a_non_finite_estimate_raises_with_on_nonfinite_raise():
    model, x, y = huge_input_batch()
    attach(model, "activation", seed=0, store="recompute", gradient_release=True, on_nonfinite="raise")
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(FloatingPointError, match=r"layers\.1\.weight"):
        (1e3 * F.cross_entropy(model(x), y)).backward()
    assert torch.isfinite(model.layers[1].weight).all()
    model(x)  # the raised backward does not block the next forward


def test_non_finite_directional_derivatives_skip_every_parameter():
    model, x, y = mlp_and_batch()
    before = copy.deepcopy(model)
    handle = attach(model, "wt", seed=0, store="recompute", gradient_release=True)
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.warns(NonFiniteEstimateWarning):
        (F.cross_entropy(model(x), y) * float("nan")).backward()
    assert handle.skipped_steps == 1
    for p, p0 in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, p0) and p.grad is None


# ------------------------------------------------------------------------------------------------------- refusals
REFUSALS = [
    ({"gradient_release": "yes"}, ValueError, "Invalid gradient_release"),
    ({"exact_head": "yes"}, ValueError, "Invalid exact_head"),
    ({"gradient_release": True, "on_nonfinite": "propagate"}, ValueError, "on_nonfinite='propagate' is refused"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), REFUSALS)
def test_attach_refuses(kwargs, error, match):
    model, _, _ = mlp_and_batch()
    with pytest.raises(error, match=match):
        attach(model, "wt", **kwargs)


def test_accumulation_is_refused_before_anything_is_stepped():
    model, x, y = mlp_and_batch()
    before = copy.deepcopy(model)
    attach(model, "wt", seed=0, store="recompute", gradient_release=True)
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    model.layers[3].bias.grad = torch.zeros_like(model.layers[3].bias)  # a micro-batch's gradient
    with pytest.raises(RuntimeError, match=r"cannot accumulate.*layers\.3\.bias|layers\.3\.bias.*accumulat"):
        F.cross_entropy(model(x), y).backward()
    for p, p0 in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, p0)


def test_more_than_one_rank_is_refused(monkeypatch):
    model, x, y = mlp_and_batch()
    handle = attach(model, "wt", seed=0, gradient_release=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="2 ranks"):
        model(x)
    handle.remove()
    with pytest.raises(RuntimeError, match="2 ranks"):
        attach(model, "wt", gradient_release=True)


def test_a_ddp_wrapped_model_is_refused(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _, _ = mlp_and_batch()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="DistributedDataParallel-wrapped"):
            attach(ddp, "wt", gradient_release=True)
    finally:
        dist.destroy_process_group()


class _ClosureSGD(torch.optim.SGD):
    """Any optimizer whose ``step`` requires a closure, not only ``LBFGS``."""

    def step(self, closure):
        return super().step(closure)


OPTIMIZER_IN_BACKWARD_ERRORS = [
    (lambda m: ([], OPTIMIZERS["sgd"]), {}, ValueError, "no parameters"),
    (lambda m: ([m.layers[1].weight] * 2, OPTIMIZERS["sgd"]), {}, ValueError, "twice"),
    (lambda m: ([torch.zeros(2)], OPTIMIZERS["sgd"]), {}, ValueError, "requires grad"),
    (lambda m: (m, "sgd"), {}, TypeError, "callable"),
    (lambda m: (m, lambda ps: ps), {}, TypeError, "torch.optim.Optimizer"),
    (lambda m: (m, OPTIMIZERS["sgd"]), {"max_grad_norm": -1.0}, ValueError, "Invalid max_grad_norm"),
    # it was accepted, then failed mid-backward with a raw "LBFGS.step() missing 'closure'"
    (lambda m: (m, torch.optim.LBFGS), {}, ValueError, r"LBFGS.step\(\) requires a closure"),
    (lambda m: (m, _ClosureSGD), {}, ValueError, r"_ClosureSGD.step\(\) requires a closure"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), OPTIMIZER_IN_BACKWARD_ERRORS)
def test_optimizer_in_backward_refuses(args, kwargs, error, match):
    model, _, _ = mlp_and_batch()
    with pytest.raises(error, match=match):
        OptimizerInBackward(*args(model), **kwargs)


def test_optimizer_in_backward_accepts_an_optional_closure():
    class OptionalClosure(torch.optim.SGD):
        def step(self, closure=None, *args, **kwargs):
            return super().step(closure)

    model, _, _ = mlp_and_batch()
    with OptimizerInBackward(model, lambda ps: OptionalClosure(ps, lr=0.1)) as opt:
        assert len(opt) == len(list(model.parameters()))


def test_optimizer_in_backward_clips_per_parameter_and_round_trips_its_state():
    model, x, y = mlp_and_batch()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(x), y).backward()
    for p in plain.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.01)
    opt.step()
    in_backward = OptimizerInBackward(model, functools.partial(torch.optim.AdamW, lr=0.1), max_grad_norm=0.01)
    for group in in_backward.param_groups:
        group["lr"] = 0.1
    in_backward.remove()
    in_backward.remove()  # safe twice
    clipped = OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1), max_grad_norm=0.01)
    F.cross_entropy(model(x), y).backward()
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)
    state = clipped.state_dict()
    assert len(state["optimizers"]) == len(clipped) == len(list(model.parameters()))
    clipped.load_state_dict(state)
    with pytest.raises(ValueError, match="optimizers"):
        clipped.load_state_dict({"optimizers": state["optimizers"][:1]})
    assert "SGD" in repr(clipped)


def test_two_forwards_before_one_backward_are_refused():
    """Summing two forwards' losses would step each parameter twice, the second from a replay on stepped weights."""
    model, x, y = mlp_and_batch()
    attach(model, "wt", seed=0, store="recompute", gradient_release=True)
    OptimizerInBackward(model, functools.partial(torch.optim.SGD, lr=0.1))
    first = F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="second guessing forward"):
        model(x)
    first.backward()
    F.cross_entropy(model(x), y).backward()  # one forward, one backward: fine again
    del first
    model(x)  # a forward whose output is dropped does not block the next one
    F.cross_entropy(model(x), y).backward()


class Prompted(nn.Module):
    """Prompt tokens (a guess point whose output is a view of its parameter) read after their own guess point."""

    def __init__(self):
        super().__init__()
        from guess_optim import PromptTokens

        self.prompts = PromptTokens(2, 5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        prompts = self.prompts(x.shape[0])  # [B, 2, 5], a broadcast view of the parameter
        h = torch.tanh(self.fc(x))  # another layer runs before the prompts are read
        return self.head(torch.cat([prompts, h], 1).mean(1))


@pytest.mark.parametrize("method", ["activation", "wt"])
def test_an_output_that_views_a_stepped_parameter_keeps_the_forward_values(method):
    """PromptTokens returns the parameter expanded to the batch: stepped in place during the replay, the view read
    later must still hold the values the first forward read."""

    def build():
        torch.manual_seed(0)
        return Prompted(), torch.randn(4, 3, 5), torch.randint(0, 3, (4,))

    _, plain, released = plain_and_released(build, method, steps=2, store="recompute")
    for p, q in zip(plain.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)


@pytest.mark.parametrize("method", ["activation", "wt"])
def test_visual_prompt_tuning_of_a_tiny_vit(method):
    """VPT-deep (PromptTokens in every layer, a trained head) on a tiny Hugging Face ViT: the bench's runners with and
    without stepping in backward (same AdamW, same seed) end at the same parameters."""
    pytest.importorskip("transformers")
    from guess_optim.bench.runners import Runner, build
    from guess_optim.bench.suite import Config

    built = build(Config("vpt-vit-tiny", 4), torch.device("cpu"), 0)
    plain, released = Runner(f"{method}@recompute", built, seed=0), Runner(f"{method}@release", built, seed=0)
    for _ in range(2):
        plain.step()
        released.step()
    for p, q in zip(plain.params, released.params, strict=True):
        torch.testing.assert_close(q, p, **TOL)
        assert q.grad is None
