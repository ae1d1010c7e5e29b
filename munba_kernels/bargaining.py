"""Nash bargaining: the closed form for two players, the dispatch for K (``bargaining_k``).

Everything here is element-wise tensor math on the three Gram entries
``(ff, fr, rr) = (g_f·g_f, g_f·g_r, g_r·g_r)``.  It runs on any device, batches over
leading dimensions and never synchronises with the host, so the optimizer can call it
between its two passes over memory.

The math (MUNBa, arXiv 2411.15537).  With bargaining power ``w = (w_f, w_r)`` the
Nash solution ``d = α_f g_f + α_r g_r`` satisfies ``(GᵀG) α = w / α``.  Writing
``a = α_f‖g_f‖``, ``b = α_r‖g_r‖`` and ``c = cos φ`` this is

    a² + c·ab = w_f,        b² + c·ab = w_r.

With ``t = a / b``:  ``w_r t² + c (w_r − w_f) t − w_f = 0`` has exactly one positive
root, and ``b² = w_r / (1 + c t)``.  For equal power ``t = 1`` and the solution is the
bisector ``d = (ĝ_f + ĝ_r) / sqrt(1 + c)``.  Adding the two equations shows
``‖d‖² = a² + 2c·ab + b² = w_f + w_r`` for *every* non-degenerate Gram matrix, so a
norm clip needs no pass over memory.  Only the cosine enters, so the result is exactly
invariant to rescaling either loss.

Degenerate cases (the policy; each has a status code):

* ``NONFINITE`` – a gradient holds NaN/Inf (a Gram entry is NaN/Inf).  α = 0 and the
  optimizer skips the whole step: no parameter or state changes.
* ``OUT_OF_RANGE`` – the gradients are finite and non-zero, but a Gram entry left
  float64's normal range (overflow to Inf, or a non-zero squared norm below the smallest
  normal, where cos φ loses its precision).  Only float64 gradients can do this (norms
  outside about [1.5e-154, 1.3e154]); fp32/bf16/fp16 squares always fit.  Skipped like
  ``NONFINITE``, under its own name: the gradients are not NaN/Inf.  Telling the two apart
  needs ``gradient_flags`` (the optimizer computes them for float64 gradients); from the
  Gram alone an Inf entry counts as ``NONFINITE``.
* ``BOTH_ZERO`` – both gradients are exactly zero.  α = 0, d = 0.
* ``FORGET_ZERO`` / ``PRESERVE_ZERO`` – one gradient is exactly zero, so its player's
  utility ``g·d`` is 0 for every d and the bargaining problem is undefined.  The other
  player moves alone with the one-player solution of the same equation,
  ``α = sqrt(w)/‖g‖`` (‖d‖² = w); the zero player's α is 0.
* ``OPPOSED`` – ``1 + cos φ ≤ opposition_tol``.  No direction improves both players:
  the Nash step's utilities ``g_f·d = ‖g_f‖·a·(1 + c·b/a)`` shrink to 0 as c → −1 while
  α grows without bound, so the only part of d that survives is rounding noise.  We take
  the limit of what matters: d = 0 (the bargaining "disagreement point").  The paper
  instead suggests perturbing the smaller gradient; the official code falls back to
  fixed weights (1, 0.1).
* Gradients that are merely tiny or huge are *not* degenerate: the Gram is accumulated
  in float64, where every non-zero fp32/bf16/fp16 gradient has a non-zero square, and
  the solution depends on the cosine alone.  The weights ``α = a/‖g‖`` (float64) can
  then exceed fp32's range (a gradient of norm 1e-40 has α ≈ 1e40); the kernels apply
  them scale-safely (:func:`munba_kernels.backends.base.kernel_coefficients`).

K ≥ 3 players (several forget objectives and the preserve one): Grams are packed
``[..., K(K+1)/2]`` (upper triangle row by row; K = 2 is ``(ff, fr, rr)``) and solved by
:mod:`munba_kernels.bargaining_k` (fixed-iteration Newton on the device).  A zero player is
dropped (``PLAYER_ZERO``), Pareto-stationary gradients give ``OPPOSED``.

Bargaining power: each ``w`` must lie in ``POWER_RANGE`` ([1e-150, 1e150]), so the
quadratic's products ``w_f·w_r`` and ``(c·(w_r − w_f))²`` stay inside float64.  Only the
ratio ``w_f / w_r`` shapes the direction; the sum sets ‖d‖² (the optimizer bounds it by
the parameters' dtype when no clip is set).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import bargaining_k

__all__ = [
    "BargainStatus",
    "Bargain",
    "DEFAULT_OPPOSITION_TOL",
    "POWER_RANGE",
    "bargaining_weights",
    "solve_bargain",
    "validate_power",
]

#: ``1 + cos φ`` at or below which the players count as exactly opposed.  The update is
#: formed in fp32, where the bisector's relative rounding error is about
#: ``eps_fp32 / sqrt(1 + cos φ)``: 1.2e-4 at this threshold.
DEFAULT_OPPOSITION_TOL = 1e-6

#: Admissible bargaining-power entries (see the module docstring).
POWER_RANGE = (1e-150, 1e150)


class BargainStatus(enum.IntEnum):
    """How the bargaining weights of one step were obtained (see the module docstring)."""

    OK = 0
    FORGET_ZERO = 1
    PRESERVE_ZERO = 2
    BOTH_ZERO = 3
    OPPOSED = 4
    NONFINITE = 5
    OUT_OF_RANGE = 6
    PLAYER_ZERO = 7  # K ≥ 3: some players' gradients are zero; the others bargain
    ALL_ZERO = 3  # K ≥ 3 spelling of BOTH_ZERO


_SKIPPING = (int(BargainStatus.NONFINITE), int(BargainStatus.OUT_OF_RANGE))


class Bargain(NamedTuple):
    """Result of one bargain; every field is a device tensor (batched over ``...``)."""

    alpha: Tensor  # [..., K] the Nash weights before any clipping ((alpha_f, alpha_r) for two players)
    cos: Tensor  # [...] cos φ between the first and the last player (forget, preserve); 0 if one is zero
    gram: Tensor  # [..., K(K+1)/2] packed Gram ((ff, fr, rr) for two) in the compute dtype
    status: Tensor  # [...] int32 BargainStatus codes
    direction_norm: Tensor  # [...] ‖d‖ before clipping
    clip_scale: Tensor  # [...] factor in (0, 1] applied by max_grad_norm (1 without clip)
    coefficients: Tensor  # [..., K] weights actually applied to the gradients: alpha × clip_scale
    cosines: Tensor | None = None  # [..., K, K] cosine matrix (identity rows for zero players)

    @property
    def skipped(self) -> Tensor:
        """Boolean tensor: the optimizer skipped this step (``NONFINITE`` or ``OUT_OF_RANGE``)."""
        # ints, not IntEnum members: torch.compile cannot compare a tensor with an IntEnum
        return (self.status == _SKIPPING[0]) | (self.status == _SKIPPING[1])


def validate_power(power: Sequence[float], players: int = 2) -> tuple[float, ...]:
    """Return ``power`` as ``players`` floats in :data:`POWER_RANGE` or raise a ``ValueError`` naming it."""
    try:
        values = tuple(float(w) for w in power)
    except (TypeError, ValueError):
        values = ()
    if len(values) != players:
        names = "a pair (w_forget, w_preserve)" if players == 2 else f"{players} powers, one per player,"
        raise ValueError(f"bargaining_power must be {names} of floats, got {power!r}")
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(f"bargaining_power entries must be positive and finite, got {values!r}")
    low, high = POWER_RANGE
    if not all(low <= w <= high for w in values):
        raise ValueError(
            f"bargaining_power entries must lie in [{low:g}, {high:g}] (only their ratios shape the "
            f"direction; their sum is ‖d‖²), got {values!r}"
        )
    return values


def _compute_dtype(t: Tensor) -> torch.dtype:
    # float64 wherever the device has it: the solve is a handful of scalar ops.
    return torch.float32 if t.device.type == "mps" else torch.float64


def solve_bargain(
    gram: Tensor,
    power: Sequence[float] | None = None,
    *,
    opposition_tol: float = DEFAULT_OPPOSITION_TOL,
    max_norm: float | None = None,
    gradient_flags: Tensor | None = None,
) -> Bargain:
    """Solve the bargaining problem for packed Grams ``gram[..., K(K+1)/2]`` (K = 2: ``(ff, fr, rr)``).

    Returns a :class:`Bargain` whose tensors live on ``gram``'s device, computed in
    float64 (float32 on MPS).  ``max_norm`` adds a clip scale so that
    ``‖coefficients · (g_f, g_r)‖ ≤ max_norm``, using ``‖d‖`` known from the solve.

    ``gradient_flags`` (optional, ``[..., K + 1]``): how many tensors hold a non-zero
    gradient of each player, and how many a NaN/Inf.  Without them zero and
    non-finite gradients are read off the Gram, which is exact unless a float64 Gram
    under- or overflowed (``OUT_OF_RANGE`` in the module docstring).
    """
    if gram.dim() == 0:
        raise ValueError("gram must have shape [..., K(K+1)/2] (packed upper triangle), got a scalar")
    try:
        players = bargaining_k.players_of(gram.shape[-1])
    except ValueError:
        raise ValueError(
            f"gram must have shape [..., K(K+1)/2] (packed upper triangle; [..., 3] = (ff, fr, rr) for "
            f"two players), got {tuple(gram.shape)}"
        ) from None
    if not gram.is_floating_point():
        raise TypeError(f"gram must be a floating-point tensor, got {gram.dtype}")
    weights = validate_power((1.0,) * players if power is None else power, players)
    if not (opposition_tol >= 0 and math.isfinite(opposition_tol)):
        raise ValueError(f"opposition_tol must be a finite number >= 0, got {opposition_tol!r}")
    if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be positive and finite or None, got {max_norm!r}")
    flags_shape = (*gram.shape[:-1], players + 1)
    if gradient_flags is not None and tuple(gradient_flags.shape) != flags_shape:
        raise ValueError(f"gradient_flags must have shape {flags_shape}, got {tuple(gradient_flags.shape)}")
    if players > 2:
        return _solve_many(gram, weights, opposition_tol, max_norm, gradient_flags)
    w_f, w_r = weights

    dtype = _compute_dtype(gram)
    g = gram.to(dtype)
    ff, fr, rr = g.unbind(-1)
    if gradient_flags is None:
        finite = torch.isfinite(ff) & torch.isfinite(fr) & torch.isfinite(rr)
        f_zero = ff <= 0  # a sum of squares: <= 0 means exactly zero
        r_zero = rr <= 0
    else:
        nonzero_f, nonzero_r, nonfinite = gradient_flags.to(dtype).unbind(-1)
        finite = nonfinite == 0
        f_zero = nonzero_f == 0
        r_zero = nonzero_r == 0
    info = torch.finfo(dtype)

    def representable(x: Tensor) -> Tensor:  # a normal number: false for 0, subnormals, Inf, NaN
        return (x >= info.tiny) & (x <= info.max)

    out_of_range = finite & ((~f_zero & ~representable(ff)) | (~r_zero & ~representable(rr)))
    usable = finite & ~out_of_range
    nf = ff.clamp_min(0).sqrt()
    nr = rr.clamp_min(0).sqrt()
    both = usable & ~f_zero & ~r_zero
    one = torch.ones_like(ff)
    # (fr / nf) / nr cannot overflow: |fr| <= nf·nr.
    cos = torch.where(both, (fr / torch.where(both, nf, one)) / torch.where(both, nr, one), 0.0)
    cos = cos.clamp(-1.0, 1.0)
    opposed = both & (1.0 + cos <= opposition_tol)

    # Positive root of w_r t² + c (w_r − w_f) t − w_f = 0, in the form free of cancellation.
    cd = cos * (w_r - w_f)
    s = torch.sqrt(cd * cd + 4.0 * w_r * w_f)
    t = torch.where(cd <= 0, (s - cd) / (2.0 * w_r), (2.0 * w_f) / (cd + s))
    ok = both & ~opposed
    b = torch.sqrt(w_r / torch.where(ok, 1.0 + cos * t, one))
    safe_nf = torch.where(usable & ~f_zero, nf, one)
    safe_nr = torch.where(usable & ~r_zero, nr, one)
    alpha_f = torch.where(ok, t * b / safe_nf, 0.0)
    alpha_r = torch.where(ok, b / safe_nr, 0.0)
    norm_sq = torch.where(ok, one * (w_f + w_r), 0.0)

    solo_r = usable & f_zero & ~r_zero  # preserve player alone
    solo_f = usable & r_zero & ~f_zero  # forget player alone
    alpha_r = torch.where(solo_r, math.sqrt(w_r) / safe_nr, alpha_r)
    alpha_f = torch.where(solo_f, math.sqrt(w_f) / safe_nf, alpha_f)
    norm_sq = torch.where(solo_r, one * w_r, torch.where(solo_f, one * w_f, norm_sq))

    status = torch.full_like(ff, BargainStatus.OK, dtype=torch.int32)
    for mask, code in (
        (solo_r, BargainStatus.FORGET_ZERO),
        (solo_f, BargainStatus.PRESERVE_ZERO),
        (usable & f_zero & r_zero, BargainStatus.BOTH_ZERO),
        (opposed, BargainStatus.OPPOSED),
        (out_of_range, BargainStatus.OUT_OF_RANGE),
        (~finite, BargainStatus.NONFINITE),
    ):
        status = torch.where(mask, int(code), status)

    alpha = torch.stack([alpha_f, alpha_r], dim=-1)
    ones = torch.ones_like(cos)
    cosines = torch.stack([torch.stack([ones, cos], -1), torch.stack([cos, ones], -1)], -2)
    return _finish(alpha, cos, cosines, g, status, norm_sq, max_norm)


def _finish(alpha, cos, cosines, gram, status, norm_sq, max_norm) -> Bargain:
    """The clip and the Bargain, shared by the two-player and the K-player solve."""
    norm = norm_sq.sqrt()
    if max_norm is None:
        clip = torch.ones_like(norm)
    else:
        clip = torch.where(norm > max_norm, max_norm / torch.where(norm > 0, norm, torch.ones_like(norm)), 1.0)
    return Bargain(
        alpha=alpha,
        cos=cos,
        gram=gram,
        status=status,
        direction_norm=norm,
        clip_scale=clip,
        coefficients=alpha * clip.unsqueeze(-1),
        cosines=cosines,
    )


def _solve_many(gram, weights, opposition_tol, max_norm, gradient_flags) -> Bargain:
    """K ≥ 3 players: classify the degenerate cases as for two, solve with :mod:`.bargaining_k`."""
    players = len(weights)
    dtype = _compute_dtype(gram)
    g = gram.to(dtype)
    diagonal = [index for index, (i, j) in enumerate(bargaining_k.pairs(players)) if i == j]
    diag = g[..., diagonal]
    if gradient_flags is None:
        finite = torch.isfinite(g).all(-1)
        zero = diag <= 0
    else:
        flags = gradient_flags.to(dtype)
        finite = flags[..., -1] == 0
        zero = flags[..., :-1] == 0
    info = torch.finfo(dtype)
    representable = (diag >= info.tiny) & (diag <= info.max)
    out_of_range = finite & (~zero & ~representable).any(-1)
    alpha, cosines, norm_sq, some_zero, all_zero, opposed = bargaining_k.solve(
        g, weights, opposition_tol=opposition_tol, finite=finite, zero=zero, out_of_range=out_of_range
    )
    status = torch.full_like(finite, BargainStatus.OK, dtype=torch.int32)
    for mask, code in (
        (some_zero, BargainStatus.PLAYER_ZERO),
        (all_zero, BargainStatus.ALL_ZERO),
        (opposed, BargainStatus.OPPOSED),
        (out_of_range, BargainStatus.OUT_OF_RANGE),
        (~finite, BargainStatus.NONFINITE),
    ):
        status = torch.where(mask, int(code), status)
    usable = finite & ~out_of_range
    alpha = torch.where(usable.unsqueeze(-1), alpha, 0.0)
    norm_sq = torch.where(usable, norm_sq, 0.0)
    cos = torch.where(usable & ~zero[..., 0] & ~zero[..., -1], cosines[..., 0, -1], 0.0)
    return _finish(alpha, cos, cosines, g, status, norm_sq, max_norm)


def bargaining_weights(gram: Tensor, power: Sequence[float] | None = None) -> Tensor:
    """Nash bargaining weights ``α`` (``[alpha_f, alpha_r]`` for two players) for K×K Gram matrices.

    ``gram[..., :, :]`` is ``GᵀG`` of the players' gradients (for two, ``[[g_f·g_f, g_f·g_r],
    [g_r·g_f, g_r·g_r]]`` ordered (forget, preserve)); the upper triangle is used.
    ``power`` is the bargaining power, one entry per player (default all 1); the weights
    solve ``(GᵀG) α = w / α``.  Degenerate inputs follow the policy in this module's
    docstring (α = 0 for the players that cannot bargain).  The result has shape ``[..., K]``
    and dtype float64 for float64 input, float32 otherwise.
    """
    if not isinstance(gram, Tensor):
        gram = torch.as_tensor(gram, dtype=torch.float64)
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] < 2:
        raise ValueError(f"gram must have shape [..., K, K] with K >= 2 ([..., 2, 2] for two players), got {tuple(gram.shape)}")
    players = gram.shape[-1]
    power = (1.0,) * players if power is None else power
    rows, cols = zip(*bargaining_k.pairs(players))
    entries = gram[..., list(rows), list(cols)]
    out_dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    return solve_bargain(entries, power).alpha.to(out_dtype)
