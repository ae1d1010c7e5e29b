"""Degenerate gradients and bad input: no NaN reaches a parameter, every error names its cause.

SGD with lr=1, no momentum and no decay makes the applied direction visible: d = p_before − p_after.
"""

import math
import os

import pytest
import torch

from munba_kernels import BargainStatus, MUNBaOptimizer


def probe(gf, gr, **kwargs):
    """Apply one step with the given flat gradients; return (d, optimizer)."""
    p = torch.nn.Parameter(torch.zeros_like(gr if gr is not None else gf))
    opt = MUNBaOptimizer([p], lr=1.0, base="sgd", **kwargs)
    p.grad = gf
    opt.capture_forget()
    p.grad = gr
    opt.step()
    return -p.detach(), opt


def random_pair(n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.randn(n, generator=gen)


def status(opt):
    return BargainStatus(opt.last_bargain.status.item())


def test_zero_forget_gradient_lets_the_preserve_player_move_alone():
    _, gr = random_pair()
    d, opt = probe(torch.zeros_like(gr), gr)
    assert status(opt) == BargainStatus.FORGET_ZERO
    torch.testing.assert_close(d, gr / gr.norm())


def test_zero_preserve_gradient_lets_the_forget_player_move_alone():
    gf, _ = random_pair()
    d, opt = probe(gf, None, bargaining_power=(4.0, 1.0))
    assert status(opt) == BargainStatus.PRESERVE_ZERO
    torch.testing.assert_close(d, 2.0 * gf / gf.norm())


def test_both_zero_gives_zero_direction_and_adamw_still_decays_like_torch():
    d, opt = probe(torch.zeros(10), torch.zeros(10))
    assert status(opt) == BargainStatus.BOTH_ZERO and torch.equal(d, torch.zeros(10))
    p = torch.nn.Parameter(torch.ones(4))
    twin = torch.nn.Parameter(torch.ones(4))
    opt = MUNBaOptimizer([p], lr=0.1, weight_decay=0.5)
    ref = torch.optim.AdamW([twin], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(4)
    opt.capture_forget()
    p.grad = torch.zeros(4)
    opt.step()
    twin.grad = torch.zeros(4)
    ref.step()
    torch.testing.assert_close(p, twin)


def test_exactly_opposed_gradients_stay_put():
    gf, _ = random_pair()
    d, opt = probe(gf, -3.0 * gf)
    assert status(opt) == BargainStatus.OPPOSED
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("one_plus_cos", [1e-2, 1e-4, 1e-5])
def test_nearly_opposed_gradients_follow_the_exact_bisector(one_plus_cos):
    gf, noise = random_pair()
    gf = gf / gf.norm()
    noise = noise - (noise @ gf) * gf
    noise = noise / noise.norm()
    # unit g_r at angle φ from g_f with 1 + cos φ = one_plus_cos
    cos = -1 + one_plus_cos
    gr = cos * gf + math.sqrt(1 - cos * cos) * noise
    d, opt = probe(gf, 5.0 * gr)
    assert status(opt) == BargainStatus.OK
    assert torch.isfinite(d).all()
    # ‖d‖ = √2 and equal normalised utilities; tolerance = fp32 rounding / sqrt(1 + cos)
    tol = 1e-6 / math.sqrt(one_plus_cos)
    assert d.norm().item() == pytest.approx(math.sqrt(2), rel=tol)
    assert (d @ gf).item() == pytest.approx((d @ gr).item(), rel=tol, abs=tol)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("which", ["forget", "preserve", "both"])
def test_tiny_and_huge_gradients_give_the_same_direction(scale, which):
    gf, gr = random_pair()
    d_ref, _ = probe(gf.clone(), gr.clone())
    sf = scale if which in ("forget", "both") else 1.0
    sr = scale if which in ("preserve", "both") else 1.0
    d, opt = probe(gf * sf, gr * sr)
    assert status(opt) == BargainStatus.OK
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-7)


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
    }


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["forget", "preserve"])
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_nonfinite_gradients_skip_the_whole_step(bad, where, base):
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 3))]
    opt = MUNBaOptimizer(params, lr=0.1, base=base, momentum=0.9 if base == "sgd" else 0.0)

    def step(poison):
        for p in params:
            p.grad = torch.randn_like(p)
        if poison and where == "forget":
            params[1].grad[1, 2] = bad
        opt.capture_forget()
        for p in params:
            p.grad = torch.randn_like(p)
        if poison and where == "preserve":
            params[0].grad[4] = bad
        opt.step()

    step(poison=False)
    before, state = snapshot(opt, params)
    step(poison=True)
    assert status(opt) == BargainStatus.NONFINITE and bool(opt.last_bargain.skipped)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    step(poison=False)  # training continues normally afterwards
    assert status(opt) == BargainStatus.OK
    assert all(torch.isfinite(p).all() for p in params)
    if base == "adamw":
        assert opt.state[params[0]]["step"].item() == 2.0


def test_nonfinite_raise_mode_raises_and_updates_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p], lr=0.1, nonfinite="raise")
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    opt.capture_forget()
    p.grad = torch.ones(3)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]


# ----------------------------------------------------------------- bad input
def test_step_without_capture_forget_is_a_clear_error():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="capture_forget"):
        opt.step()


def test_capture_twice_and_closure_after_capture_are_errors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p])
    opt.capture_forget()
    with pytest.raises(RuntimeError, match="already called"):
        opt.capture_forget()
    with pytest.raises(RuntimeError, match="one style or the other"):
        opt.step(lambda: (p.sum(), p.sum()))
    opt.discard_forget()
    opt.capture_forget()  # allowed again


def test_closure_must_return_two_losses():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p])
    with pytest.raises(TypeError, match=r"\(forget_loss, preserve_loss\)"):
        opt.step(lambda: p.sum())


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MUNBaOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.capture_forget()


def test_complex_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="mixed devices"):
        MUNBaOptimizer(
            [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
        )
    opt = MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(base="adam"), "base"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(momentum=0.9), "base='sgd' only"),
        (dict(base="sgd", nesterov=True), "nesterov"),
        (dict(base="sgd", dampening=2.0), "dampening"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(bargaining_power=(0.0, 1.0)), "bargaining_power"),
        (dict(opposition_tol=-1.0), "opposition_tol"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_unavailable_backend_fails_clearly_at_construction():
    """As torch's fused=True: a forced backend that cannot run on the parameters' device fails
    when the optimizer is built, not at the first step of a long job."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton can run here")
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        MUNBaOptimizer([p], backend="triton")
