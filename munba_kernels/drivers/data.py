"""Offline dataset loaders and unlearning splits.

Every loader reads local files in the dataset's own distribution format and never
downloads.  Images come back as float32 tensors ``[N, C, H, W]`` in [0, 1], labels as
int64.  Fashion-MNIST is the embedded default: the Debian package
``dataset-fashion-mnist`` installs it under /usr/share/datasets/fashion-mnist/.

    fashion_mnist  idx files (``train-images-idx3-ubyte[.gz]`` …), as distributed
    digits         scikit-learn's bundled 8×8 digits (1797 images), split 80/20
    cifar10        ``cifar-10-batches-py/`` (python pickle batches), as distributed
    cifar100       ``cifar-100-python/`` (``train``/``test`` pickles, fine labels)
    svhn           ``train_32x32.mat`` / ``test_32x32.mat`` (format 2), as distributed

A file that is missing raises ``FileNotFoundError``; one that is unreadable (truncated,
not in its format) or inconsistent (labels outside 0..num_classes-1, an image count that
differs from the label count, no samples) raises :class:`DataError`.  Both name the file.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "svhn")
DEFAULT_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
NEEDS_DATA_DIR = ("cifar10", "cifar100", "svhn")  # no default location: --data-dir is required
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset file that cannot be used: unreadable or inconsistent.  The message names it."""


@dataclass
class ImageData:
    """Train and test splits of an image classification dataset."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST family's format), gzip-compressed or raw."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as err:  # truncated or not gzip at all
        raise DataError(f"{path} cannot be read: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: the header announces {ndim} dimensions but the file ends first")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    itemsize = np.dtype(_IDX_DTYPES[data[2]]).itemsize
    if (len(data) - 4 - 4 * ndim) % itemsize:
        raise DataError(f"{path}: header says {dims} but the payload is not whole values")
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {array.size} values")
    return array.reshape(dims).copy()  # frombuffer views are read-only


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"missing {stem}[.gz] in {directory}")


def _checked(
    images: np.ndarray, labels, num_classes: int, images_file: Path, labels_file: Path | None = None
):
    """One split as (images, labels) tensors, after checking that the files agree and every label
    is a class; ``labels_file`` is the file the labels came from (default: ``images_file``)."""
    labels_file = labels_file or images_file
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{images_file}: expected uint8 images [N, H, W(, C)], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{labels_file}: expected a vector of integer labels, got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        holds = (
            f"{len(labels)} labels"
            if labels_file == images_file
            else f"{labels_file} holds {len(labels)} labels"
        )
        raise DataError(f"{images_file} holds {len(images)} images but {holds}")
    if len(labels) == 0:
        raise DataError(f"{images_file} holds no samples")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{labels_file}: label {labels[bad[0]]} (sample {bad[0]}) is outside 0..{num_classes - 1}"
            + (f", and {len(bad) - 1} more" if len(bad) > 1 else "")
        )
    return _images(images), torch.from_numpy(labels.astype(np.int64))


def _images(array: np.ndarray) -> Tensor:
    """uint8 [N, H, W] or [N, H, W, C] → float32 [N, C, H, W] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return t.float().div_(255.0).contiguous()


def load_fashion_mnist(data_dir: str | Path | None = None) -> ImageData:
    directory = Path(data_dir) if data_dir else DEFAULT_DIRS["fashion_mnist"]
    try:
        files = {
            split: (
                _find(directory, f"{prefix}-images-idx3-ubyte"),
                _find(directory, f"{prefix}-labels-idx1-ubyte"),
            )
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({err}). Install it with "
            "`apt-get install dataset-fashion-mnist` (what `make demo` does) or pass "
            "--data-dir pointing at the idx files."
        ) from None
    parts = {
        split: _checked(read_idx(images), read_idx(labels), 10, images, labels)
        for split, (images, labels) in files.items()
    }
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    return ImageData("fashion_mnist", xtr, ytr, xte, yte, 10)


def load_digits(seed: int = 0) -> ImageData:
    """scikit-learn's 8×8 digits (values 0–16), a fixed stratified-by-shuffle 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    return ImageData("digits", x[tr], y[tr], x[te], y[te], 10)


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    """One pickled CIFAR batch as checked (images, labels)."""
    if not path.exists():
        raise FileNotFoundError(f"missing {path}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # a truncated or foreign pickle fails in many ways
        raise DataError(f"{path} cannot be unpickled: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} is not a CIFAR batch (no {b'data'!r} and {label_key!r} entries)")
    rows = np.asarray(batch[b"data"])
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 image rows [N, 3072], got {rows.dtype} {rows.shape}")
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _checked(images, batch[label_key], num_classes, path)


def _cat(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def load_cifar10(data_dir: str | Path) -> ImageData:
    root = Path(data_dir)
    root = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    xtr, ytr = _cat([_cifar_batch(root / f"data_batch_{i}", b"labels", 10) for i in range(1, 6)])
    xte, yte = _cifar_batch(root / "test_batch", b"labels", 10)
    return ImageData("cifar10", xtr, ytr, xte, yte, 10)


def load_cifar100(data_dir: str | Path) -> ImageData:
    root = Path(data_dir)
    root = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    xtr, ytr = _cifar_batch(root / "train", b"fine_labels", 100)
    xte, yte = _cifar_batch(root / "test", b"fine_labels", 100)
    return ImageData("cifar100", xtr, ytr, xte, yte, 100)


def load_svhn(data_dir: str | Path) -> ImageData:
    from scipy.io import loadmat

    root = Path(data_dir)
    splits = {}
    for split in ("train", "test"):
        path = root / f"{split}_32x32.mat"
        if not path.exists():
            raise FileNotFoundError(f"missing {path}")
        try:
            mat = loadmat(path)
            x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"], dtype=np.int64)
        except Exception as err:  # scipy raises many kinds for a truncated or foreign file
            raise DataError(f"{path} is not a readable SVHN .mat file: {type(err).__name__}: {err}") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.ndim != 2 or y.shape[1] != 1:
            raise DataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1], got {x.shape} and {y.shape}")
        y = y.reshape(-1)
        bad = np.flatnonzero((y < 1) | (y > 10))
        if len(bad):  # checked before the mapping below, which would hide e.g. an 11
            raise DataError(
                f"{path}: label {y[bad[0]]} (sample {bad[0]}) is outside 1..10 (10 means digit 0)"
            )
        # [32,32,3,N] → [N,32,32,3]; SVHN stores digit 0 as 10
        splits[split] = _checked(x.transpose(3, 0, 1, 2), y % 10, 10, path)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    return ImageData("svhn", xtr, ytr, xte, yte, 10)


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`) from ``data_dir`` (never downloads)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_dir is None:  # name in NEEDS_DATA_DIR
        raise ValueError(f"dataset {name!r} needs --data-dir pointing at its local files (no downloads)")
    return {"cifar10": load_cifar10, "cifar100": load_cifar100, "svhn": load_svhn}[name](data_dir)


def forget_mask(
    labels: Tensor,
    scenario: str,
    *,
    forget_classes: list[int] | tuple[int, ...] = (),
    forget_ratio: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """Boolean mask over training samples to forget.

    ``scenario="class"``: every sample of ``forget_classes``.  ``scenario="random"``: a
    uniformly random ``forget_ratio`` share of all samples (seeded).
    """
    if scenario == "class":
        if not forget_classes:
            raise ValueError("scenario='class' needs at least one forget class")
        num_classes = int(labels.max()) + 1
        bad = [c for c in forget_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"forget classes {bad} are outside 0..{num_classes - 1}")
        return torch.isin(labels, torch.tensor(list(forget_classes), dtype=labels.dtype))
    if scenario == "random":
        if not 0 < forget_ratio < 1:
            raise ValueError(f"forget_ratio must lie in (0, 1), got {forget_ratio!r}")
        n = len(labels)
        count = max(1, round(forget_ratio * n))
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        return mask
    raise ValueError(f"scenario must be 'class' or 'random', got {scenario!r}")
