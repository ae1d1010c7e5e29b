"""Dataset loaders on small files written in each dataset's real distribution format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from munba_kernels.drivers import data


def write_idx(path, array, compress):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


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
