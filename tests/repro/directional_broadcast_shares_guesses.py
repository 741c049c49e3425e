"""Engine issue: method="directional" with num_guesses=K>1 gives a parameter that reaches the batch only through a
parameter-only tensor larger than itself (peft's prompt embeddings: embedding(prompt_tokens expanded to the batch);
a cls token expanded) ONE weight guess V per step, shared by the K blocks (ops.GuessingMode._broadcast_tangent:
"shared by the num_guesses blocks"). The K "independent" guesses of that parameter are K copies of one: averaging
K guesses does not reduce its variance, while it does for every other parameter (README: num_guesses=K "average K
independent guesses per step"). Unbiased still, so this is silent.

Expected: with only that parameter trainable, the mean squared error of its estimate drops about K-fold from
num_guesses=1 to num_guesses=K, as a Linear's does (trained alone). Got (K=64, 40 seeds): prompt MSE ratio 1.0
(no drop: the 64 guesses are one), head about 50. (With other trainable parameters the K blocks still differ through
their guesses, which hides it partly.)
Run: PYTHONPATH=. python tests/repro/directional_broadcast_shares_guesses.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import attach

torch.set_default_dtype(torch.float64)


class Prompted(nn.Module):
    """peft-style prompt tuning: prompt ids expanded to the batch, embedded, concatenated with the input."""

    def __init__(self):
        super().__init__()
        self.prompt = nn.Embedding(2, 4)
        self.register_buffer("prompt_ids", torch.arange(2))
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # x: [B, 1, 4]
        prompts = self.prompt(self.prompt_ids[None].expand(x.shape[0], -1))
        return self.head(torch.tanh(torch.cat([prompts, x], 1)).flatten(1))


torch.manual_seed(0)
model = Prompted()
x, y = torch.randn(3, 1, 4), torch.tensor([0, 2, 1])


def mse(param: nn.Parameter, k: int, seeds: int = 40) -> float:
    """Mean squared error of ``param``'s estimate, trained alone (everything else frozen)."""
    for p in model.parameters():
        p.requires_grad_(p is param)
    true = torch.autograd.grad(F.cross_entropy(model(x), y), param)[0]
    err = 0.0
    for seed in range(seeds):
        param.grad = None
        with attach(model, "directional", seed=seed, num_guesses=k):
            F.cross_entropy(model(x), y).backward()
        err += float((param.grad - true).pow(2).sum()) / seeds
    return err


for name, param in [("prompt", model.prompt.weight), ("head", model.head.weight)]:
    one, many = mse(param, 1), mse(param, 64)
    print(f"{name:6s} alone: MSE num_guesses=1 {one:.4g}, num_guesses=64 {many:.4g}, ratio {one / many:.1f} "
          "(64 independent guesses: about 64)")
