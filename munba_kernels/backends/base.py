"""The contract every backend implements: two passes over the parameter shards.

1. ``gram(forget, preserve, device)`` → float64 tensor ``[ff, fr, rr]`` (partial sums
   for the local shards; the optimizer all-reduces them when sharded).
2. ``adamw(bucket, coefficients, skip, hp)`` / ``sgd(...)`` → apply the base rule to
   ``d = c_f·(s_f·g_f) + c_r·(s_r·g_r)`` in place, where ``coefficients = [c_f, c_r, s_f,
   s_r]`` (float64, from :func:`kernel_coefficients`: the ``s`` are powers of two that keep
   the ``c`` inside the compute dtype's range) and ``skip`` (a 0-dim float tensor, 1.0 =
   skip) are device tensors: nothing reads them on the host.

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
* ``sgd``: exactly torch.optim.SGD (L2 decay added to d, dampening, nesterov; the
  momentum buffer ``state["momentum_buffer"]`` is set to d on a tensor's first step), the
  buffer in the bucket's state dtype.  With momentum, ``state["step"]`` (as AdamW's) counts
  the steps taken, so "first step" means a count of 0 before this step, a device fact: a
  skipped first step leaves the next one first.  ``bucket.first_step`` is the host's
  knowledge that every count is 0 (states created in this step).
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


_FP32_EXPONENTS = (-126, 127)  # powers of two that are normal fp32 numbers


def kernel_coefficients(coefficients: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``[c_f, c_r, s_f, s_r]`` (float64) with ``c·s`` = the bargain's coefficients.

    ``α = a/‖g‖`` exceeds fp32's range for gradients of norm below ~1e-38 (or above ~1e38
    it falls below the normal range), while every element of ``α·g`` is of order ``a``.
    So a coefficient outside fp32's normal range is split into a power of two ``s``
    (applied to the gradient first: ``g·s`` is exact, since ``|g_i|·s ≤ |g_i|·α`` cannot
    overflow) and a rest ``c = α/s`` that fp32 represents.  Coefficients inside the range
    keep ``s = 1``, and ``g·1`` is ``g``: the same bits as applying ``α`` directly.
    float64 compute needs no split (``α`` stays inside float64 whenever the Gram does).
    Device math only: no host synchronisation.
    """
    c = coefficients.to(torch.float64)
    if compute_dtype == torch.float64:
        return torch.cat([c, torch.ones_like(c)])
    low, high = _FP32_EXPONENTS
    magnitude = c.abs()
    in_range = (magnitude == 0) | ((magnitude >= 2.0**low) & (magnitude < 2.0**high))
    _, exponent = torch.frexp(magnitude)  # magnitude = m·2**exponent, m in [0.5, 1)
    scale = torch.where(in_range, 1.0, torch.exp2((exponent - 1).clamp(low, high).to(torch.float64)))
    return torch.cat([c / scale, scale])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math dtype of the update kernels (torch's opmath): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
