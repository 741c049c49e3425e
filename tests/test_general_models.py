"""Guessed gradients on general models (issue #4): a ConvNet, a ResNet basic block with BatchNorm in eval mode, an
MLP-Mixer block and a tiny Hugging Face ``ViTForImageClassification`` (SDPA and eager attention).

Each model is checked against backprop computed independently in the test, in float64:

* exact formula, one guess: from backprop's per-example gradients ``g_{i,b} = ∂L/∂s_{i,b}`` at every guess point
  (``retain_grad`` on each guess point's output in a deep copy taken before attaching), the directional derivative
  is ``d_b = Σ_i <g_{i,b}, u_{i,b}>`` and the estimate of module ``i``'s parameters is the VJP through that single
  module of ``d_b u_{i,b}`` (paper §2.1, A.4); for ``directional``, ``(Σ_i <∂L/∂θ_i, V_i>) V_i``;
* unbiasedness: ``activation`` and ``directional`` averaged over many guesses approach backprop's gradient;
* training: every method lowers the loss on ``mnist-5k`` (a subset in the default run, all pairs in the slow set);
* ``store="recompute"`` gives the estimate of ``store="activations"``; dropout masks are the user's; BatchNorm (eval:
  statistics untouched; train: refused), running statistics updated once per step; frozen parameters; parameters
  outside guess points (``raw_parameters="directional"``); ops without a forward-AD formula; ``num_guesses``
  (paper Fig. 3 left).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import GUESS_POINT_TYPES, METHODS, GuessingNotSupportedError, attach
from guess_optim.models import MLP, ConvNet

transformers = pytest.importorskip("transformers")

# These two need each example's whole Jacobian spectrum: refused on the ConvNet and ResNet (JacobianTooLargeError), slow
# on the ViT; tests/test_follow_up.py runs them on the Mixer, the ViT and the small models.
WHOLE_SPECTRUM = {"wt-perp-ns", "wt-precond"}
GUESSED = [m for m in METHODS if m != "backprop" and m not in WHOLE_SPECTRUM]
MODELS = ["convnet", "resnet", "mixer", "vit", "vit-eager"]
TOL64 = {"rtol": 1e-9, "atol": 1e-12}  # float64, same ops in a different order
TOL32 = {"rtol": 1e-5, "atol": 1e-7}  # float32
TOL_EAGER = {"rtol": 1e-6, "atol": 1e-8}  # HF eager attention takes its softmax in float32, even in a float64 model




@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread is as fast as two, and several times faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """ResNet basic block: ``conv-bn-relu-conv-bn`` plus the identity, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNetNet(nn.Module):
    """Stem conv, ReLU, max pool, one basic block, average pool to ``pool x pool``, linear head. Input
    ``[B, 1, H, W]``, output ``[B, 10]``."""

    def __init__(self, channels: int = 8, num_classes: int = 10, pool: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block = BasicBlock(channels)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(pool * pool * channels, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        return self.fc(self.pool(self.block(x)).flatten(1))


class MixerNet(nn.Module):
    """One MLP-Mixer block (Tolstikhin et al. 2021): patchify, token mixing over the transposed token dim and channel
    mixing, both pre-LayerNorm with residuals, then LayerNorm, mean over tokens, linear head."""

    def __init__(self, image: int = 28, patch: int = 7, dim: int = 32, hidden: int = 32, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patchify = nn.Conv2d(1, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, hidden)
        self.token_fc2 = nn.Linear(hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, hidden)
        self.channel_fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.patchify(x).flatten(2).transpose(1, 2)  # [B, tokens, dim]
        y = self.token_fc2(F.gelu(self.token_fc1(self.norm1(x).transpose(1, 2))))  # [B, dim, tokens]
        x = x + self.dropout(y.transpose(1, 2))
        x = x + self.dropout(self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x)))))
        return self.head(self.norm(x).mean(1))


def make_vit(*, image=28, patch=7, hidden=32, layers=2, intermediate=64, attn="sdpa", dropout=0.0, attn_dropout=0.0):
    config = transformers.ViTConfig(
        image_size=image, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate, num_channels=1, num_labels=10, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attn_dropout, attn_implementation=attn,
    )
    return transformers.ViTForImageClassification(config)


def build(name: str, *, tiny: bool = False, image: int = 28, dtype=torch.float64, seed: int = 0, dropout: float = 0.0,
          attn_dropout: float = 0.0, raw: str = "freeze"):
    """``(model, attach kwargs, input shape)``: the model in train mode (BatchNorm in eval mode, with non-trivial
    statistics). ``tiny``: the smallest sizes, for tests that average many guesses. ``raw``: what to do with the
    ViT's ``cls_token``/``position_embeddings``: ``"freeze"`` or ``"directional"`` (``raw_parameters=``)."""
    torch.manual_seed(seed)
    kwargs = {}
    if tiny:
        image = 4
    if name == "convnet":
        model = ConvNet(1, 10)
    elif name == "resnet":
        model = ResNetNet(*((2, 10, 2) if tiny else (8,)))
        for bn in (model.block.bn1, model.block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    elif name == "mixer":
        model = MixerNet(image, 2 if tiny else 7, *((4, 4) if tiny else (32, 32)), dropout=dropout)
    elif name.startswith("vit"):
        attn = "eager" if name == "vit-eager" else "sdpa"
        sizes = {"patch": 2, "hidden": 4, "layers": 1, "intermediate": 8} if tiny else {}
        model = make_vit(image=image, attn=attn, dropout=dropout, attn_dropout=attn_dropout, **sizes)
        kwargs["head"] = model.classifier
        if raw == "freeze":
            model.vit.embeddings.cls_token.requires_grad_(False)
            model.vit.embeddings.position_embeddings.requires_grad_(False)
        else:
            kwargs["raw_parameters"] = raw
    elif name == "mlp":
        model = MLP(image * image, 10, depth=4, width=8 if tiny else 32)
        if dropout:
            model.layers.insert(3, nn.Dropout(dropout))
    else:
        raise ValueError(name)
    model = model.to(dtype).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model, kwargs, (1, image, image)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def loss_of(model, x, y):
    return F.cross_entropy(logits(model(x)), y)


def batch(shape, n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------------------------------------------- reference
def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def backprop_reference(model, x, y, rng_state=None):
    """Backprop on a deep copy: each guess-point call's ``(name, module, inputs, ∂L/∂output)``, in call order, and
    ``{parameter name: ∂L/∂θ}``. ``rng_state``: the global RNG state to run the forward with (dropout)."""
    ref = copy.deepcopy(model)
    calls = []

    def hook(module, args, out, name):
        out.retain_grad()
        calls.append((name, module, tuple(a.detach() for a in args), out))

    hooks = [m.register_forward_hook(functools.partial(hook, name=n)) for n, m in ref.named_modules()
             if isinstance(m, GUESS_POINT_TYPES) and trainable(m)]
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    loss_of(ref, x, y).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    return [(n, m, a, o.grad.detach()) for n, m, a, o in calls], grads


def _repeat(t, k):
    return t.repeat(k, *([1] * (t.dim() - 1)))


def expected_activation_space(calls, captured, grads, k=1):
    """``Σ_b d_b u_b`` pulled back through each single module (exact gradient where no guess was drawn)."""
    assert [c[0] for c in calls] == [c["module"] for c in captured]
    d = sum((_repeat(g, k) * c["guess"]).flatten(1).sum(1)
            for (_, _, _, g), c in zip(calls, captured, strict=True) if c["guess"] is not None)
    expected: dict[str, torch.Tensor] = {}
    for (name, module, inputs, _), c in zip(calls, captured, strict=True):
        params = trainable(module)
        if c["guess"] is None:  # exact head: its exact (local) gradient
            local = {n: grads[f"{name}.{n}"] for n in params}
        else:
            u = c["guess"]
            grad_out = d.reshape(-1, *([1] * (u.dim() - 1))) * u
            with torch.enable_grad():
                out = module(*(_repeat(a, k) for a in inputs))
                local = dict(zip(params, torch.autograd.grad(out, list(params.values()), grad_out), strict=True))
            local = {n: g / k for n, g in local.items()}
        for n, g in local.items():
            key = f"{name}.{n}"
            expected[key] = g if key not in expected else expected[key] + g
    return expected


def expected_directional(calls, captured, grads, k=1):
    """``Σ_j (Σ_i <∂L/∂θ_i, V_{i,j}>) V_{i,j} / K``."""
    assert [c[0] for c in calls] == [c["module"] for c in captured]
    d = [sum((grads[f"{c['module']}.{n}"] * v).sum() for c in captured for n, v in c["tangents"][j].items())
         for j in range(k)]
    return {f"{c['module']}.{n}": sum(d[j] * c["tangents"][j][n] for j in range(k)) / k
            for c in captured for n in c["tangents"][0]}


def expected_estimate(method, calls, captured, grads, k=1):
    if method == "directional":
        return expected_directional(calls, captured, grads, k)
    return expected_activation_space(calls, captured, grads, k)


def assert_estimates(model, expected, tol=TOL64):
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


# -------------------------------------------------------------------------------------------- exact formula
@pytest.mark.parametrize("method", GUESSED)
@pytest.mark.parametrize("name", MODELS)
def test_estimate_matches_backprop_formula(name, method):
    """One step, one guess: ``p.grad`` is exactly the estimate built from backprop's per-example gradients."""
    model, kwargs, shape = build(name)
    x, y = batch(shape)
    calls, grads = backprop_reference(model, x, y)
    with attach(model, method, seed=0, **kwargs) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
    assert len(cap) == len(calls) > 0
    exact = [c["module"] for c in cap if c["guess"] is None and c["tangents"] is None]
    assert exact == (["classifier" if name.startswith("vit") else calls[-1][0]] if METHODS[method].exact_head else [])
    assert_estimates(model, expected_estimate(method, calls, cap, grads), TOL_EAGER if name == "vit-eager" else TOL64)


@pytest.mark.parametrize("method", ["activation", "wt", "directional"])
@pytest.mark.parametrize("name", ["resnet", "mixer", "vit"])
def test_estimate_matches_backprop_formula_num_guesses(name, method):
    """``num_guesses=3``: the average of the three guesses' estimates, each from the same backprop reference."""
    model, kwargs, shape = build(name)
    x, y = batch(shape, n=2)
    calls, grads = backprop_reference(model, x, y)
    with attach(model, method, seed=0, num_guesses=3, **kwargs) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
    assert_estimates(model, expected_estimate(method, calls, cap, grads, k=3))


class ConvVariety(nn.Module):
    """The convolution variants whose tangent the engine computes apart (strided, dilated, grouped, Conv1d, no bias)
    or leaves to forward-mode AD (``padding_mode="reflect"``). Input ``[B, 1, 8, 8]``."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.conv_r = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.conv_c = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(6 * 8, 10)

    def forward(self, x):
        h = torch.tanh(self.conv_a(x))
        h = torch.tanh(self.conv_r(torch.tanh(self.conv_b(h)))).flatten(2)
        return self.fc(torch.relu(self.conv_c(h)).flatten(1))


@pytest.mark.parametrize("method", GUESSED)
def test_convolution_variants_match_backprop_formula(method):
    torch.manual_seed(0)
    model = ConvVariety().double()
    x, y = batch((1, 8, 8))
    calls, grads = backprop_reference(model, x, y)
    with attach(model, method, seed=0) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
        assert set(h.layout.product_modules) == {model.conv_a, model.conv_b, model.conv_c, model.fc}  # not conv_r
    assert [c["module"] for c in cap] == ["conv_a", "conv_b", "conv_r", "conv_c", "fc"]
    assert_estimates(model, expected_estimate(method, calls, cap, grads))


class SharedResidual(nn.Module):
    """One Linear applied twice on a residual stream (its graph captures activations, so the step frees it after
    the last guess-point call that reads it: the shared module's second call must still find it)."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.shared, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 10)

    def forward(self, x):
        h = self.fc_in(x)
        h = h + self.shared(torch.tanh(h))
        h = h + self.shared(torch.tanh(h))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", ["wt", "mixing", "downstream"])
def test_module_called_twice_on_a_volatile_graph(method, store):
    torch.manual_seed(0)
    model = SharedResidual().double()
    x, y = batch((5,))
    calls, grads = backprop_reference(model, x, y)
    with attach(model, method, seed=0, store=store) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
        assert h.graphs.get((x,), {}).volatile
    cap = cap[:4]  # recompute captures the same guesses again
    assert [c["module"] for c in cap] == ["fc_in", "shared", "shared", "head"]
    assert not torch.equal(cap[1]["guess"], cap[2]["guess"])
    # both calls of the shared module get a structured guess (the graph is kept until its last reader)
    assert [sorted(set(c["next_modules"])) for c in cap] == [["head", "shared"]] * 3 + [[]]
    assert_estimates(model, expected_estimate(method, calls, cap, grads))


class MultiOutput(nn.Module):
    """Ops that return several tensors between guess points: ``chunk`` (GLU), ``unbind`` (q, k, v), ``max(dim=)``
    and a frozen ``nn.MultiheadAttention`` (which returns ``(output, weights)``)."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.qkv, self.fc_out = nn.Linear(5, 16), nn.Linear(8, 24), nn.Linear(8, 10)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True).requires_grad_(False)

    def forward(self, x):
        a, b = self.fc_in(x).chunk(2, dim=-1)
        h = (a * torch.sigmoid(b)).reshape(x.shape[0], 1, 8).expand(-1, 3, -1).contiguous()
        q, k, v = self.qkv(h).reshape(x.shape[0], 3, 3, 8).permute(2, 0, 1, 3).unbind(0)
        h = h + F.scaled_dot_product_attention(q, k, v)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.fc_out(h.max(dim=1).values)


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", GUESSED)
def test_multi_output_ops_are_replayed(method, store):
    torch.manual_seed(0)
    model = MultiOutput().double()
    x, y = batch((5,))
    calls, grads = backprop_reference(model, x, y)
    with attach(model, method, seed=0, store=store) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
    cap = cap[:3]
    assert [c["module"] for c in cap] == ["fc_in", "qkv", "fc_out"]
    if METHODS[method].needs is not None:
        assert [sorted(set(c["next_modules"])) for c in cap] == [["fc_out", "qkv"], ["fc_out"], []]
    assert_estimates(model, expected_estimate(method, calls, cap, grads))


# ---------------------------------------------------------------------------------------------------- unbiasedness
def _estimate(model, kwargs, x, y, method, seed, **extra):
    model.zero_grad(set_to_none=True)
    with attach(model, method, seed=seed, **kwargs, **extra):
        loss_of(model, x, y).backward()
    return flat_grads(model)


def _squared_bias(model, kwargs, x, y, method, k):
    """``(c, relative error of the mean)`` from two independent estimates ``a, b`` (seeds 0, 1) of ``k`` guesses
    each: ``c = <a - g, b - g> / |g|^2`` has expectation ``|E[ĝ] - g|^2 / |g|^2`` (the squared relative bias; the
    variance cancels because the two errors are independent), with a spread ``~ rel_err^2 / sqrt(dim)``, far below
    the relative error of either estimate."""
    g = torch.cat([v.flatten() for v in backprop_reference(model, x, y)[1].values()])
    a = _estimate(model, kwargs, x, y, method, 0, num_guesses=k)
    b = _estimate(model, kwargs, x, y, method, 1, num_guesses=k)
    c = float((a - g) @ (b - g) / (g @ g))
    return c, float(((a + b) / 2 - g).norm() / g.norm())


# K per (model, method): enough guesses for the bias statistic's spread to be a few times below the bound. The
# directional estimate costs one call per guess and module, and its spread grows with the number of parameters: the
# default run checks it on the Mixer (Conv2d, LayerNorm and Linear); the other models are in the slow set.
UNBIASED = [
    ("convnet", "activation", 1000), ("resnet", "activation", 2000), ("mixer", "activation", 2000),
    ("vit", "activation", 2000), ("mixer", "directional", 600),
    *(pytest.param(n, "directional", k, marks=pytest.mark.slow)
      for n, k in (("resnet", 2000), ("vit", 2000), ("convnet", 5000))),
]


@pytest.mark.parametrize(("name", "method", "k"), UNBIASED)
def test_unbiased_methods_average_to_the_gradient(name, method, k):
    """``activation`` and ``directional``: ``E[ĝ] = ∇L`` on each model (tiny sizes, float64). The squared relative
    bias (see ``_squared_bias``) is below 0.05, while a biased method (``wt``) shows ~1 (next test)."""
    model, kwargs, shape = build(name, tiny=True)
    x, y = batch(shape, n=4)
    c, rel = _squared_bias(model, kwargs, x, y, method, k)
    assert abs(c) < 0.05, f"squared relative bias {c:.4f} (relative error of the mean of two estimates {rel:.3f})"
    assert rel < 1.0  # the estimates do approach the gradient


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_bias_statistic_detects_a_biased_method(name):
    model, kwargs, shape = build(name, tiny=True)
    x, y = batch(shape, n=4)
    c, _ = _squared_bias(model, kwargs, x, y, "wt", 500)
    assert c > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mixer", "vit"])
def test_unbiased_methods_relative_error_with_many_guesses(name):
    """The literal check: the average of many guesses is within 15% of backprop's gradient."""
    model, kwargs, shape = build(name, tiny=True)
    x, y = batch(shape, n=4)
    g = torch.cat([v.flatten() for v in backprop_reference(model, x, y)[1].values()])
    for method, k in (("activation", 20000), ("directional", 25000)):
        est = _estimate(model, kwargs, x, y, method, 0, num_guesses=k)
        rel = float((est - g).norm() / g.norm())
        assert rel < 0.15, f"{method}: relative error {rel:.3f}"


def test_vit_raw_parameters_directional_formula():
    """``raw_parameters="directional"`` with ``directional``: the ViT's ``cls_token`` and ``position_embeddings`` (no
    guess point) get ``d V`` with ``V`` of norm ``sqrt(numel)``, and ``d = Σ <∂L/∂θ, V>`` over every parameter,
    theirs included. ``d`` is read off a guess point's estimate (``V`` captured there), ``V_raw = p.grad / d``."""
    model, kwargs, shape = build("vit", raw="directional")
    x, y = batch(shape)
    _, grads = backprop_reference(model, x, y)
    with attach(model, "directional", seed=0, **kwargs) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
    modules = dict(model.named_modules())
    cap = [c for c in cap if c["module"] in modules]  # the module guess points (raw parameters are captured too)
    params = dict(model.named_parameters())
    v0 = cap[0]["tangents"][0]["weight"]
    d = float((params[f"{cap[0]['module']}.weight"].grad * v0).sum() / (v0 * v0).sum())
    captured = expected_directional([(c["module"],) for c in cap], cap, grads)
    raw = ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"]
    total = sum(float((grads[n] * params[n].grad).sum()) / d for n in raw)
    d_captured = sum(float((grads[f"{c['module']}.{n}"] * v).sum()) for c in cap for n, v in c["tangents"][0].items())
    assert math.isclose(d, d_captured + total, rel_tol=1e-9)
    for n in raw:
        v = params[n].grad / d
        assert math.isclose(float(v.norm()), math.sqrt(v.numel()), rel_tol=1e-9)
    for n, e in captured.items():  # the guess points' estimates use the same d (which includes the raw terms)
        torch.testing.assert_close(params[n].grad, e * d / d_captured, **TOL64)


@pytest.mark.slow
def test_vit_raw_parameters_directional_unbiased_over_steps():
    """``raw_parameters="directional"``: the ViT's ``cls_token`` and ``position_embeddings`` (no guess point) get a
    weight-space guess, unbiased over steps (one guess per step, shared by the ``num_guesses`` blocks)."""
    model, kwargs, shape = build("vit", tiny=True, raw="directional")
    for n, p in model.named_parameters():
        p.requires_grad_("embeddings.cls_token" in n or "position_embeddings" in n)
    x, y = batch(shape, n=4)
    g = torch.cat([v.flatten() for v in backprop_reference(model, x, y)[1].values()])
    means = []
    for seed in (0, 1):
        total = torch.zeros_like(g)
        with attach(model, "activation", seed=seed, **kwargs):
            for _ in range(300):
                model.zero_grad(set_to_none=True)
                loss_of(model, x, y).backward()
                total += flat_grads(model)
        means.append(total / 300)
    c = float((means[0] - g) @ (means[1] - g) / (g @ g))
    assert abs(c) < 0.05, f"squared relative bias {c:.4f}"


# -------------------------------------------------------------------------------------------------------- training
@functools.cache
def mnist(image: int):
    from guess_optim.data import load_dataset

    x, y = load_dataset("mnist-5k").train.tensors
    return (F.adaptive_avg_pool2d(x, image) if image != 28 else x), y


def train(name, method, *, steps, image=14, lr=3e-3, batch_size=32, seed=0):
    """AdamW on ``mnist-5k`` (images average-pooled to ``image``); the loss on a fixed random set of 512 training
    images (all classes: the split is stored sorted by class) before and after."""
    x, y = mnist(image)
    held = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))[:512]
    model, kwargs, _ = build(name, image=image, dtype=torch.float32, seed=seed, raw="directional")
    if name == "resnet":  # the training statistics of a fresh BatchNorm
        for bn in (model.block.bn1, model.block.bn2):
            bn.reset_parameters()

    def evaluate():
        with torch.no_grad():
            return float(loss_of(model, x[held], y[held]))

    before = evaluate()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    with attach(model, method, seed=seed, **kwargs) as h:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=g)
            opt.zero_grad()
            loss_of(model, x[idx], y[idx]).backward()
            opt.step()
        assert h.skipped_steps == 0
    return before, evaluate()


# Criterion: the loss on 512 held-out-from-the-batch-order training images drops by at least 2%. Default run: every
# model and every method at least once, 100 steps (a few seconds each; the ViT's structured methods, which rediscover
# the attention graph every step, run there only in the slow set). Measured at 100 steps (before -> after): convnet wt
# 3e-3 passes, convnet self-sharpening 1e-3 2.31 -> 1.75, resnet activation 3e-3 2.32 -> 2.17, mixer mixing 3e-3
# 2.28 -> 1.69, mixer directional 1e-2 2.28 -> 2.20, vit downstream 3e-3 2.31 -> 2.22.
TRAIN_FAST = [("convnet", "wt", 3e-3), ("convnet", "self-sharpening", 1e-3), ("resnet", "activation", 3e-3),
              ("mixer", "mixing", 3e-3), ("mixer", "directional", 1e-2), ("vit", "downstream", 3e-3)]
LOSS_DROP = 0.98


@pytest.mark.parametrize(("name", "method", "lr"), TRAIN_FAST)
def test_training_lowers_the_loss(name, method, lr):
    before, after = train(name, method, steps=100, lr=lr)
    assert after < LOSS_DROP * before, f"loss {before:.3f} -> {after:.3f}"


# The slow set: every model and every method, 300 steps at lr 3e-3 (AdamW). Measured over lr 1e-3 / 3e-3 / 1e-2
# (before -> after, ratio at 3e-3): every pair drops by 2.5% or more, the weakest being directional (convnet 0.954,
# vit 0.937, resnet 0.975). Exceptions: mixing on the ViT with eager attention diverges at 3e-3 (2.31 -> 2.52) and
# trains at 1e-3 (0.922); directional on the ResNet block gets 500 steps (2.32 -> 2.25, 0.967): weight perturbation
# is the weakest estimator, as in the paper (Fig. 2).
def _slow_run(name, method):
    lr = 1e-3 if name.startswith("vit") and method == "mixing" else 3e-3
    steps = 500 if (name, method) == ("resnet", "directional") else 300
    return lr, steps


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["convnet", "resnet", "mixer", "vit", "vit-eager"])
def test_training_lowers_the_loss_every_method(name, method):
    """The acceptance criterion: every method lowers the loss of every model within a few hundred steps."""
    lr, steps = _slow_run(name, method)
    before, after = train(name, method, steps=steps, lr=lr)
    assert after < LOSS_DROP * before, f"loss {before:.3f} -> {after:.3f}"


# ------------------------------------------------------------------------------------------ store="recompute"
DROPOUT_MODELS = {"mlp": {"dropout": 0.2}, "mixer": {"dropout": 0.2}, "vit": {"dropout": 0.1, "attn_dropout": 0.1},
                  "vit-eager": {"dropout": 0.1, "attn_dropout": 0.1}}


@pytest.mark.parametrize("method", GUESSED)
@pytest.mark.parametrize("name", ["convnet", "resnet", "mixer", "vit", "vit-eager", "mlp"])
def test_recompute_matches_activations(name, method):
    """Same seed, same global RNG state: ``store="recompute"`` writes the estimate of ``store="activations"``
    (float32, ``num_guesses=2``, dropout where the model has it, the ViT's raw parameters guessed) and leaves the
    global RNG where ``store="activations"`` leaves it."""
    model, kwargs, shape = build(name, dtype=torch.float32, raw="directional", **DROPOUT_MODELS.get(name, {}))
    x, y = batch(shape, dtype=torch.float32)
    grads, states = [], []
    for store in ("activations", "recompute"):
        m = copy.deepcopy(model)
        kw = {**kwargs, "head": m.classifier} if "head" in kwargs else kwargs
        torch.manual_seed(7)
        with attach(m, method, seed=0, store=store, num_guesses=2, **kw):
            loss_of(m, x, y).backward()
        states.append(torch.get_rng_state())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert torch.equal(states[0], states[1])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, **TOL32, msg=n)


# --------------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("method", GUESSED)
@pytest.mark.parametrize("name", list(DROPOUT_MODELS))
def test_dropout_mask_is_the_users(name, method):
    """Under the same global RNG state, the guessing forward returns the plain forward's output (same dropout
    masks), leaves the RNG where the plain forward leaves it, and the estimate is the backprop formula's computed
    with those masks."""
    model, kwargs, shape = build(name, **DROPOUT_MODELS[name])
    x, y = batch(shape, n=4)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    calls, grads = backprop_reference(model, x, y, rng_state=state)
    with torch.no_grad():
        torch.set_rng_state(state)
        plain = logits(copy.deepcopy(model)(x))
        after_plain = torch.get_rng_state()
    with attach(model, method, seed=0, **kwargs) as h, h.capture() as cap:
        torch.set_rng_state(state)
        out = logits(model(x))
        assert torch.equal(torch.get_rng_state(), after_plain)
        torch.testing.assert_close(out, plain, **TOL64)
        F.cross_entropy(out, y).backward()
    assert_estimates(model, expected_estimate(method, calls, cap, grads), TOL_EAGER if name == "vit-eager" else TOL64)


def test_dropout_is_active_in_the_dropout_models():
    """Sanity of the test above: the dropout is active (the masks are random), so matching outputs is informative."""
    model, _, shape = build("mlp", **DROPOUT_MODELS["mlp"])
    x, _ = batch(shape, n=4)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------------------------------- BatchNorm
def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", GUESSED)
def test_eval_mode_batchnorm_statistics_do_not_change(method, store):
    model, kwargs, shape = build("resnet")
    x, y = batch(shape)
    before = _bn_stats(model)
    with attach(model, method, seed=0, store=store, **kwargs):
        loss_of(model, x, y).backward()
    for n, b in _bn_stats(model).items():
        assert torch.equal(b, before[n]), n


def test_train_mode_batchnorm_is_refused_with_a_clear_error():
    model, kwargs, shape = build("resnet")
    model.block.bn2.train()
    x, y = batch(shape)
    before = _bn_stats(model)
    with attach(model, "wt", seed=0, **kwargs) as h:
        with pytest.raises(RuntimeError, match=r"block\.bn2.*training mode.*eval\(\).*GroupNorm"):
            model(x)
        assert torch.is_grad_enabled() and h._step is None
        for n, b in _bn_stats(model).items():  # refused before anything ran
            assert torch.equal(b, before[n]), n
        model.eval()  # the model stays usable
        model(x)
        model.train()
        model.block.bn1.eval()
        model.block.bn2.eval()
        loss_of(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_train_mode_batchnorm_is_refused_too():
    """Frozen or not, a BatchNorm in training mode mixes the examples of a batch (its batch statistics), which breaks
    the per-example directional derivatives: refused like a trainable one, before anything ran."""
    model, kwargs, shape = build("resnet")
    model.block.bn1.requires_grad_(False).train()
    x, _ = batch(shape)
    before = _bn_stats(model)
    with attach(model, "activation", seed=0, **kwargs), pytest.raises(RuntimeError, match=r"block\.bn1.*GroupNorm"):
        model(x)
    for n, b in _bn_stats(model).items():
        assert torch.equal(b, before[n]), n


class InstanceNormNet(nn.Module):
    """An ``InstanceNorm1d`` with running statistics, in training mode: per-example statistics (no mixing of
    examples), so guessing may run through it, and its running statistics move once per forward."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.norm = nn.InstanceNorm1d(3, track_running_stats=True)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x).view(-1, 3, 4)).flatten(1)))


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", GUESSED)
def test_running_statistics_update_once_per_step(method, store):
    """Running statistics move exactly as in one plain forward: neither the graph discovery, nor the replayed ops
    while drawing a structured guess (here ``instance_norm`` in the chain ``fc1 -> fc2``), nor the second forward of
    ``store="recompute"`` may update them again."""
    torch.manual_seed(0)
    model = InstanceNormNet().double().train()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    plain = copy.deepcopy(model)
    plain(x)
    with attach(model, method, seed=0, store=store):
        F.cross_entropy(model(x), y).backward()
    for n, b in plain.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[n], b, rtol=0, atol=0, msg=n)


# -------------------------------------------------------------------------------------- ops without forward AD
class _NoJvp(torch.autograd.Function):
    """A custom op with a backward but no ``jvp``: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


class CustomOp(nn.Module):
    def forward(self, x):
        return _NoJvp.apply(x)


class Cdist(nn.Module):
    """``torch.cdist`` to fixed anchors: a built-in op without a forward-AD formula."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("anchors", torch.randn(5, d))

    def forward(self, x):
        return torch.cdist(x, self.anchors.to(x.dtype))


@pytest.mark.parametrize("op", [CustomOp, Cdist], ids=["custom-function", "cdist"])
@pytest.mark.parametrize("store", ["activations", "recompute"])
def test_op_without_forward_ad_raises_a_clear_error(op, store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), op(6) if op is Cdist else op(), nn.Linear(5 if op is Cdist else 6, 3))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    plain = model(x).detach()
    with attach(model, "wt", seed=0, store=store) as h:
        fix = r"(?s)no forward-mode AD formula.*Replace the op.*method='backprop'"
        with pytest.raises(GuessingNotSupportedError, match=fix) as info:
            model(x)
        assert "Trying to use forward AD" in str(info.value) or "jvp" in str(info.value)
        # Nothing is left open: grad mode, no dual level, no half step; the model still evaluates and backprops.
        assert torch.is_grad_enabled() and h._step is None
        assert torch.autograd.forward_ad._current_level == -1
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
        with h.paused():
            F.cross_entropy(model(x), y).backward()
    # With the op replaced by a supported one, guessing works again (a new handle: the guess points are fixed at
    # attach time).
    model.zero_grad(set_to_none=True)
    model[1] = nn.SiLU() if op is CustomOp else nn.Linear(6, 5)
    with attach(model, "wt", seed=0, store=store):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_op_without_forward_ad_after_frozen_layers_is_fine():
    """No tangent reaches the op when everything before it is frozen: the step runs and only the head learns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), CustomOp(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with attach(model, "activation", seed=0):
        F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None


# ------------------------------------------------------------------------------------------- frozen backbone
@pytest.mark.parametrize("method", GUESSED)
def test_frozen_vit_backbone(method):
    """Only the classifier and the final LayerNorm train: estimates for them only, exactly the formula's, and the
    frozen parameters' ``grad`` stays ``None``."""
    model, kwargs, shape = build("vit")
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("classifier.", "vit.layernorm.")))
    x, y = batch(shape)
    calls, grads = backprop_reference(model, x, y)
    assert [c[0] for c in calls] == ["vit.layernorm", "classifier"]
    with attach(model, method, seed=0, **kwargs) as h, h.capture() as cap:
        loss_of(model, x, y).backward()
    assert [c["module"] for c in cap] == ["vit.layernorm", "classifier"]
    assert_estimates(model, expected_estimate(method, calls, cap, grads))
    assert sum(p.grad is not None for p in model.parameters()) == 4


# ------------------------------------------------------------------------------------------------ num_guesses
def test_cosine_grows_with_num_guesses_for_unbiased_and_saturates_for_biased():
    """Paper Fig. 3 (left): averaging K guesses, the unbiased ``activation`` keeps improving from K = 64 to 1024
    while the biased ``wt`` has reached its plateau (MLP, depth 3, width 256, mean over 3 seeds)."""
    from guess_optim.diagnostics import cosine_similarity

    torch.manual_seed(0)
    model = MLP(32, 10, depth=3, width=256).double()
    x, y = torch.randn(4, 32, dtype=torch.float64), torch.randint(0, 10, (4,))

    def cos(method, k):
        return sum(cosine_similarity(model, method, (x, y), F.cross_entropy, seed=s, num_guesses=k).total
                   for s in range(3)) / 3

    act = {k: cos("activation", k) for k in (1, 64, 1024)}
    wt = {k: cos("wt", k) for k in (1, 64, 1024)}
    assert act[1] < act[64] < act[1024] and wt[1] < wt[64] < wt[1024]
    assert act[1024] / act[64] > 2.0, act  # ~ sqrt(16) while the variance dominates
    assert wt[1024] / wt[64] < 1.3, wt  # bias-limited
    assert wt[1] > act[1]  # ... though a single wt guess is the better one


@pytest.mark.parametrize("method", ["wt-precond", "wt-perp"])
def test_recompute_matches_activations_for_the_whole_spectrum_methods(method):
    """Their guess is drawn through the per-example singular vectors of the upstream Jacobian; ``eigh``'s basis inside a
    near-degenerate subspace moved with the replay's roundoff, so the replay drew another guess than the forward's
    (``wt-precond`` on a tiny ViT: estimates off by 80-110%). Drawn basis-free now (``spectral.filtered_guess``)."""
    model, kwargs, shape = build("vit", tiny=True)
    x, y = batch(shape)
    grads = []
    for store in ("activations", "recompute"):
        m = copy.deepcopy(model)
        kw = {**kwargs, "head": m.classifier} if "head" in kwargs else kwargs
        with attach(m, method, seed=0, store=store, **kw):
            loss_of(m, x, y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-7, atol=1e-9, msg=n)
