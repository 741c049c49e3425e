"""The CLI, the trainers and the reproductions read the estimator registry: an estimator registered from outside the
package is a valid method everywhere, with its own plot label and colour; nothing keeps a list or table of names."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest
import torch

from guess_optim import METHODS, Estimator, register_estimator, unregister_estimator
from guess_optim.reproduce import CosineConfig, OneStepConfig, SweepConfig, Table1Config, _common, run_cosine

NAME = "test-sign"


@dataclass(frozen=True)
class SignActivation(Estimator):
    """Activation perturbation with Rademacher entries (unbiased)."""

    name = NAME
    summary = "activation perturbation with Rademacher entries"
    label = "Sign guess"
    color = "tab:pink"
    unbiased = True

    def guess(self, site):
        u = torch.randn(site.output.shape, generator=site.generator, dtype=site.output.dtype,
                        device=site.output.device)
        return u.sign()


@pytest.fixture
def registered():
    register_estimator(SignActivation)
    yield NAME
    unregister_estimator(NAME)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_labels_and_colours_are_the_registrys(registered):
    for name, cls in METHODS.items():
        assert _common.method_label(name) == cls.plot_label() and _common.method_color(name) == cls.color
    assert _common.method_label(NAME) == "Sign guess" and _common.method_color(NAME) == "tab:pink"
    # variants keep their working names and take their method's colour
    assert _common.method_label("downstream l=2") == "downstream l=2"
    assert _common.method_color("downstream l=2") == METHODS["downstream"].color
    assert _common.method_color("wt p=0.5") == METHODS["wt"].color
    assert _common.method_color("oracle+bias") is None
    assert not hasattr(_common, "METHOD_LABELS") and not hasattr(_common, "METHOD_COLORS")


def test_config_defaults_read_the_registry_when_built(registered):
    assert NAME in CosineConfig().methods and _common.oracle_method() not in CosineConfig().methods
    assert OneStepConfig().methods[0] == _common.oracle_method() and NAME in OneStepConfig().methods
    assert NAME in SweepConfig().methods and NAME in Table1Config().methods
    assert _common.is_oracle(_common.oracle_method()) and not _common.is_oracle(NAME)


def test_cosine_reproduction_plots_a_registered_estimator(registered, tmp_path):
    cfg = CosineConfig(depth=2, width=8, steps=1, every=1, repeats=1, batch_size=16, methods=("directional", NAME))
    record = run_cosine(cfg, out_dir=tmp_path, progress=False)
    assert set(record["results"]["mean"]) == {"directional", NAME}
    assert json.loads((tmp_path / "cosine.json").read_text())["config"]["methods"] == ["directional", NAME]


def test_cli_and_trainer_accept_a_registered_estimator(registered, tmp_path):
    from guess_optim.cli import main

    out = tmp_path / "r.json"
    assert main(["train", "--dataset", "digits", "--depth", "2", "--width", "8", "--epochs", "1", "--quiet",
                 "--method", NAME, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == NAME


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_callback_validates_through_the_registry(registered):
    from guess_optim.integrations.hf import GuessedGradientCallback

    assert GuessedGradientCallback(NAME).method == NAME
    with pytest.raises(ValueError, match="Unknown method"):
        GuessedGradientCallback("not-registered")
