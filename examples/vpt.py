"""Visual prompt tuning of a pretrained ViT-B/16 on CUB-200-2011, Stanford Cars or Stanford Dogs (paper A.6, Fig. 9),
with backprop, directional descent or W^T-guessed gradients.

The backbone is frozen; prompts (VPT-shallow, or VPT-deep with ``--deep``) and a new linear head train. VPT's data
protocol (Jia et al. 2022): training images resized to 224x224, evaluation images resized to 256 and center-cropped
to 224, both normalized with mean = std = 0.5 (the preprocessing of google/vit-base-patch16-224-in21k); the metric is
top-1 accuracy on the test split.

Data, either
  * ``--data-dir DIR``: an image folder ``DIR/<split>/<class>/<image>`` (``train`` and ``test`` splits by default;
    class folders must agree between splits), e.g. CUB-200-2011 rearranged from its ``train_test_split.txt``; or
  * ``--hf-dataset NAME``: a Hugging Face dataset through ``datasets.load_dataset(NAME)`` (``--image-column``,
    ``--label-column``, ``--train-split``, ``--test-split``).

Examples::

    python examples/vpt.py --dataset cub200 --data-dir data/CUB_200_2011_split --method wt --deep --num-prompts 10
    python examples/vpt.py --dataset dogs --hf-dataset <name on the Hub> --method directional --epochs 20
    python examples/vpt.py --dataset cars --data-dir data/cars --random-init      # no pretrained weights: a smoke run

Needs ``transformers`` and ``torchvision`` (``pip install "guess-optim[hf,vision]"``), ``datasets`` for
``--hf-dataset``. The pretrained weights come from the Hugging Face Hub or its local cache (``HF_HOME``); offline,
pass ``--local-files-only`` (or set ``HF_HUB_OFFLINE=1``) to fail at once instead of retrying the network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch

from guess_optim import METHODS, attach
from guess_optim.integrations.vpt import VisualPromptTuning, VPTConfig
from guess_optim.optim import OPTIMIZERS, build_optimizer

DATASETS: dict[str, dict[str, Any]] = {
    "cub200": {"title": "CUB-200-2011", "classes": 200,
               "source": "https://www.vision.caltech.edu/datasets/cub_200_2011/"},
    "cars": {"title": "Stanford Cars", "classes": 196,
             "source": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"},
    "dogs": {"title": "Stanford Dogs", "classes": 120,
             "source": "http://vision.stanford.edu/aditya86/ImageNetDogs/"},
}
MEAN = STD = (0.5, 0.5, 0.5)


def _rgb(image):
    return image.convert("RGB")


def transforms(image_size: int):
    """``(train, eval)`` torchvision transforms of VPT's protocol for ``image_size`` (224: resize 224 / resize 256 +
    center crop 224), normalized with mean = std = 0.5."""
    try:
        from torchvision import transforms as T
    except ImportError as err:
        raise SystemExit(f'examples/vpt.py needs torchvision: pip install "guess-optim[vision]" ({err})') from err
    rgb = T.Lambda(_rgb)  # a module-level function: picklable for DataLoader workers
    normalize = T.Normalize(MEAN, STD)
    train = T.Compose([rgb, T.Resize((image_size, image_size)), T.ToTensor(), normalize])
    evaluate = T.Compose([rgb, T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                          normalize])
    return train, evaluate


def image_folder(data_dir: str, splits: tuple[str, str], tfs, dataset: str):
    """``(train, test, class names)`` from ``data_dir/<split>/<class>/<image>``."""
    from torchvision.datasets import ImageFolder

    out = []
    for split, tf in zip(splits, tfs, strict=True):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            info = DATASETS[dataset]
            raise SystemExit(
                f"{info['title']}: no '{split}' split at {root!r}. Expected an image folder "
                f"{data_dir}/<split>/<class>/<image> with splits {list(splits)}; get the images from {info['source']} "
                "and arrange them by split and class, or pass --hf-dataset NAME"
            )
        out.append(ImageFolder(root, transform=tf))
    if out[0].classes != out[1].classes:
        raise SystemExit(f"the class folders of {splits[0]!r} and {splits[1]!r} differ under {data_dir!r}")
    return out[0], out[1], out[0].classes


class _HFSplit(torch.utils.data.Dataset):
    def __init__(self, data, image_column: str, label_column: str, transform):
        self.data, self.image_column, self.label_column, self.transform = data, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return self.transform(row[self.image_column]), int(row[self.label_column])


def hf_dataset(name: str, splits: tuple[str, str], tfs, image_column: str, label_column: str):
    """``(train, test, class names)`` from ``datasets.load_dataset(name)``."""
    try:
        import datasets
    except ImportError as err:
        raise SystemExit(f'--hf-dataset needs the datasets library: pip install "guess-optim[hf]" ({err})') from err
    parts = [datasets.load_dataset(name, split=split) for split in splits]
    features = getattr(parts[0], "features", None) or {}
    names = getattr(features.get(label_column), "names", None)  # a ClassLabel's class names
    if names is None:
        try:
            labels = parts[0][label_column]  # a datasets.Dataset column (no image decoding)
        except (TypeError, KeyError, IndexError):
            labels = [row[label_column] for row in parts[0]]
        names = [str(i) for i in range(1 + max(int(v) for v in labels))]
    train, test = (_HFSplit(p, image_column, label_column, tf) for p, tf in zip(parts, tfs, strict=True))
    return train, test, list(names)


def load_vit(name: str, num_labels: int, *, random_init: bool, local_files_only: bool, config: dict[str, Any]):
    """A ``ViTForImageClassification`` with a fresh ``num_labels`` head: pretrained ``name`` (Hub id or directory),
    or ``ViTConfig(**config)`` with random weights."""
    from transformers import ViTConfig, ViTForImageClassification

    if random_init:
        return ViTForImageClassification(ViTConfig(**{**config, "num_labels": num_labels}))
    try:
        return ViTForImageClassification.from_pretrained(
            name, num_labels=num_labels, ignore_mismatched_sizes=True, local_files_only=local_files_only
        )
    except OSError as err:
        raise SystemExit(
            f"could not load the pretrained ViT {name!r}: it is neither reachable nor in the local Hugging Face cache "
            f"({err}). Fix: download it where the Hub is reachable (`hf download {name}`) and point HF_HOME at that "
            "cache, pass a local directory saved with save_pretrained() as --model, or use --random-init"
        ) from err


def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).logits.argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="image folder DIR/<split>/<class>/<image>")
    src.add_argument("--hf-dataset", help="name for datasets.load_dataset")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--image-column", default="image", help="--hf-dataset: image column (default: image)")
    p.add_argument("--label-column", default="label", help="--hf-dataset: label column (default: label)")
    p.add_argument("--method", choices=tuple(METHODS), default="wt",
                   help="a registered method; paper A.6 compares backprop, directional and wt (default: wt)")
    p.add_argument("--num-guesses", type=int, default=1, help="guesses averaged per step (default: 1)")
    p.add_argument("--deep", action="store_true", help="VPT-deep (default: VPT-shallow)")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--model", default="google/vit-base-patch16-224-in21k", help="Hub id or local directory")
    p.add_argument("--random-init", action="store_true", help="random ViT weights (ViTConfig() + --vit-config)")
    p.add_argument("--vit-config", type=json.loads, default={},
                   help='JSON overrides of ViTConfig() with --random-init, e.g. \'{"image_size": 32}\'')
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hub for --model")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd (momentum 0.9) is VPT's; guessed estimates are much longer than the gradient (an "
                        "isotropic guess by about sqrt(dim)), so with directional/wt prefer adamw or stable-adamw, "
                        "or a far smaller --lr")
    p.add_argument("--lr", type=float, default=0.25, help="peak learning rate (VPT tunes it per dataset)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear warmup, then cosine decay (VPT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results (per epoch) as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    image_size = int(args.vit_config.get("image_size", 224)) if args.random_init else None
    if image_size is None:
        from transformers import AutoConfig

        try:
            image_size = int(AutoConfig.from_pretrained(args.model, local_files_only=args.local_files_only).image_size)
        except OSError:
            image_size = 224  # load_vit reports the missing model below
    tfs = transforms(image_size)
    splits = (args.train_split, args.test_split)
    if args.data_dir:
        train, test, classes = image_folder(args.data_dir, splits, tfs, args.dataset)
    else:
        train, test, classes = hf_dataset(args.hf_dataset, splits, tfs, args.image_column, args.label_column)
    expected = DATASETS[args.dataset]["classes"]
    if len(classes) != expected:
        print(f"note: {len(classes)} classes found, {DATASETS[args.dataset]['title']} has {expected}", file=sys.stderr)
    vit = load_vit(args.model, len(classes), random_init=args.random_init, local_files_only=args.local_files_only,
                   config=args.vit_config)
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=args.num_prompts, deep=args.deep,
                                              prompt_dropout=args.prompt_dropout)).to(device)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g,
                                         num_workers=args.workers, drop_last=len(train) > args.batch_size)
    test_loader = torch.utils.data.DataLoader(test, batch_size=args.batch_size, num_workers=args.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    total = args.epochs * len(loader) if not args.max_steps else min(args.max_steps, args.epochs * len(loader))
    warmup = min(args.warmup_epochs * len(loader), max(total - 1, 0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    print(f"{DATASETS[args.dataset]['title']}: {len(train)} train / {len(test)} test images, {len(classes)} classes; "
          f"trainable {model.trainable_parameters()['trainable']:,} of {model.trainable_parameters()['total']:,}")
    history, step, start = [], 0, time.perf_counter()
    with attach(model, args.method, head=model.classifier, seed=args.seed, num_guesses=args.num_guesses) as handle:
        for epoch in range(args.epochs):
            model.train()
            losses = []
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = model(x.to(device), labels=y.to(device)).loss
                loss.backward()  # the estimate (or, for backprop, the gradient) of the prompts and the head
                if not handle.last_step_skipped:
                    optimizer.step()
                schedule.step()
                losses.append(loss.item())
                step += 1
                if step >= total:
                    break
            acc = evaluate(model, test_loader)
            history.append({"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                            "test_top1": acc, "skipped_steps": handle.skipped_steps,
                            "seconds": time.perf_counter() - start})
            print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test top-1 {acc:.4f}", flush=True)
            if step >= total:
                break
    result = {"args": {k: v for k, v in vars(args).items()}, "classes": len(classes), "history": history,
              "test_top1": history[-1]["test_top1"] if history else None}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
