"""Discovery of next modules from the data flow (``guess_optim.graph``), checked against the edges documented in the
module docstring, and the model-side ops it must survive: in-place ReLU and adds, a ``no_grad`` region inside the
model's forward, ``inference_mode``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import METHODS, attach
from guess_optim.graph import BOUNDARY
from guess_optim.models import MLP

transformers = pytest.importorskip("transformers")

GUESSED = [m for m in METHODS if m != "backprop"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread is as fast as two, and several times faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def graph_of(model, x, **kwargs):
    with attach(model, "wt", seed=0, **kwargs) as h:
        return h.graphs.get((x,), {})


class Block(nn.Module):
    """ResNet basic block; ``inplace``: ``ReLU(inplace=True)`` and ``out += identity``, as torchvision writes it."""

    def __init__(self, c: int, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = Block(4, inplace)
        self.block2 = Block(4, inplace)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.fc(self.block2(self.block1(x)).mean((2, 3)))


def resnet(inplace=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = ResNet(inplace).to(dtype).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.eval()
    return model


def vit(attn="sdpa", layers=2):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=16, num_channels=1, num_labels=3, attn_implementation=attn,
    )
    model = transformers.ViTForImageClassification(config).double().train()
    model.vit.embeddings.cls_token.requires_grad_(False)
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- documented edges
def test_mlp_edges():
    """``fc1 → fc2`` through ``relu``; the output layer's edge leaves the region."""
    model = MLP(6, 3, depth=3, width=5).double()
    graph = graph_of(model, torch.randn(2, 6, dtype=torch.float64))
    assert graph.describe() == {
        "layers.1": [("layers.3", ("relu",))],
        "layers.3": [("layers.5", ("relu",))],
        "layers.5": [(BOUNDARY, ())],
    }
    assert not graph.volatile
    s = torch.randn(2, 5, dtype=torch.float64)
    (edge,) = graph.next_edges(model.layers[1])
    assert edge.consumer is model.layers[3]
    torch.testing.assert_close(edge.chain(s), F.relu(s), rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_resnet_basic_block_edges(inplace):
    """``conv1 → bn1``, ``bn1 → conv2`` through ``relu``, ``conv2 → bn2``, ``bn2 →`` the next block's ``conv1`` and,
    along the skip, the next consumer (here the head) through ``add, relu``; the add captures the identity."""
    model = resnet(inplace)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    graph = graph_of(model, x)
    block = {
        "conv1": [("bn1", ())],
        "bn1": [("conv2", ("relu",))],
        "conv2": [("bn2", ())],
    }
    expected = {
        "stem": [("block1.conv1", ("relu",)), ("block2.conv1", ("relu", "add", "relu")),
                 ("fc", ("relu", "add", "relu", "add", "relu", "mean"))],
        **{f"block1.{k}": [(f"block1.{c}", ops) for c, ops in v] for k, v in block.items()},
        "block1.bn2": [("block2.conv1", ("add", "relu")), ("fc", ("add", "relu", "add", "relu", "mean"))],
        **{f"block2.{k}": [(f"block2.{c}", ops) for c, ops in v] for k, v in block.items()},
        "block2.bn2": [("fc", ("add", "relu", "mean"))],
        "fc": [(BOUNDARY, ())],
    }
    assert graph.describe() == expected
    # The add captured the identity branch by value: replaying the chain on a new bn2 output adds this batch's
    # identity (block1's input after the stem's ReLU).
    assert graph.volatile
    edge = graph.next_edges(model.block1.bn2)[0]
    assert edge.consumer is model.block2.conv1 and edge.chain.volatile
    with torch.no_grad():
        identity = F.relu(model.stem(x))
        s = torch.randn_like(identity)
        torch.testing.assert_close(edge.chain(s), F.relu(s + identity), rtol=0, atol=0)
    assert not graph.next_edges(model.block1.conv1)[0].chain.volatile


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_block_edges(attn):
    """Pre-LN transformer block: ``layernorm_before → q, k, v`` (several consumers); each of ``q, k, v → o_proj``
    through the attention (the other two captured); ``o_proj`` and ``fc2`` → every later LayerNorm along the
    residual stream through the residual adds; ``fc1 → fc2`` through ``gelu``; the final LayerNorm → classifier."""
    model = vit(attn)
    graph = graph_of(model, torch.randn(2, 1, 8, 8, dtype=torch.float64), head=model.classifier)
    desc = graph.describe()
    lns = ["vit.layers.0.layernorm_before", "vit.layers.0.layernorm_after", "vit.layers.1.layernorm_before",
           "vit.layers.1.layernorm_after", "vit.layernorm"]
    # the patch embedding: flatten into tokens, concatenate the CLS token, add position embeddings, then residual
    proj = desc["vit.embeddings.patch_embeddings.projection"]
    assert [c for c, _ in proj] == lns
    for i, (_, ops) in enumerate(proj):
        assert ops == ("flatten", "transpose", "cat", "add") + ("add",) * i
    for layer in range(2):
        p = f"vit.layers.{layer}"
        assert desc[f"{p}.layernorm_before"] == [(f"{p}.attention.{n}_proj", ()) for n in "qkv"]
        for n in "qkv":
            ((consumer, ops),) = desc[f"{p}.attention.{n}_proj"]
            assert consumer == f"{p}.attention.o_proj"
            assert ops[:2] == ("reshape", "transpose")  # a view is replayed as a reshape (after contiguous)
            if attn == "sdpa":
                assert "scaled_dot_product_attention" in ops
            elif n == "v":
                assert "matmul" in ops and "softmax" not in ops  # v enters after the softmax
            else:
                assert ops.count("matmul") == 2 and "softmax" in ops
            (edge,) = graph.next_edges(dict(model.named_modules())[f"{p}.attention.{n}_proj"])
            assert edge.chain.volatile  # the other two projections are captured
        later = lns[2 * layer + 1:]
        assert desc[f"{p}.attention.o_proj"] == [(ln, ("add",) * (i + 1)) for i, ln in enumerate(later)]
        assert desc[f"{p}.layernorm_after"] == [(f"{p}.mlp.fc1", ())]
        assert desc[f"{p}.mlp.fc1"] == [(f"{p}.mlp.fc2", ("gelu",))]
        assert desc[f"{p}.mlp.fc2"] == [(ln, ("add",) * (i + 1)) for i, ln in enumerate(lns[2 * layer + 2:])]
    assert desc["vit.layernorm"] == [("classifier", ("__getitem__",))]
    assert desc["classifier"] == [(BOUNDARY, ())]


# -------------------------------------------------------------------------------------------------- in-place ops
@pytest.mark.parametrize("method", GUESSED)
def test_inplace_relu_and_add_give_the_out_of_place_estimate(method):
    """``ReLU(inplace=True)`` and ``out += identity``: the same estimate as the out-of-place model, the same output,
    and the replayed chains leave the model's tensors alone."""
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    grads = []
    for inplace in (False, True):
        model = resnet(inplace)
        plain = copy.deepcopy(model)(x)
        with attach(model, method, seed=0) as h:
            out = model(x)
            torch.testing.assert_close(out, plain, rtol=0, atol=0)
            F.cross_entropy(out, y).backward()
            assert h.skipped_steps == 0
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-12, atol=1e-14, msg=n)


class WrittenOutSwish(nn.Module):
    """``h * sigmoid(h)`` written out (as HF's ``NewGELUActivation`` writes GELU): the activation's Jacobian goes
    through both operands of the ``mul``, which both come from ``fc1``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 4)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc3(F.relu(self.fc2(h * torch.sigmoid(h))))


def test_written_out_activation_jacobian_goes_through_both_operands():
    """``wt``: ``u_b = J_b^T W_2^T ε_b`` with ``J`` the Jacobian of ``h ↦ h sigmoid(h)``, i.e. ``u_b`` lies in the
    span of the columns of ``diag(silu'(s_b)) W_2^T``."""
    torch.manual_seed(0)
    model = WrittenOutSwish().double()
    x, y = torch.randn(5, 10, dtype=torch.float64), torch.randint(0, 3, (5,))
    with attach(model, "wt", seed=0) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    s = model.fc1(x).detach()
    sig = torch.sigmoid(s)
    jac = sig + s * sig * (1 - sig)
    u, w2 = cap[0]["guess"], model.fc2.weight.detach()
    for b in range(5):
        basis = jac[b][:, None] * w2.T  # rank 4 in R^12
        coef = torch.linalg.lstsq(basis, u[b][:, None]).solution
        torch.testing.assert_close(basis @ coef, u[b][:, None], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------------- grad modes
class NoGradStat(nn.Module):
    """Normalizes a hidden layer by a statistic computed under ``no_grad`` (as in weight/activation standardization
    or quantization scales): backprop treats the statistic as a constant."""

    def __init__(self, stat_of_input: bool = False):
        super().__init__()
        self.stat_of_input = stat_of_input
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        with torch.no_grad():
            scale = (x if self.stat_of_input else h).norm(dim=1, keepdim=True)
        return self.fc2(torch.tanh(h / scale))


def _formula(model, x, y, captured):
    """The activation estimate from backprop's per-example gradients at ``fc1`` and ``fc2``: ``d_b = Σ_i <g_{i,b},
    u_{i,b}>``, ``Σ_b d_b u_{i,b} x_{i,b}^T`` (a copy of the model, ``no_grad`` honoured by backprop)."""
    ref = copy.deepcopy(model)
    saved = []

    def keep(module, args, out):
        out.retain_grad()
        saved.append((args[0].detach(), out))

    hooks = [m.register_forward_hook(keep) for m in (ref.fc1, ref.fc2)]
    F.cross_entropy(ref(x), y).backward()
    for h in hooks:
        h.remove()
    us = [c["guess"] for c in captured]
    d = sum((o.grad * u).sum(1) for (_, o), u in zip(saved, us, strict=True))
    out = {}
    for name, (inp, _), u in zip(("fc1", "fc2"), saved, us, strict=True):
        go = d[:, None] * u
        out[f"{name}.weight"], out[f"{name}.bias"] = go.T @ inp, go.sum(0)
    return out


def _check_no_grad_model(stat_of_input, method="activation", store="activations"):
    torch.manual_seed(0)
    model = NoGradStat(stat_of_input).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with attach(model, method, seed=0, store=store) as h, h.capture() as cap:
        out = model(x)
        assert torch.is_grad_enabled()
        assert all(p.requires_grad for p in model.parameters())  # restored at the end of the guessing forward
        assert "GuessedGradient" in type(out.grad_fn).__name__
        F.cross_entropy(out, y).backward()
    expected = _formula(model, x, y, cap[:2])  # recompute captures the same guesses again in its second forward
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12, msg=n)


def test_no_grad_region_on_the_input_runs_and_restores_grad_mode():
    """A ``no_grad`` block inside forward that touches no tracked activation: the estimate is the backprop formula's,
    and grad mode is restored after the forward."""
    _check_no_grad_model(stat_of_input=True)


@pytest.mark.parametrize("method,store", [("activation", "activations"), ("activation", "recompute"),
                                          ("wt", "activations"), ("downstream", "recompute")])
def test_no_grad_region_on_an_activation_is_a_constant_as_in_backprop(method, store):
    """A statistic of a hidden activation computed under ``no_grad``: backprop treats it as a constant, so must the
    guessed gradient (tangents are dropped inside the region, and the graph does not follow it)."""
    _check_no_grad_model(stat_of_input=False, method=method, store=store)


class NoGradGate(nn.Module):
    """A gate computed by a parametrized module under ``no_grad``: backprop gives ``gate`` no gradient (``None``) and
    treats its output as a constant factor."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        with torch.no_grad():
            g = torch.sigmoid(self.gate(h))
        return self.fc2(torch.tanh(h) * g)


@pytest.mark.parametrize("method,store", [("activation", "activations"), ("wt", "activations"), ("wt", "recompute")])
def test_a_module_called_under_no_grad_gets_no_estimate(method, store):
    torch.manual_seed(0)
    model = NoGradGate().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    assert ref.gate.weight.grad is None
    with attach(model, method, seed=0, store=store) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
        if method == "wt":
            graph = h.graphs.get((x,), {})
            assert [e.consumer for e in graph.next_edges(model.fc1)] == [model.fc2]
    assert [c["module"] for c in cap[:2]] == ["fc1", "fc2"]
    assert model.gate.weight.grad is None and model.gate.bias.grad is None
    saved = []

    def keep(module, args, out):
        out.retain_grad()
        saved.append((args[0].detach(), out))

    hooks = [m.register_forward_hook(keep) for m in (ref.fc1, ref.fc2)]
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    for hk in hooks:
        hk.remove()
    us = [c["guess"] for c in cap[:2]]
    d = sum((o.grad * u).sum(1) for (_, o), u in zip(saved, us, strict=True))
    for name, (inp, _), u in zip(("fc1", "fc2"), saved, us, strict=True):
        go = d[:, None] * u
        mod = getattr(model, name)
        torch.testing.assert_close(mod.weight.grad, go.T @ inp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mod.bias.grad, go.sum(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_inference_mode_and_no_grad_run_the_plain_model(name):
    model = resnet() if name == "resnet" else vit()
    kwargs = {} if name == "resnet" else {"head": model.classifier}
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = plain(x)
    expected = getattr(expected, "logits", expected)
    with attach(model, "wt", seed=0, **kwargs) as h:
        for ctx in (torch.inference_mode, torch.no_grad):
            with ctx():
                out = model(x)
            out = getattr(out, "logits", out)
            assert out.grad_fn is None
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert h._step is None
        assert all(p.grad is None for p in model.parameters())
        out = model(x)  # a guessing step still works afterwards
        out = getattr(out, "logits", out)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_replay_failure_is_a_graph_error_naming_the_op():
    from guess_optim.graph import Chain, GraphError

    chain = Chain(((torch.Tensor.transpose, (object(), 0, 1), {}),))  # an operand the replay cannot use
    with pytest.raises(GraphError, match=r"replaying 'transpose'.*method='activation'"):
        chain(torch.randn(2, 3))


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", ["activation", "wt"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hugging_face_gradient_checkpointing_gives_the_same_estimate(reentrant, method, store):
    """Guessing records no reverse graph, so the engine turns the model's gradient checkpointing off for its
    forwards (a reentrant checkpoint has no JVP) and back on after: the estimate is the uncheckpointed model's."""
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        model = vit()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        with attach(model, method, seed=0, store=store, head=model.classifier):
            F.cross_entropy(model(x).logits, y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert model.vit.layers[0].gradient_checkpointing is True  # restored
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-12, atol=1e-14, msg=n)


class CheckpointedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x, checkpoint=True):
        h = torch.tanh(self.fc1(x))
        block = lambda t: t + self.fc2(torch.tanh(t))  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpoint else block(h)
        return self.fc3(torch.tanh(h))


@pytest.mark.parametrize("method", ["activation", "wt", "downstream"])
def test_torch_checkpoint_inside_the_forward_gives_the_same_estimate(method):
    """A non-reentrant ``torch.utils.checkpoint`` region: the engine's own reverse passes (graph replays) keep their
    saved tensors instead of handing them to the checkpoint's recomputation."""
    torch.manual_seed(0)
    model = CheckpointedBlock().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    grads = []
    for checkpoint in (False, True):
        m = copy.deepcopy(model)
        with attach(m, method, seed=0):
            F.cross_entropy(m(x, checkpoint=checkpoint), y).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


class _PromptedTokens(nn.Module):
    """Prompt tokens concatenated with the input tokens, a frozen LayerNorm and a projection (a VPT block's start),
    then a token mix: only the prompt's rows of the projection's input depend on the prompt."""

    def __init__(self):
        super().__init__()
        from guess_optim import PromptTokens

        self.prompts = PromptTokens(2, 4, init="normal")
        self.norm = nn.LayerNorm(4, elementwise_affine=False)
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):  # [B, T, 4]
        h = self.proj(self.norm(torch.cat([x[:, :1], self.prompts(x.shape[0]), x[:, 1:]], 1)))
        return self.head(torch.tanh(h).mean(1))


def test_wt_draws_only_the_rows_that_reach_the_guess_point(monkeypatch):
    """A prompt's ``wt`` guess draws ``ε`` only on the projection's rows that depend on the prompt (2 of 7 tokens):
    the guess's second moment ``E[u_b u_bᵀ]`` is the same as when ``ε`` is drawn on every row (the others have no
    path to the prompt), measured over 40,000 guesses each."""
    import guess_optim.site as site

    torch.manual_seed(0)
    model = _PromptedTokens().double()
    for p in (model.proj.weight, model.proj.bias, model.head.weight, model.head.bias):
        p.requires_grad_(False)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    drawn = []

    def second_moment(seed: int) -> torch.Tensor:
        with attach(model, "wt", seed=seed, num_guesses=20000) as handle, handle.capture() as calls:
            model(x).sum().backward()
        u = next(c["guess"] for c in calls if c["module"] == "prompts").reshape(20000, 2, -1)  # [K, B, P*D]
        drawn.append(u.shape)
        return torch.einsum("kbi,kbj->bij", u, u) / u.shape[0]

    real, found = site._dependent_span, []
    monkeypatch.setattr(site, "_dependent_span", lambda x, leaf: found.append(real(x, leaf)) or found[-1])
    narrowed = (second_moment(0) + second_moment(1)) / 2
    assert found and all(span == (1, 1, 3) for span in found)  # tokens 1 and 2 of 7
    spans = []
    monkeypatch.setattr(site, "_dependent_span", lambda x, leaf: spans.append(x.shape) or None)
    full = (second_moment(0) + second_moment(1)) / 2
    assert spans and all(s[1] == 7 for s in spans)  # the projection's input: 7 tokens, 2 of them the prompt's
    assert torch.allclose(narrowed, full, rtol=0.05, atol=0.03 * float(full.abs().max()))
    assert not torch.allclose(narrowed, full, rtol=1e-6, atol=0)  # different draws, the same law


def test_a_dead_tensors_id_is_not_taken_for_parameter_only():
    """Discovery remembers tensors computed from trainable parameters alone by id; an id whose tensor died may be
    reused by a batch tensor, which must not then be taken for parameter-only (the same seed gave different ``wt``
    estimates depending on garbage collection)."""
    import weakref

    from guess_optim.graph import _Tracer

    tracer = _Tracer(set(), {1})
    t, other = torch.randn(3), torch.randn(3)
    tracer.derived[id(t)] = (weakref.ref(other), (1,))  # the entry of a tensor that died, its id now t's
    assert not tracer._is_derived(t)
    tracer.derived[id(t)] = (weakref.ref(t), (1,))
    assert tracer._is_derived(t)
