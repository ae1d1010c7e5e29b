"""The drivers' model cache: files named by a hash of everything that shaped the model.

A key must hold every setting that changes the trained weights, a :func:`fingerprint` of the
training data actually loaded (so a relabelled or otherwise edited copy of a dataset is never
served another copy's models) and a version number that is bumped when the training code
changes, so a cache entry is never reused by mistake.  An entry that cannot be read (empty,
truncated, not a cache entry, other weights) is reported by name and retrained, and the
new entry replaces it (:func:`load_entry`, :func:`save_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn


def default_cache_dir() -> str:
    """``$MUNBA_CACHE_DIR`` or ``~/.cache/munba_kernels``."""
    return str(Path(os.environ.get("MUNBA_CACHE_DIR", Path.home() / ".cache" / "munba_kernels")))


def cache_path(cache_dir: str | Path, subdir: str, stem: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / subdir / f"{stem}-{digest}.pt"


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes (hex): the content of the data a model is
    trained on, for its cache key.  About a second per GB."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def load_entry(path: Path, model: nn.Module, map_location=None) -> dict | None:
    """Load the cache entry at ``path`` into ``model`` and return it; ``None`` if there is none or
    it cannot be used, with a warning naming the file (the caller then retrains and replaces it).

    ``model`` is left untouched unless the entry's weights fit it exactly."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location=map_location)
        state, expected = saved["state_dict"], model.state_dict()
        float(saved["seconds"])
        if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError("its weights do not fit the model")
    except Exception as err:  # torch.load fails in many ways on a damaged file
        reason = (str(err).strip().splitlines() or [""])[0]
        warnings.warn(
            f"unreadable model cache file {path} ({type(err).__name__}: {reason}); retraining and replacing it",
            stacklevel=2,
        )
        return None
    model.load_state_dict(state)
    return saved


def save_atomic(obj, path: Path) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a truncated entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
