"""Refactors keep behaviour: the estimate of fixed steps (float64, fixed seeds) is pinned to 1e-10.

``tests/data/pinned_estimates.pt`` was written by ``python tests/test_pinned_estimates.py --write`` on the engine as
it stood before the Engine v2 refactor (one class in ``engine.py``); every case here must reproduce it. A case is a
model, a method with its options and two consecutive steps on one batch (the second step checks that the guess
streams advance as before). Regenerate the file only for a change that is *meant* to change estimates, and say so in
the commit.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import PromptTokens, attach
from guess_optim.models import ConvNet

PINS = os.path.join(os.path.dirname(__file__), "data", "pinned_estimates.pt")


class Net(nn.Module):
    def __init__(self, act=F.gelu):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in ((10, 24), (24, 16), (16, 8), (8, 3)))
        self.act = act

    def forward(self, x):
        for fc in self.fcs[:-1]:
            x = self.act(fc(x))
        return self.fcs[-1](x)


class Residual(nn.Module):
    """LayerNorm, residual adds and a softmax attention: a volatile graph (captured operands)."""

    def __init__(self, d=12):
        super().__init__()
        self.emb = nn.Linear(6, d)
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x: [B, T, 6]
        h = self.emb(x)
        a = self.ln(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(1, 2) / 3.0, -1) @ self.v(a)
        h = h + att
        h = h + self.fc2(self.drop(F.relu(self.fc1(h))))
        return self.head(h.mean(1))


class Prompted(nn.Module):
    """Prompt tokens, an embedding and a frozen LayerNorm traced through."""

    def __init__(self, d=8):
        super().__init__()
        self.tok = nn.Embedding(20, d)
        self.prompt = PromptTokens(3, d, init="normal")
        self.norm = nn.LayerNorm(d)
        self.norm.requires_grad_(False)
        self.fc = nn.Linear(d, d)
        self.gn = nn.GroupNorm(2, d)
        self.head = nn.Linear(d, 4)

    def forward(self, ids):  # ids: [B, T]
        h = torch.cat([self.prompt(ids.shape[0]), self.tok(ids)], 1)
        h = torch.tanh(self.fc(self.norm(h)))
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


class WithRaw(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 10))
        self.net = Net()

    def forward(self, x):
        return self.net(x * self.scale)


def _batch(name, g):
    if name == "mlp" or name == "raw":
        return torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    if name == "residual":
        return torch.randn(5, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    if name == "convnet":
        return torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    return torch.randint(0, 20, (5, 4), generator=g), torch.randint(0, 4, (5,), generator=g)


def _model(name):
    torch.manual_seed(0)
    model = {"mlp": Net, "residual": Residual, "convnet": lambda: ConvNet(2, 3), "prompted": Prompted,
             "raw": WithRaw}[name]()
    return model.double().train()


CASES = {
    **{f"mlp-{m}": ("mlp", m, {}) for m in
       ("directional", "activation", "mixing", "wt", "downstream", "self-sharpening")},
    "mlp-wt-k3": ("mlp", "wt", {"num_guesses": 3}),
    "mlp-activation-k3": ("mlp", "activation", {"num_guesses": 3}),
    "mlp-directional-k3": ("mlp", "directional", {"num_guesses": 3}),
    "mlp-mixing-k2": ("mlp", "mixing", {"num_guesses": 2}),
    "mlp-wt-exact-head": ("mlp", "wt", {"exact_head": True}),
    "mlp-wt-power2": ("mlp", "wt", {"wt_power": 2.0}),
    "mlp-downstream-l2": ("mlp", "downstream", {"downstream_layers": 2}),
    "mlp-self-sharpening-sym": ("mlp", "self-sharpening", {"distribution": "symmetric-uniform"}),
    "mlp-wt-recompute": ("mlp", "wt", {"store": "recompute"}),
    "mlp-directional-recompute": ("mlp", "directional", {"store": "recompute"}),
    "mlp-downstream-recompute": ("mlp", "downstream", {"store": "recompute"}),
    **{f"residual-{m}": ("residual", m, {}) for m in ("activation", "mixing", "wt", "downstream", "directional")},
    "residual-wt-recompute": ("residual", "wt", {"store": "recompute"}),
    "residual-activation-recompute-k2": ("residual", "activation", {"store": "recompute", "num_guesses": 2}),
    "residual-wt-exact-head": ("residual", "wt", {"exact_head": True}),
    **{f"convnet-{m}": ("convnet", m, {}) for m in ("activation", "wt", "directional", "mixing")},
    **{f"prompted-{m}": ("prompted", m, {}) for m in ("activation", "wt", "directional", "downstream")},
    "prompted-wt-recompute": ("prompted", "wt", {"store": "recompute"}),
    "raw-wt": ("raw", "wt", {"raw_parameters": "directional"}),
    "raw-activation-k2": ("raw", "activation", {"raw_parameters": "directional", "num_guesses": 2}),
}


def run_case(name):
    """Two steps of one case: ``{"step{i}.{param}": grad}`` (``None`` for a parameter without an estimate)."""
    model_name, method, options = CASES[name]
    model = _model(model_name)
    g = torch.Generator().manual_seed(123)
    x, y = _batch(model_name, g)
    out = {}
    torch.manual_seed(7)  # dropout masks
    with attach(model, method, seed=11, **options):
        for step in range(2):
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(model(x), y).backward()
            for n, p in model.named_parameters():
                out[f"step{step}.{n}"] = None if p.grad is None else p.grad.detach().clone()
    return out


@pytest.fixture(scope="module")
def pins():
    return torch.load(PINS, weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_is_pinned(name, pins):
    got = run_case(name)
    want = pins[name]
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] is not None, key
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_pinned_estimates.py --write  (overwrites the pinned estimates)")
    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(PINS), exist_ok=True)
    torch.save({name: run_case(name) for name in CASES}, PINS)
    print(f"wrote {len(CASES)} cases to {PINS}")
