"""K-player bargaining (``bargaining_k``): KKT residuals, a float64 scipy reference, the
closed form at K = 2, and every degenerate case."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from munba_kernels import BargainStatus, bargaining_weights, solve_bargain
from munba_kernels import bargaining_k as bk


def packed(m: torch.Tensor) -> torch.Tensor:
    k = m.shape[-1]
    rows, cols = zip(*bk.pairs(k))
    return m[..., list(rows), list(cols)]


def gradients(k, n, gen, log_range=12.0):
    """K random gradients with norms spread over 10**±log_range."""
    g = torch.randn(k, n, generator=gen, dtype=torch.float64)
    return g * 10 ** ((torch.rand(k, 1, generator=gen, dtype=torch.float64) * 2 - 1) * log_range)


def scipy_weights(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The independent reference: minimise f in log-space with scipy's BFGS, on the cosine matrix."""
    norms = np.sqrt(np.diag(m))
    c = m / np.outer(norms, norms)

    def f(u):
        b = np.exp(u)
        return 0.5 * b @ c @ b - w @ u

    def grad(u):
        b = np.exp(u)
        return (c @ b) * b - w

    sol = minimize(f, 0.5 * np.log(w), jac=grad, method="BFGS", options=dict(gtol=1e-13, maxiter=20000))
    return np.exp(sol.x) / norms


@settings(max_examples=150, deadline=None)
@given(k=st.integers(3, 8), extra=st.integers(0, 30), seed=st.integers(0, 2**31 - 1), spread=st.floats(0, 1))
def test_kkt_residual_and_scipy_reference_over_twenty_four_orders_of_magnitude(k, extra, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    g = gradients(k, k + extra, gen)
    m = g @ g.T
    w = 10 ** ((torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
    b = solve_bargain(packed(m), tuple(w.tolist()))
    if b.status.item() == BargainStatus.OPPOSED:  # a random draw can be nearly Pareto-stationary
        return
    assert b.status.item() == BargainStatus.OK
    alpha = b.alpha
    residual = ((m @ alpha - w / alpha).abs() / (w / alpha)).max().item()
    assert residual <= 1e-8
    np.testing.assert_allclose(alpha.numpy(), scipy_weights(m.numpy(), w.numpy()), rtol=1e-5)
    assert (alpha @ m @ alpha).item() == pytest.approx(w.sum().item(), rel=1e-8)  # ‖d‖² = Σw
    assert b.direction_norm.item() == pytest.approx(math.sqrt(w.sum().item()), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), w_f=st.floats(0.1, 10), w_r=st.floats(0.1, 10))
def test_the_newton_solver_reproduces_the_two_player_closed_form(seed, w_f, w_r):
    gen = torch.Generator().manual_seed(seed)
    g = gradients(2, 9, gen)
    m = g @ g.T
    closed = solve_bargain(packed(m), (w_f, w_r))
    if closed.status.item() != BargainStatus.OK:
        return
    alpha, *_, opposed = bk.solve(
        closed.gram,
        (w_f, w_r),
        opposition_tol=1e-6,
        finite=torch.tensor(True),
        zero=torch.zeros(2, dtype=torch.bool),
        out_of_range=torch.tensor(False),
    )
    assert not opposed
    torch.testing.assert_close(alpha, closed.alpha, rtol=1e-10, atol=0)


def test_scaling_a_gradient_scales_only_its_weight():
    gen = torch.Generator().manual_seed(1)
    g = gradients(4, 20, gen, log_range=2)
    base = bargaining_weights(g @ g.T, (1.0, 2.0, 0.5, 1.0))
    g[2] *= 1e9
    scaled = bargaining_weights(g @ g.T, (1.0, 2.0, 0.5, 1.0))
    torch.testing.assert_close(scaled * torch.tensor([1, 1, 1e9, 1], dtype=torch.float64), base, rtol=1e-10, atol=0)


def test_a_zero_player_is_dropped_and_the_rest_bargain():
    gen = torch.Generator().manual_seed(2)
    g = gradients(3, 12, gen, log_range=1)
    two = solve_bargain(packed((g[[0, 2]] @ g[[0, 2]].T)), (2.0, 1.0))
    g[1] = 0
    three = solve_bargain(packed(g @ g.T), (2.0, 3.0, 1.0))
    assert three.status.item() == BargainStatus.PLAYER_ZERO
    torch.testing.assert_close(three.alpha[[0, 2]], two.alpha, rtol=1e-10, atol=0)
    assert three.alpha[1].item() == 0.0
    g[2] = 0  # one player left: it moves alone, α = sqrt(w)/‖g‖
    solo = solve_bargain(packed(g @ g.T), (2.0, 3.0, 1.0))
    assert solo.status.item() == BargainStatus.PLAYER_ZERO
    torch.testing.assert_close(solo.alpha, torch.tensor([math.sqrt(2.0) / g[0].norm().item(), 0, 0], dtype=torch.float64))
    g[0] = 0
    none = solve_bargain(packed(g @ g.T), (2.0, 3.0, 1.0))
    assert none.status.item() == BargainStatus.ALL_ZERO and torch.equal(none.alpha, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("k", [3, 5])
def test_pareto_stationary_gradients_are_opposed_and_do_not_move(k):
    """Some non-negative combination of the unit gradients vanishes: no direction helps all."""
    gen = torch.Generator().manual_seed(3)
    g = gradients(k - 1, 30, gen, log_range=3)
    last = -(g / g.norm(dim=1, keepdim=True)).sum(0, keepdim=True) * 7.0
    g = torch.cat([g, last])
    b = solve_bargain(packed(g @ g.T))
    assert b.status.item() == BargainStatus.OPPOSED
    assert torch.equal(b.alpha, torch.zeros(k, dtype=torch.float64)) and b.direction_norm.item() == 0.0


def test_nonfinite_and_out_of_range_grams_skip():
    m = torch.eye(3, dtype=torch.float64)
    m[0, 1] = m[1, 0] = math.nan
    assert solve_bargain(packed(m)).status.item() == BargainStatus.NONFINITE
    tiny = torch.diag(torch.tensor([1.0, 1e-320, 1.0], dtype=torch.float64))  # a subnormal squared norm
    b = solve_bargain(packed(tiny))
    assert b.status.item() == BargainStatus.OUT_OF_RANGE and bool(b.skipped)
    flags = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # all non-zero, all finite
    overflow = torch.diag(torch.tensor([1.0, math.inf, 1.0], dtype=torch.float64))
    assert solve_bargain(packed(overflow), gradient_flags=flags).status.item() == BargainStatus.OUT_OF_RANGE


def test_batched_and_on_meta_without_synchronising():
    gen = torch.Generator().manual_seed(4)
    grams = torch.stack([packed(g @ g.T) for g in (gradients(3, 10, gen) for _ in range(4))])
    batched = solve_bargain(grams.reshape(2, 2, 6), (1.0, 2.0, 3.0))
    for i in range(4):
        torch.testing.assert_close(batched.alpha.reshape(4, 3)[i], solve_bargain(grams[i], (1.0, 2.0, 3.0)).alpha)
    meta = solve_bargain(torch.ones(5, 10, dtype=torch.float64, device="meta"))  # K = 4 on data-less tensors
    assert meta.alpha.shape == (5, 4) and meta.cosines.shape == (5, 4, 4)


def test_bad_shapes_and_powers_are_named():
    with pytest.raises(ValueError, match=r"K\(K\+1\)/2"):
        solve_bargain(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="3 powers"):
        solve_bargain(torch.ones(6, dtype=torch.float64), (1.0, 1.0))
    with pytest.raises(ValueError, match="gradient_flags"):
        solve_bargain(torch.ones(6, dtype=torch.float64), gradient_flags=torch.zeros(3))
