"""MUNBaOptimizer against "α in float64, form d, feed d to torch.optim.AdamW / SGD"."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from munba_kernels import MUNBaOptimizer

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (6, 6)]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def gradient_stream(steps, dtype, seed=1):
    """Per step: forget and preserve gradients per parameter (None = no gradient).

    Parameter 3 only ever gets a forget gradient, parameter 4 only a preserve gradient,
    so "a missing gradient counts as zero" is exercised on both sides.
    """
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        scale_f, scale_r = 10 ** (4 * torch.rand(2, generator=gen) - 2)
        gf = [torch.randn(s, generator=gen).mul(scale_f).to(dtype) for s in SHAPES]
        gr = [torch.randn(s, generator=gen).mul(scale_r).to(dtype) for s in SHAPES]
        gr[3] = None
        gf[4] = None
        stream.append((gf, gr))
    return stream


def float64_direction(gf, gr, power=(1.0, 1.0), max_norm=None):
    """The oracle: Gram in float64, α from numpy's root finder, d formed (and kept) in fp32 (fp64 for fp64)."""
    f = torch.cat([(g if g is not None else torch.zeros(s)).double().flatten() for g, s in zip(gf, SHAPES)])
    r = torch.cat([(g if g is not None else torch.zeros(s)).double().flatten() for g, s in zip(gr, SHAPES)])
    nf, nr, fr = f.norm().item(), r.norm().item(), (f @ r).item()
    cos = fr / (nf * nr)
    w_f, w_r = power
    t = max(np.roots([w_r, cos * (w_r - w_f), -w_f]).real)
    b = math.sqrt(w_r / (1 + cos * t))
    alpha = torch.tensor([t * b / nf, b / nr], dtype=torch.float64)
    if max_norm is not None:
        norm = math.sqrt(w_f + w_r)
        alpha = alpha * min(1.0, max_norm / norm)
    directions = []
    for a, c in zip(gf, gr):
        ref = a if a is not None else c
        opm = torch.float64 if ref.dtype == torch.float64 else torch.float32
        d = torch.zeros(ref.shape, dtype=opm)
        if a is not None:
            d = a.to(opm) * alpha[0].to(opm)
        if c is not None:
            d = d + c.to(opm) * alpha[1].to(opm)
        directions.append(d)  # in the compute dtype: the fused step never rounds d to the gradient dtype
    return directions


def param_groups(params, lrs=(1e-2, 3e-3), wds=(1e-2, 0.0), **extra):
    return [
        dict(params=params[:3], lr=lrs[0], weight_decay=wds[0], **extra),
        dict(params=params[3:], lr=lrs[1], weight_decay=wds[1], **extra),
    ]


# (MUNBa keyword arguments, the torch optimizer fed the float64 direction)
CONFIGS = {
    "adamw-fused": (
        dict(base="adamw", betas=(0.8, 0.95), eps=1e-7),
        lambda gs: torch.optim.AdamW(gs, betas=(0.8, 0.95), eps=1e-7, fused=True),
    ),
    "adamw-foreach": (
        dict(base="adamw", betas=(0.8, 0.95), eps=1e-7),
        lambda gs: torch.optim.AdamW(gs, betas=(0.8, 0.95), eps=1e-7, foreach=True),
    ),
    "adamw-clip-maximize": (
        dict(base="adamw", max_grad_norm=0.5, maximize=True),
        lambda gs: torch.optim.AdamW(gs, maximize=True, fused=True),
    ),
    "sgd-nesterov": (
        dict(base="sgd", momentum=0.9, nesterov=True),
        lambda gs: torch.optim.SGD(gs, momentum=0.9, nesterov=True, fused=True),
    ),
    "sgd-dampening-clip": (
        dict(base="sgd", momentum=0.9, dampening=0.1, max_grad_norm=1.0),
        lambda gs: torch.optim.SGD(gs, momentum=0.9, dampening=0.1, fused=True),
    ),
    "sgd-plain-foreach": (dict(base="sgd"), lambda gs: torch.optim.SGD(gs, foreach=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("power", [(1.0, 1.0), (2.0, 0.5)])
def test_matches_float64_alpha_fed_to_torch(dtype, config, power):
    """25 steps, two groups with their own lr/decay, gradients spanning 1e-2..1e2 in scale.

    bf16: torch's rule runs on fp32 shadows of the parameters and states, fed d in fp32, and
    each is rounded to bf16 after every step: fp32 math, one rounding on store, as we do."""
    kwargs, make_torch = CONFIGS[config]
    if dtype == torch.bfloat16 and "foreach" in config:
        pytest.skip("one torch rule per dtype is enough: the shadows run in fp32 either way")
    ours = make_params(dtype)
    theirs = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]  # never aliased
    opt = MUNBaOptimizer(param_groups(ours), lr=0.0, bargaining_power=power, backend="torch", **kwargs)
    ref = make_torch(param_groups(theirs))
    for gf, gr in gradient_stream(25, dtype):
        for p, g in zip(ours, gf):
            p.grad = None if g is None else g.clone()
        opt.capture_forget()
        for p, g in zip(ours, gr):
            p.grad = None if g is None else g.clone()
        opt.step()
        for p, d in zip(theirs, float64_direction(gf, gr, power, kwargs.get("max_grad_norm"))):
            p.grad = d
        ref.step()
        with torch.no_grad():  # the shadows are stored in bf16 too
            for p in theirs:
                for t in [p, *(v for k, v in ref.state[p].items() if k != "step")]:
                    t.copy_(t.to(dtype))
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach().to(dtype), **tol)
        for key, value in ref.state[b].items():
            if key == "step":
                assert opt.state[a]["step"].item() == value.item()
            else:
                torch.testing.assert_close(opt.state[a][key], value.to(dtype), **tol)


def test_missing_gradients_count_as_zero_and_untouched_params_are_skipped():
    params = make_params(torch.float32)
    frozen = torch.nn.Parameter(torch.ones(4))
    before = [p.detach().clone() for p in params]
    opt = MUNBaOptimizer([*params, frozen], lr=0.1, base="sgd")
    params[0].grad = torch.ones_like(params[0])
    opt.capture_forget()
    params[1].grad = torch.ones_like(params[1])
    opt.step()
    n0, n1 = params[0].numel(), params[1].numel()
    # orthogonal gradients (disjoint supports): α_f = 1/‖g_f‖, α_r = 1/‖g_r‖
    torch.testing.assert_close(params[0], before[0] - 0.1 / math.sqrt(n0))
    torch.testing.assert_close(params[1], before[1] - 0.1 / math.sqrt(n1))
    for p, b in zip(params[2:], before[2:]):
        assert torch.equal(p, b)
    assert torch.equal(frozen, torch.ones(4)) and frozen not in opt.state


def test_capture_forget_moves_without_copying_and_keeps_user_grads():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = MUNBaOptimizer([p], lr=0.1)
    g = torch.arange(5.0)
    p.grad = g
    opt.capture_forget()
    assert p.grad is None
    assert opt._step_data["captured"]["forget"][p] is g  # the same tensor, moved not copied
    pg = torch.ones(5)
    p.grad = pg
    opt.step()
    assert p.grad is pg and torch.equal(pg, torch.ones(5))  # gradients are never overwritten
    assert torch.equal(g, torch.arange(5.0))


def test_closure_runs_both_backward_passes():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    x = torch.randn(16, 4)
    opt = MUNBaOptimizer(model.parameters(), lr=0.05, base="sgd", momentum=0.5)
    opt_twin = MUNBaOptimizer(twin.parameters(), lr=0.05, base="sgd", momentum=0.5)
    for _ in range(3):
        shared = model(x)  # both losses share one forward graph
        losses = opt.step(lambda shared=shared: (shared.pow(2).mean(), (shared - 1).abs().mean()))
        assert len(losses) == 2 and not losses[0].requires_grad
        opt_twin.zero_grad()
        out = twin(x)
        out.pow(2).mean().backward()
        opt_twin.capture_forget()
        (twin(x) - 1).abs().mean().backward()
        opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def run_steps(opt, params, stream):
    for gf, gr in stream:
        for p, g in zip(params, gf):
            p.grad = None if g is None else g.clone()
        opt.capture_forget()
        for p, g in zip(params, gr):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize(
    "kwargs", [dict(base="adamw"), dict(base="sgd", momentum=0.9, dampening=0.2, max_grad_norm=1.0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_exact(kwargs, dtype):
    stream = gradient_stream(12, dtype)
    straight = make_params(dtype)
    opt = MUNBaOptimizer(param_groups(straight), lr=1e-2, **kwargs)
    run_steps(opt, straight, stream)

    first = make_params(dtype)
    opt1 = MUNBaOptimizer(param_groups(first), lr=1e-2, **kwargs)
    run_steps(opt1, first, stream[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = MUNBaOptimizer(param_groups(resumed), lr=123.0, **kwargs)  # lr comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    run_steps(opt2, resumed, stream[5:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key
    assert opt2.state[resumed[0]]["step"].device == resumed[0].device if kwargs["base"] == "adamw" else True


def test_param_groups_hooks_schedulers_and_zero_grad_behave_as_in_torch():
    params = make_params(torch.float32)
    opt = MUNBaOptimizer([params[0]], lr=0.1, base="sgd")
    opt.add_param_group({"params": params[1:3], "lr": 0.01, "momentum": 0.9})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["weight_decay"] == 0.0
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    opt.capture_forget()
    for p in params[:3]:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    sched.step()
    assert calls == ["pre", "post"]
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.005]
    assert "momentum_buffer" in opt.state[params[1]] and "momentum_buffer" not in opt.state[params[0]]
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_paper_faithful_preset():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = MUNBaOptimizer.paper_faithful([p])
    g = opt.param_groups[0]
    assert (g["base"], g["lr"], g["momentum"], g["weight_decay"]) == ("sgd", 0.01, 0.9, 5e-4)
    assert opt.max_grad_norm == 1.0
    p.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.capture_forget()
    p.grad = torch.tensor([0.0, 3.0, 0.0])
    opt.step()
    # unit-norm bisector of two orthogonal unit vectors, times lr
    torch.testing.assert_close(p.detach(), -0.01 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_step_never_reads_a_device_value_on_the_host():
    """On the meta device tensors have no data, so any .item()/bool() in step() would raise."""
    params = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in SHAPES]
    opt = MUNBaOptimizer(params, lr=0.1, max_grad_norm=1.0, bargaining_power=(2.0, 1.0))
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.capture_forget()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt.last_bargain.alpha.device.type == "meta"
    assert opt.state[params[0]]["exp_avg"].device.type == "meta"
