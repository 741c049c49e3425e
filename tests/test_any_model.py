"""Correct on any model a user brings, or a clear error: one regression test per failure class of the issue.

For every pattern that is accepted, the average of many ``activation`` (and, where relevant, ``directional``) guesses
matches backprop's gradient per parameter in cosine and projection ratio (float64; ``tests/unbiased.py``); every
pattern that cannot be estimated raises an error that names the fix. No test accepts a raw PyTorch error.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from unbiased import averaged, backprop, compare

import guess_optim
from guess_optim import GuessingNotSupportedError, attach
from guess_optim.graph import GraphError


@pytest.fixture(autouse=True)
def _float64_one_thread():
    n, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(dtype)


def data(batch=3, features=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g)


METHODS = ["activation", pytest.param("directional", marks=pytest.mark.slow)]
"""The unbiased methods. ``activation`` averages 200,000 guesses in a second or two on these models (the K guesses
of a step ride the batch) and must be within a few percent of backprop per parameter. ``directional`` guesses of
parameters outside the fast paths are measured one guess block at a time (one op call per block), and a parameter
broadcast to the batch shares one guess per step: its check (the slow set) is that the error of the average is within
its measured noise, and the noise small."""


def check(model, run, method, guesses=None, **options):
    if method == "activation":
        est = averaged(model, run, method=method, guesses=guesses or 200000, per_step=20000, **options)
        return compare(est, backprop(model, run))
    noise = {}
    est = averaged(model, run, method=method, guesses=guesses or 40000, per_step=100, noise=noise, **options)
    return compare(est, backprop(model, run), noise=noise)


def estimates(model, run, method, **options):
    """``{name: p.grad}`` after one guessed step of ``run(model)`` (a loss) with seed 0."""
    with attach(model, method, seed=0, **options):
        run(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict, rtol: float = 1e-10) -> None:
    for n, g in a.items():
        torch.testing.assert_close(b[n], g, rtol=rtol, atol=1e-12, msg=n)


# --------------------------------------------------------------------------------------------- auxiliary outputs
class AuxOutput(nn.Module):
    """Returns the logits and a hidden state; the loss regularises the hidden state."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h), h


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_auxiliary_output_used_in_the_loss(head, method):
    torch.manual_seed(0)
    model, (x, y) = AuxOutput(), data()

    def run(m):
        logits, h = m(x)
        return F.cross_entropy(logits, y) + 0.5 * (h ** 2).sum(1).mean()

    check(model, run, method, **({"head": model.fc2} if head else {}))


class HiddenStates(nn.Module):
    """A Hugging Face-style dict: logits, all hidden states, and a loss computed inside forward after the head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(5, 5) for _ in range(2))
        self.classifier = nn.Linear(5, 3)

    def forward(self, x, labels):
        states = [x]
        for layer in self.layers:
            states.append(F.gelu(layer(states[-1])))
        logits = self.classifier(states[-1])
        return {"loss": F.cross_entropy(logits, labels), "logits": logits, "hidden_states": tuple(states)}


@pytest.mark.parametrize("method", METHODS)
def test_hidden_states_returned_beside_a_loss_computed_after_the_head(method):
    torch.manual_seed(0)
    model, (x, y) = HiddenStates(), data()

    def run(m):
        out = m(x, labels=y)
        return out["loss"] + 0.3 * out["hidden_states"][1].pow(2).mean()

    check(model, run, method, head=model.classifier)


# ------------------------------------------------------------------------------- parameters outside their module
class OutsideUse(nn.Module):
    """A weight read outside its module's forward, and an embedding tied functionally to the output layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        h = torch.tanh(h @ self.lin.weight.T + self.lin.bias)
        return F.linear(h, self.emb.weight)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_used_outside_its_module_and_functional_tying(method):
    torch.manual_seed(0)
    model = OutsideUse()
    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 5, 2])
    check(model, lambda m: F.cross_entropy(m(ids), y), method)


# ------------------------------------------------------------------------------------ broadcast guess points
class PositionEmbeddings(nn.Module):
    """Position ids of shape (1, L) from a buffer (BERT, GPT-2), a trainable cls token and a (1, L, D) parameter."""

    def __init__(self, length=4, dim=6):
        super().__init__()
        self.tok = nn.Embedding(9, dim)
        self.pos = nn.Embedding(length, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.extra = nn.Parameter(torch.randn(1, length + 1, dim) * 0.1)
        self.register_buffer("position_ids", torch.arange(length)[None])
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        h = torch.cat([self.cls.expand(ids.shape[0], -1, -1), h], 1) + self.extra
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("method", METHODS)
def test_broadcast_position_ids_cls_token_and_position_parameter(method):
    torch.manual_seed(0)
    model = PositionEmbeddings()
    ids = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 2, 1])
    check(model, lambda m: F.cross_entropy(m(ids), y), method)


class PromptOnce(nn.Module):
    """peft-style prompt tuning: the prompt tokens are embedded once, then repeated over the batch."""

    def __init__(self):
        super().__init__()
        self.prompt = nn.Embedding(2, 5)
        self.register_buffer("prompt_ids", torch.arange(2))
        self.head = nn.Linear(15, 3)

    def forward(self, x):  # x: [B, 1, 5]
        prompts = self.prompt(self.prompt_ids[None]).repeat(x.shape[0], 1, 1)
        return self.head(torch.tanh(torch.cat([prompts, x], 1)).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_prompt_embedded_once_and_repeated(method):
    torch.manual_seed(0)
    model = PromptOnce()
    x = torch.randn(3, 1, 5, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 0, 1])
    check(model, lambda m: F.cross_entropy(m(x), y), method)


class PromptExpanded(PromptOnce):
    """peft's prompt tuning: the prompt ids expanded to the batch, then embedded (a parameter-only tensor with the
    batch's rows)."""

    def forward(self, x):
        prompts = self.prompt(self.prompt_ids[None].expand(x.shape[0], -1))
        return self.head(torch.tanh(torch.cat([prompts, x], 1)).flatten(1))


@pytest.mark.parametrize("model_type", [PromptOnce, PromptExpanded])
def test_num_guesses_are_independent_for_a_broadcast_parameter(model_type):
    """``directional`` with ``num_guesses=K``: a parameter that reaches the batch through a parameter-only tensor
    expanded to the batch gets ``K`` independent guesses, not one shared by the ``K`` blocks: the squared error of its
    estimate drops about ``K``-fold (it did not drop at all when the blocks shared ``V``)."""
    torch.manual_seed(0)
    model = model_type().double()
    x, y = torch.randn(3, 1, 5, dtype=torch.float64), torch.tensor([0, 2, 1])
    for p in model.parameters():
        p.requires_grad_(p is model.prompt.weight)
    true = torch.autograd.grad(F.cross_entropy(model(x), y), model.prompt.weight)[0]

    def error(k: int) -> float:
        total = 0.0
        for seed in range(30):
            model.prompt.weight.grad = None
            with attach(model, "directional", seed=seed, num_guesses=k):
                F.cross_entropy(model(x), y).backward()
            total += float((model.prompt.weight.grad - true).pow(2).sum())
        return total

    assert error(1) / error(32) > 8


class Recurrent(nn.Module):
    """An RNN over a sequence, batch-first or sequence-first (the batch moved to dim 1 inside the model)."""

    def __init__(self, cell: type, batch_first: bool):
        super().__init__()
        self.rnn, self.head, self.batch_first = cell(4, 5, batch_first=batch_first), nn.Linear(5, 3), batch_first

    def forward(self, x):  # x: [B, L, 4]
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head((out if self.batch_first else out.transpose(0, 1))[:, -1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, pytest.param(nn.GRU, marks=pytest.mark.slow),
                                  pytest.param(nn.RNN, marks=pytest.mark.slow)])
def test_recurrent_layers(cell, batch_first):
    torch.manual_seed(0)
    x, y = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2])
    check(Recurrent(cell, batch_first), lambda m: F.cross_entropy(m(x), y), "activation", guesses=100000)


class RecurrentFromAState(nn.Module):
    """An RNN started from an initial state the caller passes, ``(layers, B, H)`` (two of them for an LSTM)."""

    def __init__(self, cell: type, batch_first: bool):
        super().__init__()
        self.rnn, self.head, self.batch_first = cell(4, 5, num_layers=2, batch_first=batch_first), nn.Linear(5, 3), (
            batch_first)

    def forward(self, x, state):  # x: [B, L, 4]
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1), state)
        return self.head((out if self.batch_first else out.transpose(0, 1))[:, -1])


def _from_a_state(cell, batch_first):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 6, 4, generator=g), torch.tensor([0, 1, 2])
    h0 = torch.randn(2, 3, 5, generator=g)
    state = (h0, torch.randn(2, 3, 5, generator=g)) if cell is nn.LSTM else h0
    return RecurrentFromAState(cell, batch_first), lambda m: F.cross_entropy(m(x, state), y)


@pytest.mark.parametrize(("cell", "batch_first"), [
    (nn.LSTM, True), pytest.param(nn.LSTM, False, marks=pytest.mark.slow),
    pytest.param(nn.GRU, True, marks=pytest.mark.slow), pytest.param(nn.GRU, False, marks=pytest.mark.slow)])
def test_recurrent_layer_from_an_initial_state_with_many_guesses(cell, batch_first):
    """Regression: with ``num_guesses=K`` the model's inputs are repeated along dim 0, but an initial state
    ``(layers, B, H)`` holds the batch on dim 1: torch's size error. It is repeated along dim 1 now. (The first
    layer's biases are noisy: the error of the average within its measured noise.)"""
    model, run = _from_a_state(cell, batch_first)
    noise = {}
    est = averaged(model, run, guesses=200000, per_step=20000, noise=noise)
    compare(est, backprop(model, run), noise=noise)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_layer_from_an_initial_state_replayed(cell, batch_first):
    """The ``store="recompute"`` replay (and its graph discovery) repeats the initial state as the first forward."""
    model, run = _from_a_state(cell, batch_first)
    assert_same(estimates(copy.deepcopy(model), run, "wt", num_guesses=3),
                estimates(copy.deepcopy(model), run, "wt", num_guesses=3, store="recompute"))


@pytest.mark.slow
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layer_directional_with_many_guesses(batch_first):
    """``directional`` runs an RNN op once per guess block; the hidden state ``nn.RNN`` makes itself (zeros of
    ``(layers, N, H)``) was not cut into blocks: a raw size error with ``num_guesses > 1``."""
    torch.manual_seed(0)
    model = Recurrent(nn.RNN, batch_first)
    x, y = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2])
    check(model, lambda m: F.cross_entropy(m(x), y), "directional", guesses=40000)


# --------------------------------------------------------------------------------------------- torch.compile
def test_compile_after_attach_is_a_clear_error_and_the_model_stays_usable():
    torch.manual_seed(0)
    model, (x, y) = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), data()
    handle = attach(model, "activation", seed=0)
    compiled = torch.compile(model, backend="eager")
    for k in (1, 3):
        handle.num_guesses = k
        with pytest.raises(GuessingNotSupportedError, match=r"torch.compile"):
            F.cross_entropy(compiled(x), y).backward()
        assert fwAD._current_level == -1 and torch.is_grad_enabled()
    handle.num_guesses = 1
    F.cross_entropy(model(x), y).backward()  # the attached module itself still trains
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    handle.remove()


def test_compiled_submodule_is_a_clear_error():
    torch.manual_seed(0)
    model, (x, _) = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), data()
    model[2].compile(backend="eager")
    with attach(model, "activation"), pytest.raises(GuessingNotSupportedError, match=r"submodule '2' is compiled"):
        model(x)


# ------------------------------------------------------------------------------- weight norm, parametrizations
def _normed(kind):
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    if kind == "hook-weight-norm":
        lin = torch.nn.utils.weight_norm(lin)
    elif kind == "hook-spectral-norm":
        lin = torch.nn.utils.spectral_norm(lin)
    elif kind == "weight-norm":
        lin = parametrizations.weight_norm(lin)
    elif kind == "spectral-norm":
        lin = parametrizations.spectral_norm(lin)
    else:
        lin = parametrizations.orthogonal(lin)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 3))
    if "spectral" in kind:  # converge the power iterations, then keep them out of the step (no part of the gradient)
        with torch.no_grad():
            for _ in range(50):
                model(torch.randn(2, 5))
        model[0].eval()
    return model


@pytest.mark.parametrize("kind", ["hook-weight-norm", "hook-spectral-norm", "weight-norm", "spectral-norm",
                                  "orthogonal"])
@pytest.mark.parametrize("method", METHODS)
def test_weight_norm_spectral_norm_and_parametrizations(kind, method):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = _normed(kind)
    x, y = data()
    check(model, lambda m: F.cross_entropy(m(x), y), method)


# ------------------------------------------------------------------------------------------ embedding options
@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"padding_idx": 0}])
@pytest.mark.parametrize("method", METHODS)
def test_embedding_max_norm_and_padding_idx(option, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4, **option), nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # rows above max_norm: the forward renormalises them
    ids = torch.tensor([[0, 1, 2], [3, 0, 5], [1, 1, 4]])
    y = torch.tensor([0, 1, 2])
    if "max_norm" in option:  # renormalise once, as backprop's first forward would, so both see the same weights
        with torch.no_grad():
            model(ids)
    check(model, lambda m: F.cross_entropy(m(ids), y), method)
    if "padding_idx" in option:
        for method in ("activation", "directional"):
            with attach(model, method, seed=1):
                model[0].weight.grad = None
                F.cross_entropy(model(ids), y).backward()
            assert torch.equal(model[0].weight.grad[0], torch.zeros(4))  # the padding row is not trained


class DirectTorchEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.table, self.out = nn.Parameter(torch.randn(6, 4)), nn.Linear(12, 3)

    def forward(self, ids):
        return self.out(torch.embedding(self.table, ids, 0).flatten(1))  # padding_idx=0, not through F.embedding


def test_torch_embedding_padding_row_gets_no_directional_guess():
    """``torch.embedding`` called directly: only ``F.embedding``'s padding row got a zero weight guess, so this one's
    estimate was noise where backprop's gradient is zero by definition."""
    torch.manual_seed(0)
    model = DirectTorchEmbedding()
    ids, y = torch.tensor([[0, 1, 2], [3, 0, 5], [1, 1, 4]]), torch.tensor([0, 1, 2])
    with attach(model, "directional", seed=1):
        F.cross_entropy(model(ids), y).backward()
    assert torch.equal(model.table.grad[0], torch.zeros(4))
    assert model.table.grad[1:].abs().sum() > 0


class PaddedTokensNorm(nn.Module):
    """Token embeddings with a padding row, then a norm: at the padding positions the norm sees an all-zero input
    (Jacobian ~1/sqrt(eps)). ``path``: the embedding as a fast-path module, or an op-level guess point (a raw
    parameter through ``F.embedding`` with a negative ``padding_idx``, or ``torch.embedding``)."""

    def __init__(self, norm: type[nn.Module], path: str = "module"):
        super().__init__()
        self.emb, self.norm, self.out, self.path = nn.Embedding(7, 6, padding_idx=0), norm(6), nn.Linear(6, 3), path
        if path != "module":
            self.table = self.emb.weight  # the same parameter, read by an op instead of the module
            del self.emb

    def forward(self, ids):
        if self.path == "module":
            h = self.emb(ids)
        elif self.path == "F.embedding":
            h = F.embedding(ids, self.table, padding_idx=-7)
        else:
            h = torch.embedding(self.table, ids, 0)
        return self.out(self.norm(h).mean(1))


def padded_tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 7, (4, 5), generator=g)
    ids[:, 0] = 0
    ids[1, 3] = 0
    return ids, torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize(("norm", "path"), [(nn.RMSNorm, "module"), (nn.LayerNorm, "module"),
                                            (nn.RMSNorm, "F.embedding"), (nn.RMSNorm, "torch.embedding")])
@pytest.mark.parametrize("method", METHODS)
def test_padding_positions_before_a_norm(norm, path, method):
    """The guess at an embedding's padding positions went through the norm at an all-zero input and flooded every
    directional derivative: with RMSNorm, the average of 20,000 activation estimates was ~5e5 times backprop's
    gradient (cosine ~0). Backprop's gradient there only reaches the padding row (zero by definition): no guess."""
    torch.manual_seed(0)
    model = PaddedTokensNorm(norm, path)
    ids, y = padded_tokens()
    check(model, lambda m: F.cross_entropy(m(ids), y), method)


@pytest.mark.parametrize("method", ["activation", "mixing", "wt", "downstream"])
@pytest.mark.parametrize("path", ["module", "F.embedding"])
def test_padding_positions_get_no_guess(path, method):
    """Every activation-space estimator: a zero guess at the padding positions of the embedding's output, the others
    untouched (the padding row's gradient stays zero)."""
    torch.manual_seed(0)
    model = PaddedTokensNorm(nn.RMSNorm, path)
    ids, y = padded_tokens()
    with attach(model, method, num_guesses=2, seed=0) as h, h.capture() as cap:
        F.cross_entropy(model(ids), y).backward()
    u = cap[0]["guess"]  # [2·4, 5, 6]: the embedding's output guess
    padded = (ids == 0).repeat(2, 1)
    assert torch.equal(u[padded], torch.zeros_like(u[padded]))
    assert bool((u[~padded].abs().sum(-1) > 0).all())
    weight = model.emb.weight if path == "module" else model.table
    assert torch.equal(weight.grad[0], torch.zeros(6))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------- dropped tangents
class ScatterProd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(2, 3)

    def forward(self, x):
        h = torch.sigmoid(self.fc1(x))
        index = torch.tensor([0, 1, 0, 1]).expand_as(h)
        pooled = torch.ones(h.shape[0], 2).scatter_reduce(1, index, h, reduce="prod", include_self=False)
        return self.fc2(pooled)


def test_op_dropping_the_tangent_is_an_error():
    model, (x, _) = ScatterProd(), data()
    with attach(model, "activation"), pytest.raises(GuessingNotSupportedError, match=r"scatter_reduce.*dropped"):
        model(x)


# ------------------------------------------------------------------------------------- dim 0 not the batch
class SequenceFirst(nn.Module):
    def __init__(self, transpose):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)  # batch_first=False
        self.transpose = transpose

    def forward(self, x):  # x: [B, L, 4]
        if self.transpose:
            return self.attn(*(x.transpose(0, 1),) * 3)[0].transpose(0, 1)
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("length", [3, 4])  # 3 == batch: wrong silently before
def test_sequence_first_attention_on_batch_first_tensors_is_an_error(length):
    torch.manual_seed(0)
    model = SequenceFirst(transpose=False)
    x = torch.randn(3, length, 4)
    with attach(model, "activation"), pytest.raises(GuessingNotSupportedError, match=r"batch_first=True"):
        model(x)


@pytest.mark.parametrize("method", METHODS)
def test_sequence_first_attention_fed_transposed_tensors_is_estimated(method):
    torch.manual_seed(0)
    model = SequenceFirst(transpose=True)
    g = torch.Generator().manual_seed(4)
    x, target = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    check(model, lambda m: (m(x) - target).pow(2).sum(), method)


class _Transposed(nn.Module):
    """``c``'s weight applied to ``hᵀ`` (an op-level guess point whose rows are on dim 1), or the same map with the
    batch on dim 0."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.a, self.c, self.b, self.transposed = nn.Linear(5, 8), nn.Linear(8, 7), nn.Linear(7, 3), transposed

    def forward(self, x):
        h = torch.tanh(self.a(x))
        z = (self.c.weight @ h.t()).t() if self.transposed else F.linear(h, self.c.weight)
        return self.b(torch.relu(z + self.c.bias))


def test_structured_guess_at_a_guess_point_whose_batch_is_on_dim_1():
    """A guess point whose rows are on dim 1 (``W @ hᵀ``; the sequence-first tensors inside every
    ``nn.MultiheadAttention``) replays its chains in its own layout: ``wt`` used to fail with a raw shape error
    (every ``nn.TransformerEncoderLayer``). Its guesses have the law of the batch-on-dim-0 model's: the two average
    estimates agree."""
    torch.manual_seed(0)
    plain, transposed = _Transposed(False), _Transposed(True)
    transposed.load_state_dict(plain.state_dict())
    x, y = data(batch=6)
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    ref = averaged(plain, run, method="wt", guesses=40000, per_step=4000)
    compare(averaged(transposed, run, method="wt", guesses=40000, per_step=4000), ref, cosine=0.99,
            ratio=(0.9, 1.1))
    with attach(transposed, "mixing", seed=0), pytest.raises(GraphError, match="dim 0 is not the batch"):
        run(transposed).backward()


@pytest.mark.parametrize("store", ["activations", "recompute"])
@pytest.mark.parametrize("method", ["wt", "mixing", "downstream"])
def test_structured_guesses_on_a_transformer_encoder_layer(method, store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(40, 3))
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    with attach(model, method, seed=0, store=store):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in model.parameters())


class _DetachedBranch(nn.Module):
    """A layer applied to a detached activation (a stop-gradient branch): its own parameters still get a gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(self.c(h.detach())) + h)


@pytest.mark.parametrize("method", METHODS)
def test_a_layer_on_a_detached_activation(method):
    """Used to be refused ('linear' dropped the tangent) and, for wt/mixing, a raw autograd error."""
    torch.manual_seed(0)
    model, (x, y) = _DetachedBranch(), data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), method)
    for structured in ("wt", "mixing"):
        model.zero_grad()
        with attach(model, structured, seed=0):
            F.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


class _Skipping(nn.Module):
    """``b`` is skipped when ``skip`` is set: the same input shapes, another graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head, self.skip = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3), False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h if self.skip else torch.tanh(self.b(h)))


def test_a_graph_whose_control_flow_changed_is_discovered_again():
    """A cached graph is checked against the forward that used it: when a guess point is called a different number of
    times (a layer skipped at the same input shapes: LayerDrop, early exit), one warning, and the graph is discovered
    on every later step. ``a``'s ``wt`` guess then lies in the row space of the layer that follows it now (``head``),
    not of ``b`` (it used to stay built from ``b`` on every later step)."""
    torch.manual_seed(0)
    model, (x, y) = _Skipping(), data(batch=1)
    rows = torch.linalg.pinv(model.head.weight) @ model.head.weight  # projector onto head's row space
    mask = 1 - torch.tanh(model.a(x))[0].detach() ** 2
    with attach(model, "wt", seed=0):
        F.cross_entropy(model(x), y).backward()  # with b: the graph is cached
        model.skip = True
        with pytest.warns(UserWarning, match=r"control flow changed.*'b' was called 0"):
            F.cross_entropy(model(x), y).backward()
        for _ in range(3):
            model.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                F.cross_entropy(model(x), y).backward()
            u = model.a.bias.grad / mask  # batch of 1: the guess itself, times a scalar
            assert (u - rows @ u).norm() < 1e-9 * u.norm()
        model.skip = False  # and back: still right
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()


class _Cube(torch.autograd.Function):
    """``a³`` made of ``mul`` inside, with its own ``jvp`` (forward-mode AD is off inside a Function's forward)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_forward(a)
        ctx.save_for_backward(a)
        return a * a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return 3 * g * a * a

    @staticmethod
    def jvp(ctx, t):
        (a,) = ctx.saved_tensors
        return 3 * t * a * a


class _WithCube(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(_Cube.apply(torch.tanh(self.a(x))))


@pytest.mark.parametrize("method", METHODS)
def test_custom_autograd_function_with_a_jvp(method):
    """Used to be refused: the ops inside its forward (where forward-mode AD is off) were taken for ops dropping
    the tangent."""
    torch.manual_seed(0)
    model, (x, y) = _WithCube(), data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), method)


class _ReturnsState(nn.Module):
    """Returns the logits and the GRU's final state ``(layers, B, H)``: the batch on dim 1."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 6, num_layers=2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        out, state = self.rnn(x)
        return self.head(out[:, -1]), state


def test_an_output_with_the_batch_on_dim_1_used_in_the_loss():
    """The standard ``out, hn = rnn(x)`` API: a returned state ``(layers, B, H)`` used to be refused ("dim 0 is not
    the batch"); its rows are moved to dim 0 for the directional derivatives (and cut back on dim 1 with K guesses)."""
    torch.manual_seed(0)
    model = _ReturnsState()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, 3, generator=g), torch.randint(0, 3, (4,), generator=g)

    def run(m):
        logits, state = m(x)
        assert state.shape == (2, 4, 6)
        return F.cross_entropy(logits, y) + state[-1].pow(2).sum(1).mean() + state[0, :, 0].sum()

    check(model, run, "activation", guesses=80000)
    with attach(model, "directional", seed=0):  # (its weight-space guesses of a GRU: too noisy to average here)
        run(model).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


class _SequenceFirstInside(nn.Module):
    """A Linear and a LayerNorm applied to ``x.transpose(0, 1)``: fast-path guess points whose rows are on dim 1."""

    def __init__(self):
        super().__init__()
        self.l, self.norm, self.head = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.l(x.transpose(0, 1)))).mean(0))


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_guess_points_on_sequence_first_tensors(method):
    """``directional`` refused them (its K guess blocks were cut along dim 0); now cut along the rows' dim."""
    torch.manual_seed(0)
    model = _SequenceFirstInside()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 2, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
    check(model, lambda m: F.cross_entropy(m(x), y), method)


@pytest.mark.parametrize("method", ["activation", pytest.param("directional", marks=pytest.mark.slow)])
def test_a_linear_whose_weight_is_frozen_and_bias_trained(method):
    """BitFit (and peft ``LoraConfig(bias="all")``): ``directional`` failed with a raw ``KeyError: 'weight'``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    x, y = data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), method)
    with attach(model, "directional", seed=0, num_guesses=4):
        F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad is None and model[0].bias.grad.isfinite().all()


# --------------------------------------------------------------------------------------------- one layer
@pytest.mark.parametrize("method", ["directional", "activation", "wt"])
def test_a_single_layer_model(method):
    torch.manual_seed(0)
    model = nn.Embedding(5, 3)
    ids = torch.tensor([[0, 1], [4, 2]])
    run = lambda m: m(ids).pow(2).sum()  # noqa: E731
    if method == "wt":
        with attach(model, method, seed=0):
            run(model).backward()
        assert model.weight.grad is not None
    else:
        check(model, run, method)


# ------------------------------------------------------------------------- layers that used to be refused
def _layer(name):
    if name == "conv1d":
        from transformers.pytorch_utils import Conv1D

        return Conv1D(4, 4), 1
    return {"attention": (nn.MultiheadAttention(4, 2, batch_first=True), 3), "rmsnorm": (nn.RMSNorm(4), 1),
            "prelu": (nn.PReLU(3), 1), "bilinear": (nn.Bilinear(4, 4, 4), 2)}[name]


@pytest.mark.parametrize("name", ["attention", "rmsnorm", "prelu", "bilinear", "conv1d"])
@pytest.mark.parametrize("method", METHODS)
def test_layers_that_used_to_be_refused(name, method):
    """nn.MultiheadAttention (batch first), nn.RMSNorm, nn.PReLU, nn.Bilinear and transformers' Conv1D (GPT-2)."""
    if name == "conv1d":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer, arity = _layer(name)
    g = torch.Generator().manual_seed(5)
    x, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)

    def run(m):
        out = m(*(x,) * arity)
        return (out[0] if isinstance(out, tuple) else out).sub(target).pow(2).sum()

    check(layer, run, method)


# --------------------------------------------------------------------------------------------- input grads
def test_input_gradients_are_estimated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = data()
    x.requires_grad_(True)
    ref = backprop(model, lambda m: F.cross_entropy(m(x), y), inputs={"x": x})
    est = averaged(model, lambda m: F.cross_entropy(m(x), y), inputs={"x": x})
    compare(est, ref)


# ------------------------------------------------------------------------ structured guesses at op-level guess points
class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c1, self.c2 = Conv1D(8, 4), Conv1D(3, 8)  # GPT-2's layers: y = x @ W + b, W of shape [in, out]

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_wt_at_an_op_level_guess_point_lies_in_the_masked_row_space_of_the_next_op():
    """Discovery finds op-level guess points and their next ops: the Wᵀ guess at the first Conv1D is ``D_b W_2 ε``
    (GPT-2's W is [in, out]), so it lies in the span of the columns of ``D_b W_2``."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Conv1DNet()
    x, y = data(batch=4, features=4)
    with attach(model, "wt", seed=0) as h, h.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    assert [c["next_modules"] for c in cap] == [["addmm(c2.bias, c2.weight)"], []]
    s = model.c1(x).detach()
    u = cap[0]["guess"]
    for b in range(4):
        basis = (s[b] > 0).double()[:, None] * model.c2.weight.detach()  # [8, 3]: D_b W_2
        coeffs = torch.linalg.lstsq(basis, u[b][:, None]).solution
        torch.testing.assert_close(basis @ coeffs, u[b][:, None], rtol=1e-9, atol=1e-9)
    assert model.c1.weight.grad is not None and model.c2.weight.grad is not None


# ------------------------------------------------------------------------------ refused: what guesses cannot carry
class _Centered(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.l1, self.l2, self.kind = nn.Linear(5, 6), nn.Linear(6, 3), kind
        if kind == "batchnorm":
            self.bn = nn.BatchNorm1d(6, track_running_stats=False).eval()  # eval, but batch statistics all the same

    def forward(self, x, mem=None):
        h = self.l1(x)
        if self.kind == "centered":
            return self.l2(h - h.mean(0))
        if self.kind == "batchnorm":
            return self.l2(self.bn(h))
        return self.l2(torch.softmax(h @ self.l1(mem).T, -1) @ self.l1(mem))  # attention over a memory bank


@pytest.mark.parametrize("kind", ["centered", "memory", "batchnorm"])
def test_ops_mixing_the_examples_are_refused(kind):
    """A batch statistic of the guessed activations recombined with per-example values, attention across rows whose
    count happens to equal the batch size, and a BatchNorm that uses batch statistics in eval mode mix the examples:
    refused, where they used to give a biased average (cosine 0.2-0.8 to backprop)."""
    model = _Centered(kind).train()
    if kind == "batchnorm":
        model.bn.eval()
    x, y = data(batch=5)
    mem = torch.randn(5, 5)  # 5 rows: taken for the batch
    with attach(model, "activation", seed=0), pytest.raises((GuessingNotSupportedError, RuntimeError),
                                                            match="mix"):
        F.cross_entropy(model(x, mem), y).backward()


class _RowOps(nn.Module):
    """An op along the batch dim between two layers (or, for the kinds ending in ``ok``, one that keeps each row)."""

    def __init__(self, kind: str):
        super().__init__()
        self.l1, self.l2, self.kind = nn.Linear(5, 6), nn.Linear(6, 3), kind

    def forward(self, x):
        h, n = torch.tanh(self.l1(x)), x.shape[0]
        rows = torch.arange(n)
        h = {
            "cumsum": lambda: h.cumsum(0),
            "sort": lambda: h.sort(0).values,
            "flip": lambda: h + 0.5 * h.flip(0),
            "roll": lambda: h + h.roll(1, 0),
            "permuted": lambda: h + 0.5 * h[rows.flip(0)],
            "index_select": lambda: h.index_select(0, rows.roll(1)),
            "gather": lambda: h.gather(0, rows.roll(1)[:, None].expand(n, 6)),
            "setitem": lambda: torch.zeros_like(h).index_put((rows.roll(1),), h),
            "softmax": lambda: torch.softmax(h, 0),
            "normalize": lambda: F.normalize(h, dim=0),
            "layer_norm": lambda: F.layer_norm(h.T, (n,)).T,
            "mixup": lambda: 0.7 * h + 0.3 * h[rows.roll(1)],
            "arange ok": lambda: h[rows] * h[rows, :1],
            "last dim ok": lambda: h.sort(-1).values + h.cumsum(1),
        }[self.kind]()
        return self.l2(h)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["cumsum", "sort", "flip", "roll", "permuted", "index_select", "gather", "setitem",
                                  "softmax", "normalize", "layer_norm", "mixup"])
def test_ops_moving_values_between_the_examples_rows_are_refused(kind, k):
    """Each example's directional derivative is formed from its own output row: an op that moves values between rows
    along the batch dim (a scan, sort, flip, roll, an index, manifold mixup, a softmax/normalization across the batch
    in one op) makes it carry the other examples' guesses. They used to give a silently wrong average (cosine -0.6 to
    0.7 to backprop, norm ratios 0.03-14), with num_guesses=1 as with K."""
    model, (x, y) = _RowOps(kind), data(batch=4)
    with attach(model, "activation", seed=0, num_guesses=k), pytest.raises(GuessingNotSupportedError,
                                                                            match="between the examples") as err:
        F.cross_entropy(model(x), y).backward()
    assert "num_guesses=2" not in "".join(getattr(err.value, "__notes__", []))  # no note suggesting K=1


@pytest.mark.parametrize("kind", ["arange ok", "last dim ok"])
def test_indexing_that_keeps_each_row_with_many_guesses(kind):
    """An index that maps every row onto itself (``h[torch.arange(N)]``), and sorts or scans within each example: the
    K-guess average matches backprop."""
    model, (x, y) = _RowOps(kind), data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


class _BatchStats(nn.Module):
    """A batch normalization between two layers, as a module of any kind or a bare ``F.batch_norm``; ``"unused"``: a
    training-mode BatchNorm that is defined but not called."""

    def __init__(self, kind: str):
        super().__init__()
        self.l1, self.l2, self.kind = nn.Linear(5, 6), nn.Linear(6, 3), kind
        self.bn = {"bn1d": lambda: nn.BatchNorm1d(6), "lazy": lambda: nn.LazyBatchNorm1d(),
                   "bn3d": lambda: nn.BatchNorm3d(6), "unused": lambda: nn.BatchNorm1d(6)}.get(kind, nn.Identity)()
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))

    def forward(self, x):
        h = self.l1(x)
        if self.kind == "functional":
            h = F.batch_norm(h, self.mean, self.var, training=True)
        elif self.kind == "bn3d":
            h = self.bn(h[:, :, None, None, None]).flatten(1)
        elif self.kind != "unused":
            h = self.bn(h)
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("method", ["activation", "wt"])
@pytest.mark.parametrize("kind", ["bn1d", "lazy", "bn3d", "functional"])
def test_batch_norm_of_any_kind_in_training_mode_is_refused_before_it_runs(kind, method):
    """Every BatchNorm that normalizes with the batch's statistics is refused when it is called, naming it, before it
    changes its running statistics (BatchNorm3d, lazy ones and a bare ``F.batch_norm(training=True)`` used to pass:
    a silently wrong average)."""
    model, (x, y) = _BatchStats(kind), data(batch=4)
    model(x)  # materializes the lazy one
    before = {n: b.clone() for n, b in model.named_buffers()}
    name = "a batch_norm" if kind == "functional" else "'bn'"
    with attach(model, method, seed=0), pytest.raises(GuessingNotSupportedError, match=f"{name}.*training mode"):
        F.cross_entropy(model(x), y).backward()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_a_batchnorm_in_training_mode_that_is_not_called_is_no_concern():
    """Refused when called, not when merely defined (a model's unused branch, a head kept for later)."""
    model, (x, y) = _BatchStats("unused"), data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


def test_a_memory_bank_of_another_size_is_fine():
    torch.manual_seed(0)  # the model and the bank: not the preceding tests' RNG state
    model = _Centered("memory").train()
    x, y = data(batch=5)
    mem = torch.randn(7, 5)
    check(model, lambda m: F.cross_entropy(m(x, mem), y), "activation", guesses=40000)


class _AuxOnModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        self.aux = h.pow(2).mean()  # an auxiliary loss kept on the module (MoE load balancing, activation penalty)
        self.norm = float(h.norm())  # a statistic: fine
        return self.l2(h)


def test_auxiliary_loss_kept_on_a_module_is_refused():
    model, (x, y) = _AuxOnModule(), data()
    with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError, match="outlives"):
        (F.cross_entropy(model(x), y) + model.aux).backward()


def test_differentiating_the_output_again_is_refused():
    """A physics-informed loss differentiates the model's output with respect to its input (create_graph=True):
    guesses give first derivatives only. It used to leave every p.grad None, or give a wrong estimate."""
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(-1, 1, 6)[:, None].requires_grad_()
    with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError, match="create_graph"):
        (du,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        ((du - torch.cos(3 * x)) ** 2).mean().backward()


def test_an_output_class_pytree_cannot_open_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Out:
        logits: torch.Tensor

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return Out(self.l2(torch.tanh(self.l1(x))))

    model, (x, y) = Model(), data()
    with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError, match="register_dataclass"):
        F.cross_entropy(model(x).logits, y).backward()
    check(model, lambda m: F.cross_entropy(m(x).logits, y), "activation", head=model.l2)  # the fix the error names


class _Written(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.lin = nn.Parameter(torch.randn(3)), nn.Linear(6, 3)

    def forward(self, x):  # x: [B, 5]
        w = torch.zeros(6)
        w[:3] = self.scale
        w[3:] = 2 * self.scale
        return self.lin(torch.cat([x, x[:, :1]], 1) * w)


def test_parameter_written_into_a_tensor_is_estimated():
    x, y = data()
    check(_Written(), lambda m: F.cross_entropy(m(x), y), "activation")


@pytest.mark.parametrize("kind", ["complex", "scale_grad_by_freq", "script", "fast-weights", "written-into-batch"])
def test_what_guesses_cannot_carry_is_refused(kind):
    x, y = data()
    if kind == "complex":
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.w, self.out = nn.Parameter(torch.randn(3, 2)), nn.Linear(5, 3)

            def forward(self, x):
                return self.out(torch.fft.irfft(torch.fft.rfft(x) * torch.view_as_complex(self.w), n=5))
        model = Model()
    elif kind == "scale_grad_by_freq":
        model = nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(8, 3))
        x = torch.tensor([[1, 1], [2, 1], [3, 3]])
    elif kind == "written-into-batch":
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.scale, self.lin = nn.Parameter(torch.randn(2)), nn.Linear(5, 3)

            def forward(self, x):
                h = torch.tanh(x)
                h[:, :2] = self.scale  # in place into an activation
                return self.lin(h)
        model = Model()
    elif kind == "script":
        model = nn.Sequential(torch.jit.script(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 3))
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    try:
        with attach(model, "activation", seed=0):
            if kind == "fast-weights":  # MAML: the model called with computed weights
                fast = {n: p - 0.1 * torch.ones_like(p) for n, p in model.named_parameters()}
                out = torch.func.functional_call(model, fast, (x,))
            else:
                out = model(x)
            F.cross_entropy(out, y).backward()
    except (GuessingNotSupportedError, ValueError) as error:
        assert {"complex": "complex", "scale_grad_by_freq": "scale_grad_by_freq", "script": "TorchScript",
                "fast-weights": "not a leaf", "written-into-batch": "in place"}[kind] in str(error)
    else:
        pytest.fail("not refused")


def test_recompute_replays_on_the_buffers_the_forward_read():
    """A forward that updates a buffer (an EMA of the activations, a queue) is replayed on the values it read: the
    estimate equals store='activations''s (it used to differ by 5%)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)
            self.register_buffer("ema", torch.zeros(6))

        def forward(self, x):
            h = torch.tanh(self.l1(x))
            with torch.no_grad():
                self.ema.mul_(0.5).add_(0.5 * h.mean(0))
            return self.l2(h - self.ema)

    x, y = data()
    grads = []
    for store in ("activations", "recompute"):
        torch.manual_seed(0)
        model = Model()
        with attach(model, "activation", seed=0, store=store):
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
        assert model.ema.abs().sum() > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_labels_inside_forward_with_num_guesses_and_structured_guesses():
    """A loss inside forward with head= and num_guesses > 1: graph discovery sees the labels repeated like the batch
    (it used to fail with a raw batch-size error)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x, labels=None):
            return F.cross_entropy(self.head(torch.relu(self.body(x))), labels)

    model, (x, y) = Model(), data()
    for method in ("wt", "mixing", "downstream"):
        model.zero_grad()
        with attach(model, method, num_guesses=2, head=model.head, seed=0):
            model(x, labels=y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class _RawResidual(nn.Module):
    """A raw parameter meets the batch (an op-level guess point), then a residual block (a graph holding captured
    activations: discovered again by the recompute replay)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.p = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.a(x)) + self.p
        return self.o(h + torch.tanh(self.b(h)))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("method", ["wt", "mixing", "downstream", "activation"])
def test_recompute_equals_activations_with_an_op_level_guess_point_before_a_residual(method, k):
    """The recompute replay rediscovers a graph that holds captured activations; it did so with the trainable
    parameters frozen, so the op-level guess point ``add(p)`` was not found and the structured guesses of ``a`` and
    ``p`` differed from the forward's: a biased estimate (averaged ``mixing`` cosine to backprop -0.65 on ``o``)."""
    torch.manual_seed(0)
    model, (x, y) = _RawResidual(), data(batch=4)
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    assert_same(*(estimates(copy.deepcopy(model), run, method, store=store, num_guesses=k)
                  for store in ("activations", "recompute")))


class _LossInside(nn.Module):
    """Computes its loss inside ``forward`` from ``labels=`` after the head (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x, labels):
        return F.cross_entropy(self.head(self.dropout(torch.tanh(self.a(x)))), labels)


@pytest.mark.parametrize("method", ["wt", "activation"])
def test_recompute_with_a_loss_inside_forward_and_many_guesses(method):
    """The replay cuts the head's output back to the batch as the first forward does (it failed with a raw
    batch-size error, ``head=`` and ``labels=`` with ``num_guesses > 1``); and it replays in the training mode the
    forward ran in, even if the model was put in ``eval()`` before ``backward()`` (it replayed without the dropout
    masks: a silently different estimate)."""
    torch.manual_seed(0)
    model, (x, y) = _LossInside(), data(batch=4)
    grads = []
    for store in ("activations", "recompute"):
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # the same dropout masks in both
        with attach(m, method, seed=0, store=store, num_guesses=3, head=m.head):
            loss = m(x, labels=y)
            m.eval()  # e.g. an evaluation callback between forward and backward
            loss.backward()
            assert not m.training
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-10, atol=1e-12, msg=n)


_ACROSS_THE_BATCH = {
    "einsum": lambda h: torch.softmax(torch.einsum("bd,cd->bc", h, h), 1) @ h,
    "einsum implicit": lambda h: torch.einsum("bc,cd", torch.softmax(h @ h.T, 1), h),
    "tensordot": lambda h: torch.tensordot(torch.softmax(torch.tensordot(h, h, dims=([1], [1])), 1), h, dims=1),
    "inner": lambda h: torch.softmax(torch.inner(h, h), 1) @ h,
    "linear": lambda h: F.linear(torch.softmax(F.linear(h, h), 1), h.T),
}


@pytest.mark.parametrize("kind", list(_ACROSS_THE_BATCH))
def test_attention_across_the_batch_written_with_contractions_is_refused(kind):
    """``einsum``/``tensordot``/``inner``/``F.linear(h, h)`` laying two batch operands' rows on different dims of
    their output were not refused (written with ``@`` they were): a silently wrong average (cosine 0.6, ratio 0.3)."""
    model, (x, y) = _RowOps("einsum ok"), data(batch=4)
    model.kind = kind
    op = _ACROSS_THE_BATCH[kind]
    model.forward = lambda x: model.l2(torch.tanh(op(torch.tanh(model.l1(x)))))
    with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError, match="mixes the examples"):
        F.cross_entropy(model(x), y).backward()


def test_per_example_contractions_pass():
    """An ``einsum`` that keeps each example's rows together is estimated (against backprop)."""
    model, (x, y) = _RowOps("einsum ok"), data(batch=4)
    model.forward = lambda x: model.l2(torch.einsum("bd,bd->bd", torch.tanh(model.l1(x)), model.l1(x)))
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


class _Folded(nn.Module):
    """Tokens ``[B, L, D]`` into a Linear, directly or folded into ``[B·L, D]`` (as transformers' ``Conv1D`` does)."""

    def __init__(self, folded: bool):
        super().__init__()
        self.a, self.b, self.head, self.folded = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(15, 3), folded

    def forward(self, x):
        h = torch.tanh(self.a(x))
        z = self.b(h.reshape(-1, 6)).view(x.shape[0], -1, 5) if self.folded else self.b(h)
        return self.head(torch.tanh(z).flatten(1))


@pytest.mark.parametrize("method", ["wt-perp", "wt-precond"])
def test_per_example_jacobian_of_a_next_module_fed_folded_rows(method):
    """The per-example Jacobian of ``a``'s next module read a folded ``[B·L, D]`` input as ``B·L`` examples (a raw
    shape error on every GPT-2); it is now seen as ``[B, L, D]``: the same guesses as the unfolded model."""
    torch.manual_seed(0)
    plain, folded = _Folded(False), _Folded(True)
    folded.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    assert_same(estimates(plain, run, method), estimates(folded, run, method), rtol=1e-9)


class _PromptIntoLinear(nn.Module):
    """A prompt embedded once (``(1, P)`` ids), repeated, concatenated with the tokens, into a Linear that narrows."""

    def __init__(self):
        super().__init__()
        self.prompt, self.proj, self.head = nn.Embedding(2, 5), nn.Linear(5, 2), nn.Linear(6, 3)
        self.register_buffer("prompt_ids", torch.arange(2))

    def forward(self, x):  # x: [B, 1, 5]
        prompts = self.prompt(self.prompt_ids[None]).repeat(x.shape[0], 1, 1)
        return self.head(torch.tanh(self.proj(torch.cat([prompts, x], 1))).flatten(1))


def test_wt_guess_of_a_prompt_embedded_once_is_structured():
    """Discovery follows a module that reads no batch tensor (a prompt embedded once, peft's prompt tuning of Llama)
    as parameter-only, as the guessing step does: the prompt's ``wt`` guess is pulled back through the next Linear
    (its estimate lies in that Linear's row space); it fell back to an isotropic guess, silently."""
    torch.manual_seed(0)
    model = _PromptIntoLinear()
    x, y = torch.randn(4, 1, 5, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 0, 1, 1])
    rows = torch.linalg.pinv(model.proj.weight) @ model.proj.weight
    with attach(model, "wt", seed=0):
        F.cross_entropy(model(x), y).backward()
    g = model.prompt.weight.grad
    assert g.norm() > 0 and (g - g @ rows).norm() < 1e-9 * g.norm()


class _BiasFromAnMLP(nn.Module):
    """A per-position bias made by an MLP from a constant table (Swin V2's continuous position bias) and added to
    the batch's activations: an op-level guess point reading the MLP's parameters."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(5, 2))  # (5 positions: not taken for the batch of 4)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6, bias=False))
        self.a, self.b, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):  # x: [B, 5, 5]
        h = torch.tanh(self.a(x) + self.mlp(self.table))
        return self.head(torch.tanh(self.b(h)).mean(1))


@pytest.mark.parametrize("method", ["wt", "downstream"])
def test_structured_guess_of_a_bias_made_by_an_mlp(method):
    """Regression: discovery keyed the add by the last Linear's parameters only, the guessing step by all the
    parameters the bias was computed from, so the structured guess fell back to an isotropic one (with a warning;
    torchvision's swin_v2)."""
    torch.manual_seed(0)
    model = _BiasFromAnMLP()
    x, y = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = estimates(model, lambda m: F.cross_entropy(m(x), y), method)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


class _HiddenFromDiscovery(nn.Module):
    """Adds a raw parameter only in the guessing forward (not in the engine's own forwards): an op-level guess point
    graph discovery never sees."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.p = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        h = self.a(x)
        if not guess_optim.handle_of(self).in_internal_forward:
            h = h + self.p
        return self.b(torch.tanh(h))


def test_a_structured_guess_that_falls_back_to_isotropic_warns():
    torch.manual_seed(0)
    model, (x, y) = _HiddenFromDiscovery(), data(batch=4)
    with attach(model, "wt", seed=0), pytest.warns(UserWarning, match=r"did not see the op-level guess point 'add\(p"):
        F.cross_entropy(model(x), y).backward()


def test_packed_sequences_are_refused_naming_the_fix():
    """Sorting the integer lengths moves no guess (no longer refused as a sort along the batch); the packed data then
    loses the batch dim: refused, naming packed sequences and the fix."""
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn, self.head = nn.Linear(3, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=True)
            _, h = self.rnn(packed)
            return self.head(h[-1])

    model, x = Packed(), torch.randn(3, 4, 3)
    with attach(model, "activation", seed=0), pytest.raises(GuessingNotSupportedError, match="pack_padded_sequence"):
        model(x, torch.tensor([4, 3, 2])).sum().backward()


class _AttentionDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(4, 1, dropout=0.5, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0][:, 0])


def test_attention_dropout_inside_an_op_level_guess_point():
    """``nn.MultiheadAttention``'s estimate re-runs its op: it drew other attention dropout masks than the forward's
    (averaged ``in_proj_weight`` ratio 0.22 to backprop under the same masks), and under ``store="recompute"`` it
    moved the global RNG mid-replay (later dropouts drew other masks). Now re-run on the forward's RNG state."""
    torch.manual_seed(0)
    model = _AttentionDropout()
    x, y = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1])
    steps = 1000
    torch.manual_seed(5)  # the same masks in every forward
    names = [n for n, _ in model.named_parameters()]
    ref = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())), strict=True))
    mean = {n: torch.zeros_like(g) for n, g in ref.items()}
    with attach(model, "activation", seed=0):
        for _ in range(steps):
            model.zero_grad()
            torch.manual_seed(5)
            F.cross_entropy(model(x), y).backward()
            for n, p in model.named_parameters():
                mean[n] += p.grad / steps
    # the op's weights, whose estimates re-run it (1000 single guesses: the biases' averages are too noisy to read)
    weights = ("mha.in_proj_weight", "mha.out_proj.weight")
    compare({n: mean[n] for n in weights}, {n: ref[n] for n in weights}, cosine=0.95, ratio=(0.9, 1.1))
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    grads = []
    for store in ("activations", "recompute"):
        torch.manual_seed(7)
        grads.append(estimates(copy.deepcopy(model), run, "wt", store=store))
    assert_same(*grads)


class _Dropped(nn.Module):
    """Dropout after a layer; with ``attention``, first a self-attention over 3 tokens of 2 features with attention
    dropout (``"plain"``, ``"causal"``, or with a boolean or an additive ``attn_mask``)."""

    def __init__(self, attention: str | None = None):
        super().__init__()
        self.a, self.b, self.drop, self.attention = nn.Linear(5, 6), nn.Linear(6, 3), nn.Dropout(0.5), attention

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.attention:
            q = h.view(-1, 3, 2)
            keep = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
            mask = {"bool": keep, "additive": torch.where(keep, 0.0, -2.0)}.get(self.attention)
            h = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.3,
                                               is_causal=self.attention == "causal").flatten(1)
        return self.b(self.drop(h))


@pytest.mark.parametrize("attention", [None, "plain", "causal", "bool", "additive"])
def test_dropout_with_many_guesses_shares_the_first_copys_mask(attention):
    """With ``num_guesses=K`` the batch is repeated ``K`` times but the loss sees the first copy only: each copy drew
    its own dropout mask, so its tangent went through another mask than the loss's (a biased average, ratio 0.54).
    The copies now share the first copy's mask (``F.dropout``, and the attention dropout of
    ``F.scaled_dot_product_attention``), which is the mask a plain forward draws under the same seed: the average
    matches backprop under that seed. Dropout inside ``nn.MultiheadAttention`` with ``K > 1`` is refused."""
    torch.manual_seed(0)
    model, (x, y) = _Dropped(attention), data(batch=4)
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(5)
    ref = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())), strict=True))
    mean, steps = dict.fromkeys(names, 0.0), 20
    with attach(model, "activation", seed=0, num_guesses=1000):
        for _ in range(steps):
            model.zero_grad()
            torch.manual_seed(5)
            F.cross_entropy(model(x), y).backward()
            mean = {n: mean[n] + p.grad / steps for n, p in model.named_parameters()}
    compare(mean, ref)
    mha = _AttentionDropout()
    with attach(mha, "activation", seed=0, num_guesses=2), pytest.raises(GuessingNotSupportedError,
                                                                          match="draws dropout.*num_guesses=1"):
        F.cross_entropy(mha(torch.randn(2, 3, 4)), torch.tensor([0, 1])).backward()


class _Unsqueezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)).unsqueeze(0)).squeeze(0)))


def test_rows_followed_through_unsqueeze_and_squeeze():
    """``b(h.unsqueeze(0)).squeeze(0)`` was refused ("without the batch on dim 0"): the rows move to dim 1 and back."""
    torch.manual_seed(0)
    model, (x, y) = _Unsqueezed(), data(batch=4)
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


class _BiasApart(nn.Module):
    """``h @ W.T + b`` (the bias added as its own op) or the same layer as an ``nn.Linear``."""

    def __init__(self, apart: bool):
        super().__init__()
        self.a, self.b, self.out, self.apart = nn.Linear(12, 8), nn.Linear(8, 6), nn.Linear(6, 3), apart

    def forward(self, x):
        h = torch.tanh(self.a(x))
        z = h @ self.b.weight.T + self.b.bias if self.apart else self.b(h)
        return self.out(F.relu(z))


@pytest.mark.parametrize("method", ["downstream", "self-sharpening"])
def test_a_bias_added_as_its_own_op_is_transparent_to_structured_guesses(method):
    """``a``'s ``downstream`` guess is pulled back from the post-activation ``relu(z)`` of the next layer: it lies in
    the row space of ``D_relu W_b`` (batch 1). With the bias added as its own op, the graph ended at that add (the
    ReLU mask lost: residual 0.9 outside the row space); the add is now a guess point of its own and transparent."""
    torch.manual_seed(0)
    model = _BiasApart(apart=True)
    x, y = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    h = torch.tanh(model.a(x))
    z = model.b(h)[0]
    jac = (z > 0).to(z.dtype)[:, None] * model.b.weight
    rows = torch.linalg.pinv(jac) @ jac
    for seed in range(3):
        model.zero_grad()
        with attach(model, method, seed=seed):
            F.cross_entropy(model(x), y).backward()
        v = model.a.bias.grad / (1 - h[0] ** 2)
        assert (v - rows @ v).norm() < 1e-9 * v.norm()


class _Noisy(nn.Module):
    """Stochastic depth by row (``torchvision.ops.stochastic_depth``'s draw) and Gaussian noise injection."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        keep = torch.empty(h.shape[0], 1).bernoulli_(0.5) / 0.5
        h = h + keep * torch.tanh(self.b(h))
        return self.c(h + 0.3 * torch.randn_like(h))


def test_random_draws_per_example_are_shared_by_the_copies_of_many_guesses():
    """With ``num_guesses=K`` a draw with one row per example (stochastic depth, noise injection) gave each copy of
    the batch its own values while all shared the first copy's loss gradient: biased (ratio 0.46 on ``b.weight``).
    The copies now share the first copy's draw; the reference is backprop of the first copy's loss on the batch
    repeated ``K`` times, under the same seed (the same draws)."""
    torch.manual_seed(0)
    model, (x, y) = _Noisy(), data(batch=4)
    k, steps = 2000, 30
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x.repeat(k, 1))[: len(y)], y)
    ref = dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    mean = dict.fromkeys(names, 0.0)
    with attach(model, "activation", seed=0, num_guesses=k):
        for _ in range(steps):
            model.zero_grad()
            torch.manual_seed(5)
            F.cross_entropy(model(x), y).backward()
            mean = {n: mean[n] + p.grad / steps for n, p in model.named_parameters()}
    compare(mean, ref)


@pytest.mark.parametrize("inplace", ["hardswish", "dropout", "relu_"])
@pytest.mark.parametrize("method", ["activation", "wt"])
def test_an_in_place_op_after_a_guess_point_leaves_its_kept_guess_alone(inplace, method):
    """The tangent of a guess point without an incoming tangent was the kept guess itself: an in-place op after it
    (``Hardswish(inplace=True)``, ``Dropout(inplace=True)``) changed the guess the estimate then used (averaged ratio
    0.75 and 2.0 to backprop). The store that keeps no guess (``recompute``) is the reference: the same estimate."""
    torch.manual_seed(0)
    act = {"hardswish": nn.Hardswish(inplace=True), "dropout": nn.Dropout(0.5, inplace=True),
           "relu_": nn.ReLU(inplace=True)}[inplace]
    model, (x, y) = nn.Sequential(nn.Linear(5, 8), act, nn.Linear(8, 3)), data(batch=4)
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    grads = []
    for store in ("activations", "recompute"):
        torch.manual_seed(3)  # the same dropout mask
        grads.append(estimates(copy.deepcopy(model), run, method, store=store))
    assert_same(*grads)


class _Windows(nn.Module):
    """Tokens folded into windows along dim 0 (``x.reshape(B * w, L // w, C)``, as Swin does), a Linear, unfolded."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 4, 4]
        b, length, c = x.shape
        h = torch.tanh(self.a(x.reshape(b * 2, length // 2, c))).reshape(b, length, c)
        return self.head(h.mean(1))


def test_rows_folded_into_windows_by_a_reshape():
    """A reshape that splits the tokens into windows along dim 0 was taken for losing the batch (only merging whole
    leading dims was followed): each example's values stay one block of rows, so it is followed now."""
    torch.manual_seed(0)
    model = _Windows()
    x, y = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2])
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


class _WindowAttention(nn.Module):
    """Swin's window attention (torchvision ``shifted_window_attention``, without the shift): tokens folded into
    windows along dim 0, ``qkv.reshape(B·nW, L, 3, h, d).permute(2, 0, 3, 1, 4)``, ``qkv[0]``, a relative position
    bias parameter added to the scores, unfolded after the output projection."""

    def __init__(self, dim=4, heads=2, window=2):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.bias = nn.Parameter(torch.randn(heads, window, window))

    def forward(self, x):  # x: [B, T, C]
        b, t, c = x.shape
        windows = x.reshape(b * (t // self.window), self.window, c)
        qkv = self.qkv(windows).reshape(windows.size(0), self.window, 3, self.heads, c // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5).matmul(k.transpose(-2, -1)) + self.bias
        h = attn.softmax(-1).matmul(v).transpose(1, 2).reshape(windows.size(0), self.window, c)
        h = self.proj(h).reshape(b, t, c)
        return self.head(torch.tanh(h).mean(1))


def test_window_attention_with_rows_folded_and_permuted():
    """Regression: folded window rows were followed only while they stayed on dim 0: the permute of Swin's qkv lost
    them, and the attention scores were refused as mixing the examples (K = 1) or the bias add as having no batch
    (K > 1), so torchvision's swin_t could not be trained. Folded rows now move with their dim."""
    torch.manual_seed(0)
    model = _WindowAttention()
    x, y = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2])
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    one = estimates(copy.deepcopy(model), run, "activation")  # K = 1 (was refused): every parameter estimated
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in one.values())
    # the error of the average within its measured noise (the relative position bias's gradient is small: a cosine
    # bound would need millions of guesses); num_guesses=20000: the K copies of the batch fold into the windows too
    noise = {}
    est = averaged(model, run, guesses=200000, per_step=20000, noise=noise)
    compare(est, backprop(model, run), noise=noise, max_relative_noise=0.5)


class _InPlaceWithParameters(nn.Module):
    """In-place ops reading parameters: timm's ``LayerScale(inplace=True)`` (``x.mul_(gamma)``) and ``h += b``."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.gamma, self.shift = nn.Parameter(torch.linspace(0.3, 1.2, 6)), nn.Parameter(torch.linspace(-1, 1, 6))

    def forward(self, x):
        h = self.fc(x)
        h.mul_(self.gamma)
        h += self.shift
        return self.head(torch.tanh(h))


def test_directional_many_guesses_through_in_place_ops_on_parameters():
    """Regression: with ``num_guesses=K`` the blocks of an in-place op reading a parameter ran the op again on its
    already changed target: the forward's output changed (the loss was wrong) and the averaged estimate converged to
    another vector (ratio 0.01 for ``gamma``, 0.5 for the head). The op now runs once, out of place, and the blocks on
    the values before it."""
    torch.manual_seed(0)
    model = _InPlaceWithParameters()
    x, y = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1])
    plain = model(x).detach()
    with attach(model, "directional", seed=0, num_guesses=4):
        out = model(x)
        torch.testing.assert_close(out.detach(), plain, rtol=1e-12, atol=1e-12)  # the forward is unchanged
        F.cross_entropy(out, y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_directional_many_guesses_through_in_place_ops_on_parameters_against_backprop():
    torch.manual_seed(0)
    model = _InPlaceWithParameters()
    x, y = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1])
    noise = {}
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    est = averaged(model, run, method="directional", guesses=20000, per_step=1000, noise=noise)
    compare(est, backprop(model, run), noise=noise)


class _BiasBuiltFromParameters(nn.Module):
    """BEiT/EVA attention's ``qkv_bias = cat(q_bias, zeros, v_bias)`` passed to ``F.linear`` with a Linear's weight."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 6, bias=False), nn.Linear(6, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.register_buffer("k_bias", torch.zeros(2), persistent=False)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.head(torch.tanh(F.linear(x, self.qkv.weight, bias)))


@pytest.mark.parametrize("model_type", [_BiasBuiltFromParameters, _InPlaceWithParameters])
def test_directional_many_guesses_recompute_equals_activations(model_type):
    """Regression: with a bias built from parameters next to the weight (one ``V`` shared by the guess blocks in the
    first forward), the ``store="recompute"`` replay laid out one ``V`` per block: another estimate (its average
    about ``g / K`` for the weight). The replay now lays them out as the first forward did."""
    torch.manual_seed(0)
    model = model_type()
    x, y = torch.randn(3, model.qkv.in_features if hasattr(model, "qkv") else 6,
                       generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1])
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    assert_same(estimates(copy.deepcopy(model), run, "directional", num_guesses=8),
                estimates(copy.deepcopy(model), run, "directional", num_guesses=8, store="recompute"))


class _StackedHeads(nn.Module):
    """Two heads averaged through ``torch.stack(..., dim)`` (timm CrossViT's head: ``stack(dim=0).mean(0)``)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.fc, self.h1, self.h2 = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        stacked = torch.stack([self.h1(h), self.h2(h)], dim=self.dim)
        return stacked.mean(self.dim) + 0.5 * stacked.select(self.dim, 1)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_outputs_stacked_along_a_new_dim(dim):
    """Regression: ``torch.stack`` lost the rows (with ``dim=0`` they move to dim 1): a model averaging heads that way
    was refused as computing its loss inside forward. The rows now move past the new dim."""
    torch.manual_seed(0)
    model = _StackedHeads(dim)
    x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    check(model, lambda m: F.cross_entropy(m(x), y), "activation")


@pytest.mark.parametrize("shape, rows, n", [((3, 8, 5), (1, 2), 4), ((6, 5), (0, 2), 3), ((5, 3, 2), (1, 1), 3),
                                             ((2, 3, 12, 4), (2, 3), 4), ((4, 2), (0, 1), 4)])
def test_rows_layout_round_trip(shape, rows, n):
    """``from_rows`` inverts ``to_rows`` wherever the rows are, folded or not (folded rows off dim 0 were put back
    as if on dim 0)."""
    from guess_optim.ops import Rows, from_rows, to_rows

    t = torch.randn(shape)
    per_example = to_rows(t, Rows(*rows), n)
    assert per_example.shape[0] == n
    assert torch.equal(from_rows(per_example, Rows(*rows), t.shape), t)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchvision_swin_transformer(method):
    """torchvision's Swin (shifted windows, the attention mask, relative position bias, patch embedding through a
    permute) against backprop: the error of the averaged estimate within its measured noise."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2],
                            stochastic_depth_prob=0.0, num_classes=3)
    with torch.no_grad():  # an init whose inner gradients are not swamped by the head's (trunc_normal std 0.02)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
                m.bias.normal_(0, 0.3)
            elif isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
            elif hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 1.0)
    x, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    run = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    noise = {}
    per_step = 2000 if method == "activation" else 100
    est = averaged(model, run, method=method, guesses=40000 if method == "activation" else 4000, per_step=per_step,
                   noise=noise)
    # the z test only: at this many guesses the inner parameters' standard errors reach about twice their gradients'
    # norms (a tight bound needs millions of guesses); the tight check of the same row tracking is
    # test_window_attention_with_rows_folded_and_permuted
    compare(est, backprop(model, run), noise=noise, max_relative_noise=float("inf"))


class _ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (``view``, ``transpose``, ``contiguous``, ``view``) between two convolutions."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        b, c, height, width = h.shape
        h = h.view(b, 2, c // 2, height, width).transpose(1, 2).contiguous().view(b, c, height, width)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


@pytest.mark.parametrize("method", ["wt", "mixing", "downstream"])
def test_channel_shuffle_is_replayed(method):
    """The chain replays ``contiguous()`` as the identity, so the last ``view`` failed (a raw-looking GraphError on
    every ShuffleNet); it is replayed as a reshape. Both stores give the same estimate."""
    torch.manual_seed(0)
    model, x = _ChannelShuffle(), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda m: F.cross_entropy(m(x), torch.tensor([0, 1]))  # noqa: E731
    assert_same(*(estimates(copy.deepcopy(model), run, method, store=store) for store in ("activations", "recompute")))
