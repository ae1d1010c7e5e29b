"""Test helper: small dataset files written in each dataset's real distribution format."""

import gzip
import struct

import numpy as np


def write_idx(path, array, compress=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


def write_fashion_mnist(directory, n_train=12, n_test=5, compress=False, seed=0, relabel=None):
    """Random 28×28 idx files in ``directory``; returns {prefix: (images, labels)}.

    ``relabel`` (a function of the label array) rewrites the training labels, e.g. to make a
    relabelled copy of the same images."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        if relabel is not None and prefix == "train":
            labels = relabel(labels).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", imgs, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (imgs, labels)
    return arrays
