"""guess_optim: train PyTorch models with guessed gradients.

Implements Singhal et al., "How to Guess a Gradient" (arXiv 2312.04709).
"""

__version__ = "0.1.0.dev0"
