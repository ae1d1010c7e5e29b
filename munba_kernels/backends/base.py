"""The contract every backend implements: two passes over the parameter shards.

1. ``gram(forget, preserve, device)`` → float64 tensor ``[ff, fr, rr]`` (partial sums
   for the local shards; the optimizer all-reduces them when sharded).
2. ``adamw(bucket, coefficients, skip, hp)`` / ``sgd(...)`` → apply the base rule to
   ``d = c_f·g_f + c_r·g_r`` in place, where ``coefficients = [c_f, c_r]`` and ``skip``
   (a 0-dim float tensor, 1.0 = skip) are device tensors: nothing reads them on the host.

A backend is a module exposing ``name``, ``is_available()``, ``unavailable_reason()``
(a short human-readable string, "" when available), ``supports(device)`` and those three
functions; the optimizer groups tensors into :class:`TensorBucket` s.

Semantics every backend must match (the reference backend is the oracle):
* ``gram``: float64 accumulation; ``None`` entries count as zero; deterministic.
* ``adamw``: exactly torch.optim.AdamW (decoupled decay, bias correction with the
  per-parameter ``state["step"]``, a float32 0-dim tensor on the parameter's device,
  incremented by 1 unless skipped), states ``exp_avg``/``exp_avg_sq`` in the param dtype
  or, for bf16/fp16 params, in fp32 (``TensorBucket.state_dtype``), math in fp32 (fp64 for
  fp64 params), one rounding on store.
* ``sgd``: exactly torch.optim.SGD (L2 decay added to d, momentum buffer
  ``state["momentum_buffer"]`` set to d when ``bucket.first_step``, dampening, nesterov),
  the buffer in the bucket's state dtype.
* ``maximize`` negates d.  When ``skip`` is 1.0 nothing is written at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TensorBucket:
    """Tensors of one param group sharing device, dtype, state dtype and first-step-ness: one launch.

    ``forget[i]`` / ``preserve[i]`` may be ``None`` (a missing gradient counts as zero)
    but never both.  ``states[i]`` is the optimizer state dict of ``params[i]``.
    """

    params: list[Tensor] = field(default_factory=list)
    forget: list[Tensor | None] = field(default_factory=list)
    preserve: list[Tensor | None] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)
    first_step: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def state_dtype(self) -> torch.dtype:
        """Dtype of the floating state tensors (all alike in a bucket); the param dtype if none."""
        for state in self.states[:1]:
            for key, value in state.items():
                if key != "step":
                    return value.dtype
        return self.dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def state(self, key: str) -> list[Tensor]:
        return [s[key] for s in self.states]


@dataclass(frozen=True)
class AdamWHyper:
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool


@dataclass(frozen=True)
class SGDHyper:
    lr: float | Tensor
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def stage_for_linear_walk(bucket: TensorBucket, state_keys: Sequence[str]):
    """Params and per-key state lists that a kernel walking memory linearly can update.

    Fused kernels pair the elements of a parameter and its states in memory order, so each
    parameter must be dense and share its states' strides.  The rare one that is not (a
    strided view, or states laid out differently) is replaced by contiguous copies; the
    returned ``(original, copy)`` pairs go to :func:`copy_back` after the kernel ran.
    """
    params, states, staged = [], [[] for _ in state_keys], []
    for p, state in zip(bucket.params, bucket.states):
        copy = not (is_dense(p) and all(state[key].stride() == p.stride() for key in state_keys))
        for tensors, t in zip([params, *states], [p, *(state[k] for k in state_keys)]):
            tensors.append(t.contiguous().clone() if copy else t)
            if copy:
                staged.append((t, tensors[-1]))
    return params, states, staged


def copy_back(staged) -> None:
    for original, copy in staged:
        original.copy_(copy)
