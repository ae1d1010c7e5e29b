"""Compiled CPU backend: the two passes as fused C++ kernels (``csrc/munba_cpu.cpp``).

* :func:`gram` reads every gradient once and accumulates ``[ff, fr, rr]`` in float64 over
  fixed-size chunks summed in a fixed order, so the result is bitwise identical for any
  thread count.
* :func:`adamw` / :func:`sgd` make one pass per tensor: ``d = c_f·g_f + c_r·g_r`` is formed
  in registers (never stored), then the base rule updates the parameter and its states,
  each written once.

Both passes run as ``torch.library`` custom ops (:mod:`.ops`), so ``torch.compile`` keeps
them as opaque nodes.  The extension ``munba_kernels._C_cpu`` is optional (``setup.py`` skips it when it cannot be
compiled); it is imported on first use, never at import time, and :func:`is_available`
reports why it is missing.

Layouts: the kernels walk each parameter's memory linearly, so a parameter must be dense
(contiguous, channels_last, ...) and its states must share its strides.  Gradients in
another layout are copied into the parameter's layout by the extension; the rare parameter
that is a gapped view (or whose states are laid out differently) is updated through a
contiguous copy that is copied back (:func:`.base.stage_for_linear_walk`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from . import ops, reference
from .base import RULES, AdamWHyper, SGDHyper, TensorBucket, copy_back, rule_state_keys, stage_for_linear_walk

name = "cpp"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ext: ModuleType | None = None
_error: str | None = None


def _extension() -> ModuleType | None:
    global _ext, _error
    if _ext is None and _error is None:
        try:
            _ext = importlib.import_module("munba_kernels._C_cpu")
        except ImportError as err:
            _error = f"the C++ extension munba_kernels._C_cpu is not built or does not load: {err}"
    return _ext


def is_available() -> bool:
    return _extension() is not None


def unavailable_reason() -> str:
    return "" if is_available() else str(_error)


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def _lib() -> ModuleType:
    lib = _extension()
    if lib is None:
        raise RuntimeError(f"backend='cpp' is unavailable: {_error}")
    return lib


def _gram(grads: Sequence[Sequence[Tensor | None]], device) -> Tensor:
    """The packed float64 Gram of ``grads[player][tensor]`` (``None`` = zero gradient)."""
    if any(g is not None and g.dtype not in _DTYPES for player in grads for g in player):
        return reference.gram(grads, device)  # e.g. float8: no kernel for it
    return _lib().gram([list(player) for player in grads])


def gram_partials(grads: Sequence[Sequence[Tensor | None]], device) -> Tensor:
    """``[n_chunks, K(K+1)/2]``: the chunk sums :func:`gram` adds, in its chunk order (eager;
    what ``gram_in_backward`` computes tensor by tensor as gradients are accumulated)."""
    if any(g is not None and g.dtype not in _DTYPES for player in grads for g in player):
        return reference.gram_partials(grads, device)
    return _lib().gram_partials([list(player) for player in grads])


def sum_partials(partials: Tensor) -> Tensor:
    """The rows of ``[n, width]`` float64 partials added in order from 0.0: :func:`gram`'s bits."""
    return _lib().sum_partials(partials.contiguous())


def _lr(lr: float | Tensor) -> float:
    # A CPU tensor lr is read as torch's fused kernels read it (its value as a double).
    return float(lr)


def _update(rule: str, bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp) -> None:
    """One launch of the C++ rule: its arguments follow :data:`.base.RULES` (state lists in the
    rule's key order, then the hyperparameters in their declared order)."""
    if bucket.dtype not in _DTYPES:  # e.g. float8: no kernel for it
        getattr(reference, rule)(bucket, coefficients, skip, hp)
        return
    keys = rule_state_keys(rule, hp)
    elementwise = [key for key in keys if key != "step"]
    params, staged_states, staged = stage_for_linear_walk(bucket, elementwise)
    by_key = dict(zip(elementwise, staged_states))
    states = [by_key.get(key, bucket.state(key)) if key in keys else [] for key in RULES[rule].state_keys]
    scalars = [getattr(hp, name) for name, _ in RULES[rule].scalars]
    getattr(_lib(), rule)(params, [list(g) for g in bucket.grads], *states, coefficients, skip, _lr(hp.lr), *scalars)
    copy_back(staged)


def _adamw(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: AdamWHyper) -> None:
    _update("adamw", bucket, coefficients, skip, hp)


def _sgd(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: SGDHyper) -> None:
    _update("sgd", bucket, coefficients, skip, hp)


_OPS = ops.register(name, _gram, _adamw, _sgd)
gram, adamw, sgd = _OPS.gram, _OPS.adamw, _OPS.sgd
