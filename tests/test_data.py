"""Dataset loaders on small files written in each dataset's real distribution format."""

import pickle
import re
import struct

import numpy as np
import pytest
import torch
from datafiles import write_fashion_mnist, write_idx

from munba_kernels.drivers import data


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (imgs, labels)
    ds = data.load_dataset("fashion_mnist", tmp_path)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    np.testing.assert_array_equal((ds.x_train[:, 0] * 255).round().byte().numpy(), arrays["train"][0])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k"][1])


def test_idx_rejects_garbage_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((2, 3), np.uint8), False)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "short")


@pytest.mark.parametrize("damage", ["truncated", "not_gzip"])
def test_unreadable_gzip_names_the_file(tmp_path, damage):
    write_fashion_mnist(tmp_path, compress=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"plain bytes, no gzip header")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.read_idx(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.load_fashion_mnist(tmp_path)


def test_idx_header_cut_short_names_the_file(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">2I", 5, 28))  # 3 dimensions, 2 given
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.read_idx(path)


def test_fashion_mnist_rejects_out_of_range_labels_naming_the_file(tmp_path):
    write_fashion_mnist(tmp_path, relabel=lambda y: np.where(np.arange(len(y)) == 4, 10, y))
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path / "train-labels-idx1-ubyte")) + ".*outside 0..9"
    ):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_rejects_a_count_mismatch_naming_both_files(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(ValueError) as err:
        data.load_fashion_mnist(tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(err.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(err.value)


def test_fashion_mnist_rejects_labels_that_are_not_a_vector(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((12, 28), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train-labels-idx1-ubyte"))):
        data.load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_explains_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def cifar_batch(rng, n, label_key, num_classes):
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, size=n).tolist(),
    }


def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [cifar_batch(rng, 4, b"labels", 10) for _ in range(6)]
    for i, b in enumerate(batches[:5], start=1):
        pickle.dump(b, open(root / f"data_batch_{i}", "wb"))
    pickle.dump(batches[5], open(root / "test_batch", "wb"))
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    # channel-major rows: the first 1024 bytes are the red plane
    red = batches[0][b"data"][0, :1024].reshape(32, 32)
    np.testing.assert_array_equal((ds.x_train[0, 0] * 255).round().byte().numpy(), red)
    assert ds.y_train[:4].tolist() == batches[0][b"labels"]


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    pickle.dump(cifar_batch(rng, 6, b"fine_labels", 100), open(root / "train", "wb"))
    test = cifar_batch(rng, 3, b"fine_labels", 100)
    pickle.dump(test, open(root / "test", "wb"))
    ds = data.load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.y_test.tolist() == test[b"fine_labels"]


def write_cifar10(root, rng, labels_of=None):
    """Five train batches and a test batch of 4 images; ``labels_of`` maps a file name to a
    replacement label list for that file."""
    root.mkdir(exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = cifar_batch(rng, 4, b"labels", 10)
        if labels_of and name in labels_of:
            batch[b"labels"] = labels_of[name]
        pickle.dump(batch, open(root / name, "wb"))


@pytest.mark.parametrize(
    "dataset, damage, file",
    [
        ("cifar10", "label", "data_batch_3"),
        ("cifar10", "count", "test_batch"),
        ("cifar10", "truncated", "data_batch_2"),
        ("cifar10", "not_a_batch", "data_batch_5"),
        ("cifar100", "label", "train"),
        ("cifar100", "count", "test"),
    ],
)
def test_cifar_rejects_corrupt_batches_naming_the_file(tmp_path, dataset, damage, file):
    rng = np.random.default_rng(4)
    if dataset == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        labels = {"label": [0, 1, 10, 2], "count": [0, 1, 2]}.get(damage)  # count: 4 images, 3 labels
        write_cifar10(root, rng, labels_of={file: labels} if labels else None)
    else:
        root = tmp_path / "cifar-100-python"
        root.mkdir()
        for name in ("train", "test"):
            batch = cifar_batch(rng, 4, b"fine_labels", 100)
            if name == file and damage == "label":
                batch[b"fine_labels"] = [0, 100, 5, 6]
            if name == file and damage == "count":
                batch[b"fine_labels"] = batch[b"fine_labels"][:3]
            pickle.dump(batch, open(root / name, "wb"))
    path = root / file
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    if damage == "not_a_batch":
        pickle.dump({"something": "else"}, open(path, "wb"))
    expected = {"label": "outside 0..", "count": "4 images but 3 labels", "truncated": "", "not_a_batch": ""}[
        damage
    ]
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(expected)):
        data.load_dataset(dataset, tmp_path)


@pytest.mark.parametrize("damage", ["label", "count"])
def test_svhn_rejects_bad_labels_and_counts_naming_the_file(tmp_path, damage):
    from scipy.io import savemat

    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        x = rng.integers(0, 256, size=(32, 32, 3, 3), dtype=np.uint8)
        y = np.array([[10], [1], [2]], dtype=np.uint8)
        if split == "test" and damage == "label":
            y[1] = 11  # would silently become digit 1 under SVHN's "10 means 0" mapping
        if split == "test" and damage == "count":
            y = y[:2]
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "test_32x32.mat"))):
        data.load_dataset("svhn", tmp_path)


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            first = x[..., 0]
    ds = data.load_dataset("svhn", tmp_path)
    assert ds.x_train.shape == (5, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4]  # label 10 means digit 0
    np.testing.assert_array_equal((ds.x_train[0].permute(1, 2, 0) * 255).round().byte().numpy(), first)


def test_digits_and_errors():
    ds = data.load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and len(ds.y_train) + len(ds.y_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    with pytest.raises(ValueError, match="one of"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_dataset("cifar10")


def test_forget_masks():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0, 2])
    assert data.forget_mask(labels, "class", forget_classes=[1]).tolist() == [y == 1 for y in labels.tolist()]
    assert data.forget_mask(labels, "class", forget_classes=[0, 2]).sum() == 6
    m = data.forget_mask(labels, "random", forget_ratio=0.3, seed=4)
    assert m.sum() == 3 and torch.equal(m, data.forget_mask(labels, "random", forget_ratio=0.3, seed=4))
    with pytest.raises(ValueError, match="outside"):
        data.forget_mask(labels, "class", forget_classes=[7])
    with pytest.raises(ValueError, match="forget_ratio"):
        data.forget_mask(labels, "random", forget_ratio=1.5)
