"""The contract every backend implements: two passes over the parameter shards, for K players.

1. ``gram(grads, device)`` → float64 tensor ``[K(K+1)/2]``, the packed upper triangle of
   ``GᵀG`` (``[ff, fr, rr]`` for two players; partial sums for the local shards, the optimizer
   all-reduces them when sharded).  ``grads[k][i]`` is player k's gradient of tensor i.
2. ``adamw(bucket, coefficients, skip, hp)`` / ``sgd(...)`` → apply the base rule to
   ``d = Σ_k c_k·(s_k·g_k)`` in place, where ``coefficients = [c_1..c_K, s_1..s_K]``
   (float64, from :func:`kernel_coefficients`: the ``s`` are powers of two that keep the
   ``c`` inside the compute dtype's range) and ``skip`` (a 0-dim float tensor, 1.0 = skip)
   are device tensors: nothing reads them on the host.

A backend is a module exposing ``name``, ``is_available()``, ``unavailable_reason()``
(a short human-readable string, "" when available), ``supports(device)`` and those three
functions; the optimizer groups tensors into :class:`TensorBucket` s, flat lists of tensors
(one per parameter) for the gradients of each player and for each state key.

Semantics every backend must match (the reference backend is the oracle):
* ``gram``: float64 accumulation; ``None`` entries count as zero; deterministic.
* ``d`` is formed in the compute dtype (fp32; fp64 for fp64 parameters), players added in
  order, and **never rounded to the gradient dtype**: it is never materialised in the fused
  backends, so for bf16/fp16 parameters the step is more precise than torch.optim fed d as
  ``.grad`` (identical for fp32/fp64).
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

Each rule's hyperparameters are declared once, as the fields of :class:`AdamWHyper` /
:class:`SGDHyper`; :data:`RULES` adds the state keys.  The custom-op schemas, the C++
bindings' argument order and the Triton launch arguments all follow those declarations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class TensorBucket:
    """Tensors of one param group sharing device, dtype, state dtype and first-step-ness: one launch.

    ``grads[k][i]`` is player k's gradient of ``params[i]``, or ``None`` (a missing gradient
    counts as zero; a parameter has at least one).  ``states[key][i]`` is ``params[i]``'s
    state tensor ``key`` (the rule's :data:`RULES` keys; none for SGD without momentum).
    """

    params: list[Tensor] = field(default_factory=list)
    grads: list[list[Tensor | None]] = field(default_factory=lambda: [[], []])
    states: dict[str, list[Tensor]] = field(default_factory=dict)
    first_step: bool = False

    @property
    def players(self) -> int:
        return len(self.grads)

    @property
    def forget(self) -> list[Tensor | None]:
        """Two-player spelling: the first player's gradients."""
        return self.grads[0]

    @property
    def preserve(self) -> list[Tensor | None]:
        """Two-player spelling: the last player's gradients (the live ``.grad``)."""
        return self.grads[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def state_dtype(self) -> torch.dtype:
        """Dtype of the floating state tensors (all alike in a bucket); the param dtype if none."""
        for key, values in self.states.items():
            if key != "step" and values:
                return values[0].dtype
        return self.dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def state(self, key: str) -> list[Tensor]:
        return self.states.get(key, [])


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


@dataclass(frozen=True)
class Rule:
    """A base rule: its hyperparameters (a dataclass whose first field is ``lr``), the state
    keys its kernels update (in the order the kernels take them), and ``scalars``: ``(name,
    float|bool)`` of every hyperparameter but ``lr`` in declaration order (read off the
    dataclass once, here: torch.compile cannot trace ``dataclasses.fields``)."""

    hyper: type
    state_keys: tuple[str, ...]
    scalars: tuple[tuple[str, type], ...]


def _rule(hyper: type, state_keys: tuple[str, ...]) -> Rule:
    scalars = tuple((f.name, bool if "bool" in str(f.type) else float) for f in fields(hyper)[1:])
    return Rule(hyper, state_keys, scalars)


RULES = {
    "adamw": _rule(AdamWHyper, ("exp_avg", "exp_avg_sq", "step")),
    "sgd": _rule(SGDHyper, ("momentum_buffer", "step")),  # only with momentum
}


def rule_state_keys(rule: str, hp) -> tuple[str, ...]:
    """The state keys a step of ``rule`` with ``hp`` uses (SGD without momentum: none)."""
    return () if rule == "sgd" and hp.momentum == 0 else RULES[rule].state_keys


_FP32_EXPONENTS = (-126, 127)  # powers of two that are normal fp32 numbers


def kernel_coefficients(coefficients: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``[c_1..c_K, s_1..s_K]`` (float64) with ``c·s`` = the bargain's coefficients.

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
    for i, p in enumerate(bucket.params):
        mine = [bucket.states[key][i] for key in state_keys]
        copy = not (is_dense(p) and all(t.stride() == p.stride() for t in mine))
        for tensors, t in zip([params, *states], [p, *mine]):
            tensors.append(t.contiguous().clone() if copy else t)
            if copy:
                staged.append((t, tensors[-1]))
    return params, states, staged


def copy_back(staged) -> None:
    for original, copy in staged:
        original.copy_(copy)
