"""User input is validated by guess_optim._checks everywhere: one message form, ``Invalid {name}: {value!r}; expected
...``, bools are not ints, numpy integers are."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from guess_optim import PromptTokens, StableAdamW
from guess_optim._checks import check_float
from guess_optim.models import MLP, ConvNet
from guess_optim.reproduce import BiasConfig, CosineConfig, SelfSharpeningConfig, SubspaceConfig, SweepConfig
from guess_optim.trainer import GuessedGradientTrainer

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _trainer(**kw):
    model = MLP(4, 2, depth=2, width=3)
    return GuessedGradientTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def _hf_callback(**kw):
    from guess_optim.integrations.hf import GuessedGradientCallback

    return GuessedGradientCallback("wt", **kw)


def _vpt_config(**kw):
    from guess_optim.integrations.vpt import VPTConfig

    return VPTConfig(**kw)


BAD = [
    (lambda: _trainer(track_cosine=True), r"Invalid track_cosine: True; expected an int >= 0"),
    (lambda: _trainer(seed=-1), r"Invalid seed: -1; expected an int >= 0"),
    (lambda: MLP(4, 2, depth=True), r"Invalid depth: True; expected an int >= 1"),
    (lambda: MLP(4, 2, width=2.0), r"Invalid width: 2\.0; expected an int >= 1"),
    (lambda: MLP(4, 2, activation="swish"), r"Invalid activation: 'swish'; expected one of 'relu'"),
    (lambda: ConvNet(0, 10), r"Invalid in_channels: 0; expected an int >= 1"),
    (lambda: PromptTokens(True, 4), r"Invalid num_tokens: True; expected an int >= 1"),
    (lambda: PromptTokens(2, 4, init="xavier"), r"Invalid init: 'xavier'; expected one of"),
    (lambda: StableAdamW([torch.nn.Parameter(torch.zeros(1))], lr=-1.0), r"Invalid lr: -1\.0; expected a finite"),
    (lambda: CosineConfig(depth=True), r"Invalid depth: True; expected an int >= 1"),
    (lambda: CosineConfig(lr=float("inf")), r"Invalid lr: inf; expected a finite number > 0"),
    (lambda: BiasConfig(momentum=1.0), r"Invalid momentum: 1\.0; expected a finite number >= 0 and < 1"),
    (lambda: SweepConfig(optimizers=("adamw", "rmsprop")), r"Invalid optimizers: 'rmsprop'; expected one of"),
    (lambda: SubspaceConfig(ks=(4, 0)), r"Invalid ks\[1\]: 0; expected an int >= 1"),
    (lambda: SelfSharpeningConfig(distributions=("cauchy",)), r"Invalid distributions: 'cauchy'"),
    pytest.param(lambda: _hf_callback(seed=True), r"Invalid seed: True; expected an int >= 0 or None",
                 marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")),
    pytest.param(lambda: _hf_callback(log_cosine_every=-1), r"Invalid log_cosine_every: -1; expected an int >= 0",
                 marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")),
    pytest.param(lambda: _vpt_config(prompt_dropout=1.0), r"Invalid prompt_dropout: 1\.0; expected .* < 1",
                 marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")),
    pytest.param(lambda: _vpt_config(num_labels=0), r"Invalid num_labels: 0; expected an int >= 1 or None",
                 marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")),
]


@pytest.mark.parametrize(("build", "message"), BAD)
def test_bad_values_name_the_parameter_and_the_expectation(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_integers_are_ints():
    model = MLP(np.int64(4), 2, depth=np.int32(2), width=np.int64(3))
    assert type(model.depth) is int and type(model.width) is int
    assert CosineConfig(depth=np.int64(2)).depth == 2


def test_check_float_exclusive_upper_bound():
    assert check_float("p", 0.5, low=0.0, high=1.0, high_strict=True) == 0.5
    assert check_float("p", 1.0, low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"Invalid p: 1\.0; expected a finite number >= 0 and < 1"):
        check_float("p", 1.0, low=0.0, high=1.0, high_strict=True)
