"""Backends: interchangeable implementations of the two per-step passes.

``resolve(name, device)`` maps the optimizer's ``backend=`` argument to a module that
follows the contract in :mod:`munba_kernels.backends.base`.  The reference backend is
always present; the fused ones (``cpp.py``: compiled CPU kernels, ``triton_backend.py``:
GPU kernels) are imported when their files exist and report whether they can run.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from . import reference

#: Every name ``backend=`` accepts.  Backends not usable in this install fail clearly.
BACKEND_NAMES = ("auto", "torch", "cpp", "triton")
_OPTIONAL_MODULES = {"cpp": "cpp", "triton": "triton_backend"}
_AUTO_PREFERENCE = {"cuda": "triton", "cpu": "cpp"}


_loaded: dict[str, ModuleType | None] = {reference.name: reference}


def _load(name: str) -> ModuleType | None:
    """The backend's module (None: not part of this build), imported once: ``step()`` calls
    this every time, and torch.compile cannot trace an import."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{_OPTIONAL_MODULES[name]}")
        except ModuleNotFoundError as err:
            if not (err.name and err.name.startswith(__name__)):
                raise
            _loaded[name] = None
    return _loaded[name]


def available() -> list[str]:
    """Names of the backends usable in this install."""
    names = [reference.name, *_OPTIONAL_MODULES]
    return [n for n in names if (m := _load(n)) is not None and m.is_available()]


def validate_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


_warned: set[str] = set()


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device`` ("auto" picks the fastest usable one)."""
    validate_name(name)
    if name == "auto":
        preferred = _AUTO_PREFERENCE.get(device.type)
        if preferred is not None:
            module = _load(preferred)
            if module is not None and module.is_available() and module.supports(device):
                return module
            if preferred not in _warned:
                _warned.add(preferred)
                reason = "not built" if module is None else module.unavailable_reason()
                warnings.warn(
                    f"munba_kernels: the {preferred!r} backend for {device.type} tensors is "
                    f"unavailable ({reason}); falling back to the plain-torch reference backend",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return reference
    module = _load(name)
    if module is None or not module.is_available():
        reason = "not built" if module is None else module.unavailable_reason()
        raise RuntimeError(
            f"backend={name!r} is not available in this install ({reason}); available: {available()}"
        )
    if not module.supports(device):
        raise RuntimeError(f"backend={name!r} does not support parameters on {device}")
    return module
