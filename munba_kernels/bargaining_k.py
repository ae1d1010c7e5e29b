"""Nash bargaining among K ≥ 2 players, solved on the device with a fixed-iteration Newton method.

With gradients ``g_i``, powers ``w_i > 0`` and ``M = GᵀG`` (K×K), the bargaining weights
solve ``M α = w ⊘ α`` (α > 0): the stationary point of the strictly convex

    f(α) = ½ αᵀ M α − Σ w_i log α_i.

Two rescalings make this well posed whatever the gradients' scales: ``α_i = β_i/‖g_i‖``
turns ``M`` into the cosine matrix ``C`` (unit diagonal), and dividing ``w`` by its smallest
entry (``β`` scales by the square root) makes every ``w_i ≥ 1``, so that ``f`` is
*self-concordant*.  Damped Newton (step ``1/(1+λ)``, ``λ`` the Newton decrement) then
decreases ``f`` and keeps ``β > 0`` at every step without a line search, and turns into
plain Newton (quadratic convergence) once ``λ < 1/4``.  The iteration count is fixed and
every step is batched tensor math (``linalg.solve_ex`` on K×K systems, no error checks):
no host synchronisation, any batch shape, any device.

Degenerate cases, as for two players (see :mod:`munba_kernels.bargaining`):

* a zero gradient drops its player (``α_i = 0``) and the rest bargain (``PLAYER_ZERO``;
  one player left moves alone, ``α = sqrt(w)/‖g‖``; none left: ``BOTH_ZERO``);
* ``f`` is unbounded below exactly when some non-negative, non-zero combination of the unit
  gradients vanishes (Pareto-stationary: no direction helps every player).  Approaching
  that, ``β`` grows without bound while ``‖d‖² = βᵀCβ`` stays ``Σ w``: so ``Σβ²/Σw ≥
  1/opposition_tol``, or a solve that has not converged, gives ``OPPOSED`` and ``d = 0``.
  For two players with equal power ``Σβ²/Σw = 1/(1 + cos φ)``: the same threshold as the
  closed form's;
* NaN/Inf → ``NONFINITE``, float64 Grams out of range → ``OUT_OF_RANGE`` (both skip).

K = 2 never comes here: :func:`munba_kernels.bargaining.solve_bargain` keeps its exact
closed form (the tests check this solver against it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Newton iterations.  From the start below, well-conditioned problems converge in < 10;
#: the rest absorbs the damped phase of nearly Pareto-stationary ones.
NEWTON_ITERATIONS = 40
#: Relative KKT residual ``max_i |β_i (Cβ)_i / w_i − 1|`` above which a solve counts as
#: not converged (then ``OPPOSED``: such problems sit next to Pareto-stationarity).
CONVERGED = 1e-9


def pairs(players: int) -> list[tuple[int, int]]:
    """The packed order of Gram entries: the upper triangle, row by row ((0,0), (0,1), …)."""
    return [(i, j) for i in range(players) for j in range(i, players)]


def players_of(entries: int) -> int:
    """K from the number of packed entries K(K+1)/2 (ValueError if it is not one)."""
    k = int((math.isqrt(8 * entries + 1) - 1) // 2)
    if k * (k + 1) // 2 != entries or k < 2:
        raise ValueError(f"a packed Gram of {entries} entries is not K(K+1)/2 for any K >= 2")
    return k


def unpack(packed: Tensor, players: int) -> Tensor:
    """``[..., K(K+1)/2]`` → the symmetric ``[..., K, K]`` matrix."""
    rows, cols = zip(*pairs(players))
    full = packed.new_zeros(*packed.shape[:-1], players, players)
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


def solve(
    gram: Tensor,
    power: Sequence[float],
    *,
    opposition_tol: float,
    finite: Tensor,
    zero: Tensor,
    out_of_range: Tensor,
    iterations: int = NEWTON_ITERATIONS,
):
    """Weights for packed Grams ``gram[..., K(K+1)/2]`` (compute dtype) and per-player ``zero``
    masks ``[..., K]``.  Returns ``(alpha [..., K], cosines [..., K, K], status masks)`` with
    masks ``some_zero``, ``all_zero``, ``opposed``; the caller assigns status codes."""
    k = len(power)
    w = torch.tensor(power, dtype=gram.dtype, device=gram.device)
    m = unpack(gram, k)
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    usable = (finite & ~out_of_range).unsqueeze(-1)
    active = usable & ~zero  # [..., K]
    norms = torch.where(active, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    outer = active.unsqueeze(-1) & active.unsqueeze(-2)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    cosines = m / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    cosines = torch.where(outer, cosines.clamp(-1.0, 1.0), eye)  # dropped players: decoupled
    cosines = torch.where(eye.bool(), eye, cosines)

    # w ≥ 1 makes f self-concordant; β scales by sqrt(w_min) back at the end (exact ratio).
    w_active = torch.where(active, w, torch.ones_like(w))
    w_min = torch.where(active, w, torch.full_like(w, math.inf)).amin(-1, keepdim=True)
    w_min = torch.where(torch.isfinite(w_min), w_min, torch.ones_like(w_min))
    ws = w_active / w_min
    beta = _start(cosines, ws)
    for _ in range(iterations):
        beta = _newton_step(cosines, ws, beta)
    grad_ratio = beta * (cosines @ beta.unsqueeze(-1)).squeeze(-1) / ws  # 1 at the solution
    residual = torch.where(active, (grad_ratio - 1).abs(), torch.zeros_like(ws)).amax(-1)
    spread = (torch.where(active, beta, torch.zeros_like(beta)).square().sum(-1)) / torch.where(
        active, ws, torch.zeros_like(ws)
    ).sum(-1).clamp_min(1.0)

    n_active = active.sum(-1)
    bargaining = n_active >= 2
    solo = n_active == 1
    opposed = bargaining & ((spread * opposition_tol >= 1) | ~(residual <= CONVERGED))
    beta = beta * w_min.sqrt()
    alpha_bargain = torch.where(active & (bargaining & ~opposed).unsqueeze(-1), beta / norms, 0.0)
    alpha_solo = torch.where(active & solo.unsqueeze(-1), w.sqrt() / norms, 0.0)
    alpha = alpha_bargain + alpha_solo
    some_zero = usable.squeeze(-1) & zero.any(-1) & (n_active >= 1)
    all_zero = usable.squeeze(-1) & (n_active == 0)
    norm_sq = (torch.where(active, w, torch.zeros_like(w)).sum(-1)) * ((bargaining & ~opposed) | solo)
    return alpha, cosines, norm_sq, some_zero, all_zero, opposed


def _start(c: Tensor, w: Tensor) -> Tensor:
    """β ∝ √w scaled so that ‖d‖² = βᵀCβ = Σw, the value at the solution (exact when C = I)."""
    b = w.sqrt()
    quad = (b.unsqueeze(-2) @ c @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    scale = (w.sum(-1) / quad.clamp_min(1e-12)).sqrt()
    return b * scale.unsqueeze(-1)


def _newton_step(c: Tensor, w: Tensor, beta: Tensor) -> Tensor:
    """One damped Newton step on f(β) = ½βᵀCβ − Σ w log β (w ≥ 1: self-concordant)."""
    grad = (c @ beta.unsqueeze(-1)).squeeze(-1) - w / beta
    hessian = c + torch.diag_embed(w / (beta * beta))
    step, _ = torch.linalg.solve_ex(hessian, -grad.unsqueeze(-1))  # no info check: no sync
    step = step.squeeze(-1)
    decrement = (-(grad * step).sum(-1)).clamp_min(0).sqrt()  # λ, the Newton decrement
    damping = torch.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
    new = beta + damping.unsqueeze(-1) * step
    return torch.where(torch.isfinite(new) & (new > 0), new, beta)  # never leave the domain
