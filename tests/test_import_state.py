"""Importing a guess_optim module changes none of the user's global state (RNGs, default dtype, threads, warning
filters, environment, logging, deterministic-algorithm flags)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = [
    "guess_optim", "guess_optim._checks", "guess_optim._io", "guess_optim._seeds", "guess_optim.cli",
    "guess_optim.diagnostics", "guess_optim.models", "guess_optim.optim", "guess_optim.prompts", "guess_optim.trainer",
    "guess_optim.reproduce", "guess_optim.reproduce.runner", "guess_optim.engine", "guess_optim.attach",
    "guess_optim.handle", "guess_optim.step", "guess_optim.estimators", "guess_optim.graph", "guess_optim.bench",
    "guess_optim.data",
]
HF_MODULES = ["guess_optim.integrations.hf", "guess_optim.integrations.vpt"]
THIRD_PARTY = ["numpy", "torch", "torch.nn.functional", "torch.utils.data", "tqdm", "tqdm.auto"]


SCRIPT = r"""
import importlib, json, logging, os, random, sys, warnings
import numpy as np
import torch
for name in sys.argv[2:]:
    importlib.import_module(name)  # third-party dependencies, imported before the snapshot

def snapshot():
    return {
        "torch_rng": torch.get_rng_state().tolist(),
        "numpy_rng": np.random.get_state()[1][:8].tolist(),
        "python_rng": random.getstate()[1][:8],
        "dtype": str(torch.get_default_dtype()),
        "threads": torch.get_num_threads(),
        "warnings": [repr(f) for f in warnings.filters],
        "environ": dict(os.environ),
        "logging": [logging.getLogger().level, len(logging.getLogger().handlers)],
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic],
        "grad": torch.is_grad_enabled(),
    }

before = snapshot()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
after = snapshot()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}, default=str))
"""


def changed_state(modules: list[str], preload: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", SCRIPT, ",".join(modules), *THIRD_PARTY, *preload]
    out = subprocess.run(argv, capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_modules_changes_no_global_state():
    assert changed_state(MODULES, []) == {}


def test_importing_the_integrations_changes_no_global_state():
    pytest.importorskip("transformers")
    assert changed_state(["guess_optim", *HF_MODULES], ["transformers", "transformers.trainer_utils"]) == {}
