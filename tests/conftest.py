"""Shared test configuration."""

import warnings

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
