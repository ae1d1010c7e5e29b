"""The closed-form bargaining solver against float64 references and the KKT conditions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from munba_kernels import BargainStatus, bargaining_weights, solve_bargain

log_scale = st.floats(min_value=-12.0, max_value=12.0)  # gradient norms 1e-12 .. 1e12
cosine = st.floats(min_value=-1.0 + 1e-4, max_value=1.0)
power = st.floats(min_value=0.05, max_value=20.0)


def gram_matrix(log_nf, log_nr, cos, dtype=torch.float64):
    nf, nr = 10.0**log_nf, 10.0**log_nr
    return torch.tensor([[nf * nf, cos * nf * nr], [cos * nf * nr, nr * nr]], dtype=dtype)


def conditioned_rtol(cos):
    """Recovering cos φ from Gram entries costs a few float64 ulps; the solve divides by
    1 + cos φ, whose condition number 1/(1 + cos φ) amplifies them.  1e-12 when well posed."""
    return 1e-12 + 16 * torch.finfo(torch.float64).eps / (1 + cos)


def kkt_residual(G, alpha, w):
    """Relative residual of (GᵀG)α = w/α, computed in float64."""
    G = G.double()
    alpha = alpha.double()
    lhs = G @ alpha
    rhs = torch.tensor(w, dtype=torch.float64) / alpha
    return ((lhs - rhs).abs() / rhs.abs()).max().item()


def positive_root_reference(cos, w_f, w_r):
    """t = α_f‖g_f‖ / α_r‖g_r‖ from numpy's polynomial solver (independent of the package)."""
    roots = np.roots([w_r, cos * (w_r - w_f), -w_f])
    return float(max(r.real for r in roots))


@settings(max_examples=300, deadline=None)
@given(log_scale, log_scale, cosine)
def test_equal_power_matches_closed_form(log_nf, log_nr, cos):
    G = gram_matrix(log_nf, log_nr, cos)
    alpha = bargaining_weights(G)
    nf, nr = 10.0**log_nf, 10.0**log_nr
    expected = torch.tensor(
        [1 / (nf * math.sqrt(1 + cos)), 1 / (nr * math.sqrt(1 + cos))], dtype=torch.float64
    )
    torch.testing.assert_close(alpha, expected, rtol=conditioned_rtol(cos), atol=0)
    assert (alpha > 0).all()
    assert kkt_residual(G, alpha, (1.0, 1.0)) < 1e-9
    norm_sq = (alpha @ G @ alpha).item()
    assert norm_sq == pytest.approx(2.0, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(log_scale, log_scale, cosine, power, power)
def test_asymmetric_power_solves_kkt(log_nf, log_nr, cos, w_f, w_r):
    G = gram_matrix(log_nf, log_nr, cos)
    alpha = bargaining_weights(G, (w_f, w_r))
    assert (alpha > 0).all()
    assert kkt_residual(G, alpha, (w_f, w_r)) < 1e-8
    # ‖d‖² = w_f + w_r for every non-degenerate Gram matrix
    assert (alpha @ G @ alpha).item() == pytest.approx(w_f + w_r, rel=1e-8)
    nf, nr = 10.0**log_nf, 10.0**log_nr
    t = (alpha[0] * nf / (alpha[1] * nr)).item()
    assert t == pytest.approx(positive_root_reference(cos, w_f, w_r), rel=1e-8)


@settings(max_examples=200, deadline=None)
@given(log_scale, log_scale, cosine, st.floats(min_value=-6, max_value=6), power)
def test_invariant_to_scaling_either_gradient(log_nf, log_nr, cos, log_k, w_f):
    """Scaling g_f by k scales α_f by 1/k and leaves α_r, hence d, unchanged."""
    k = 10.0**log_k
    rtol = conditioned_rtol(cos)
    a = bargaining_weights(gram_matrix(log_nf, log_nr, cos), (w_f, 1.0))
    b = bargaining_weights(gram_matrix(log_nf + log_k, log_nr, cos), (w_f, 1.0))
    torch.testing.assert_close(b * torch.tensor([k, 1.0], dtype=torch.float64), a, rtol=rtol, atol=0)
    c = bargaining_weights(gram_matrix(log_nf, log_nr + log_k, cos), (w_f, 1.0))
    torch.testing.assert_close(c * torch.tensor([1.0, k], dtype=torch.float64), a, rtol=rtol, atol=0)


def test_against_explicit_gradients_in_float64():
    """Build real gradient vectors, form d, and check the bisector property directly."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        gf = torch.randn(37, generator=gen, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-8, 8).item()
        gr = torch.randn(37, generator=gen, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-8, 8).item()
        G = torch.stack([gf, gr]) @ torch.stack([gf, gr]).T
        a_f, a_r = bargaining_weights(G)
        d = a_f * gf + a_r * gr
        assert d.norm().item() == pytest.approx(math.sqrt(2), rel=1e-10)
        # bisector: equal angle to both unit gradients
        assert (d @ gf / gf.norm()).item() == pytest.approx((d @ gr / gr.norm()).item(), rel=1e-9)


def test_float32_input_computes_exactly_and_returns_float32():
    G64 = gram_matrix(3.0, -2.0, 0.3)
    out = bargaining_weights(G64.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), bargaining_weights(G64), rtol=1e-6, atol=0)


def test_batched_gram():
    grams = torch.stack([gram_matrix(a, b, c) for a, b, c in [(0, 0, 0.5), (2, -3, -0.9), (-5, 5, 0.99)]])
    batched = bargaining_weights(grams.reshape(3, 1, 2, 2), (2.0, 1.0))
    assert batched.shape == (3, 1, 2)
    for i in range(3):
        torch.testing.assert_close(batched[i, 0], bargaining_weights(grams[i], (2.0, 1.0)))


def test_parallel_gradients_get_equal_normalised_weights():
    alpha = bargaining_weights(gram_matrix(1.0, -1.0, 1.0))
    assert alpha[0].item() * 10 == pytest.approx(alpha[1].item() / 10, rel=1e-12)
    assert alpha[1].item() == pytest.approx(10 / math.sqrt(2), rel=1e-12)


def entries(ff, fr, rr):
    return torch.tensor([ff, fr, rr], dtype=torch.float64)


@pytest.mark.parametrize(
    "gram, status, alpha",
    [
        (entries(0.0, 0.0, 4.0), BargainStatus.FORGET_ZERO, (0.0, 0.5)),
        (entries(9.0, 0.0, 0.0), BargainStatus.PRESERVE_ZERO, (1 / 3, 0.0)),
        (entries(0.0, 0.0, 0.0), BargainStatus.BOTH_ZERO, (0.0, 0.0)),
        (entries(4.0, -6.0, 9.0), BargainStatus.OPPOSED, (0.0, 0.0)),
        (entries(4.0, -6.0 * (1 - 1e-7), 9.0), BargainStatus.OPPOSED, (0.0, 0.0)),
        (entries(math.nan, 1.0, 1.0), BargainStatus.NONFINITE, (0.0, 0.0)),
        (entries(1.0, math.inf, 1.0), BargainStatus.NONFINITE, (0.0, 0.0)),
        (entries(1.0, 0.0, -math.inf), BargainStatus.NONFINITE, (0.0, 0.0)),
    ],
)
def test_degenerate_policy(gram, status, alpha):
    b = solve_bargain(gram)
    assert b.status.item() == status
    torch.testing.assert_close(b.alpha, torch.tensor(alpha, dtype=torch.float64))
    assert torch.isfinite(b.alpha).all() and torch.isfinite(b.cos) and torch.isfinite(b.direction_norm)


def test_nearly_opposed_is_not_degenerate_and_stays_exact():
    cos = -1 + 1e-5
    b = solve_bargain(entries(4.0, cos * 6.0, 9.0))
    assert b.status.item() == BargainStatus.OK
    expected = torch.tensor([1 / (2 * math.sqrt(1e-5)), 1 / (3 * math.sqrt(1e-5))], dtype=torch.float64)
    torch.testing.assert_close(b.alpha, expected, rtol=1e-9, atol=0)


def test_single_player_with_power_uses_sqrt_power():
    b = solve_bargain(entries(0.0, 0.0, 4.0), (3.0, 2.0))
    torch.testing.assert_close(b.alpha, torch.tensor([0.0, math.sqrt(2.0) / 2], dtype=torch.float64))
    assert b.direction_norm.item() == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 10.0])
def test_clip_scale_uses_exact_direction_norm(max_norm):
    G = gram_matrix(0.5, -1.0, 0.2)
    b = solve_bargain(torch.stack([G[0, 0], G[0, 1], G[1, 1]]), max_norm=max_norm)
    c = b.coefficients
    clipped = math.sqrt((c @ G @ c).item())
    assert clipped == pytest.approx(min(max_norm, math.sqrt(2)), rel=1e-12)


def test_solver_does_not_synchronise_or_leave_the_device():
    g = torch.tensor([[1.0, 0.2, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64, device="meta")
    b = solve_bargain(g)  # meta tensors have no data: any host read would fail
    assert b.alpha.device.type == "meta" and b.alpha.shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gram=torch.ones(3, 2)), r"\[\.\.\., 2, 2\]"),
        (dict(gram=torch.eye(3), power=(1.0, 1.0)), "3 powers"),
        (dict(gram=torch.eye(2), power=(1.0, -1.0)), "positive and finite"),
        (dict(gram=torch.eye(2), power=(1.0,)), "pair"),
        (dict(gram=torch.eye(2), power=(1.0, math.nan)), "positive and finite"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bargaining_weights(**kwargs)


def test_solve_bargain_rejects_bad_shapes_and_settings():
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        solve_bargain(torch.ones(2))
    with pytest.raises(TypeError, match="floating"):
        solve_bargain(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_norm"):
        solve_bargain(torch.ones(3), max_norm=0.0)
    with pytest.raises(ValueError, match="opposition_tol"):
        solve_bargain(torch.ones(3), opposition_tol=-1.0)
