"""The drivers' model cache: files named by a hash of everything that shaped the model.

A key must hold every setting that changes the trained weights plus a version number that
is bumped when the training code changes, so a cache entry is never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def default_cache_dir() -> str:
    """``$MUNBA_CACHE_DIR`` or ``~/.cache/munba_kernels``."""
    return str(Path(os.environ.get("MUNBA_CACHE_DIR", Path.home() / ".cache" / "munba_kernels")))


def cache_path(cache_dir: str | Path, subdir: str, stem: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / subdir / f"{stem}-{digest}.pt"


def save_atomic(obj, path: Path) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a truncated entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
