"""One optimizer factory (guess_optim.optim.build_optimizer) behind the CLI, the reproductions and the HF trainer."""

from __future__ import annotations

import pytest
import torch

from guess_optim import StableAdamW
from guess_optim.optim import OPTIMIZERS, build_optimizer, optimizer_cls_and_kwargs

EXPECTED = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "stable-adamw": StableAdamW}


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_name_builds_its_class_without_weight_decay_by_default(name):
    opt = build_optimizer(name, params(), lr=0.1)
    assert type(opt) is EXPECTED[name]
    assert opt.defaults["lr"] == 0.1 and opt.defaults["weight_decay"] == 0.0


def test_momentum_is_sgds_and_betas_eps_the_adam_familys():
    assert build_optimizer("sgd", params(), lr=0.1, momentum=0.9, betas=(0.5, 0.6)).defaults["momentum"] == 0.9
    for name in ("adamw", "adam", "stable-adamw"):
        cls, kwargs = optimizer_cls_and_kwargs(name, lr=0.1, momentum=0.9, betas=(0.5, 0.6), eps=1e-3)
        assert cls is EXPECTED[name] and "momentum" not in kwargs
        assert kwargs["betas"] == (0.5, 0.6) and kwargs["eps"] == 1e-3


def test_unknown_name():
    with pytest.raises(ValueError, match=r"Invalid optimizer: 'lbfgs'; expected one of 'adamw'"):
        build_optimizer("lbfgs", params(), lr=0.1)


def test_one_factory_and_one_tuple_everywhere():
    """Regression: the CLI, the reproductions and the HF trainer each had their own factory and name tuple."""
    from guess_optim import cli
    from guess_optim.reproduce import _common

    assert cli.build_optimizer is build_optimizer and cli.OPTIMIZERS is OPTIMIZERS
    assert _common.build_optimizer is build_optimizer and _common.OPTIMIZERS is OPTIMIZERS
    assert not hasattr(_common, "make_optimizer")
    pytest.importorskip("transformers")
    from guess_optim.integrations import hf

    assert hf.GUESS_OPTIMIZERS is OPTIMIZERS
