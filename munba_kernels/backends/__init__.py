"""Backends: interchangeable implementations of the two per-step passes.

``resolve(name, device)`` maps the optimizer's ``backend=`` argument to a module that
follows the contract in :mod:`munba_kernels.backends.base`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

#: Every name ``backend=`` accepts.  Backends not built into this install fail clearly.
BACKEND_NAMES = ("auto", "torch", "cpp", "triton")

_REGISTRY: dict[str, ModuleType] = {reference.name: reference}


def available() -> list[str]:
    """Names of the backends usable in this install."""
    return [n for n, m in _REGISTRY.items() if m.is_available()]


def validate_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device`` ("auto" picks the fastest usable one)."""
    validate_name(name)
    if name == "auto":
        preferred = {"cuda": ("triton",), "cpu": ("cpp",)}.get(device.type, ())
        for candidate in (*preferred, reference.name):
            module = _REGISTRY.get(candidate)
            if module is not None and module.is_available() and module.supports(device):
                return module
        raise RuntimeError(f"no MUNBa backend supports device {device}")  # pragma: no cover
    module = _REGISTRY.get(name)
    if module is None or not module.is_available():
        raise RuntimeError(f"backend={name!r} is not available in this install (available: {available()})")
    if not module.supports(device):
        raise RuntimeError(f"backend={name!r} does not support parameters on {device}")
    return module
