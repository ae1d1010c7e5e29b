"""Scenarios of the "never corrupt a model" guarantees, shared by ``test_optim_integrity.py``
(torch and C++ backends) and ``triton_interpreted/test_triton_integrity.py`` (Triton, run
interpreted on small tensors): each takes the backend name, so every backend meets the
same invariant — a step either raises with nothing changed, or leaves every parameter
finite and consistent with its status.  ``device`` puts the parameters (and so the gradients)
on a device, e.g. CUDA for the Triton backend compiled; the random draws are made on the CPU
either way.
"""

import copy
import math

import torch
from hypothesis import strategies as st

from munba_kernels import BargainStatus, MUNBaOptimizer

SGD_KW = dict(base="sgd", momentum=0.9, dampening=0.3)


def make(backend="torch", base="adamw", shapes=((64, 512), (7,)), device="cpu", **kwargs):
    """Two param groups (the second with its own lr) over freshly seeded parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    extra = {k: v for k, v in SGD_KW.items() if k != "base"} if base == "sgd" and "momentum" not in kwargs else {}
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.05}]
    return params, MUNBaOptimizer(groups, lr=0.1, backend=backend, base=base, **{**extra, **kwargs})


def step(params, opt, seed, forget_poison=None):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
    if forget_poison is not None:
        params[-1].grad.view(-1)[0] = forget_poison
    opt.capture_forget()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
    opt.step()
    opt.zero_grad()


def snapshot(params, opt):
    """Parameters and every state tensor (step counts included), deep-copied."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    return (
        [p.detach().clone() for p in params],
        state,
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


def assert_unchanged(params, opt, snap):
    before, state, groups = snap
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for i, p in enumerate(params):
        assert set(opt.state[p]) == set(state[i])
        for k, v in state[i].items():
            now = opt.state[p][k]
            if v.device.type == "meta":  # data-less: what can be compared is the metadata
                assert (now.device, now.shape, now.dtype) == (v.device, v.shape, v.dtype), k
            else:
                assert torch.equal(now, v), k
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def probe(gf, gr, dtype=torch.float32, backend="torch", device="cpu", **kwargs):
    """One SGD step with lr 1 from zero: returns (d, status) with d = p_before − p_after in
    float64, on the CPU."""
    p = torch.nn.Parameter(torch.zeros(gf.shape, dtype=dtype, device=device))
    opt = MUNBaOptimizer([p], lr=1.0, base="sgd", backend=backend, **kwargs)
    p.grad = gf.to(dtype).to(device)
    opt.capture_forget()
    p.grad = gr.to(dtype).to(device)
    opt.step()
    return -p.detach().double().cpu(), BargainStatus(opt.last_bargain.status.item())


def pair(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(
        n, generator=gen, dtype=torch.float64
    )


FINITE = {
    torch.float32: (-148, 126),
    torch.bfloat16: (-132, 126),
    torch.float16: (-23, 14),
    torch.float64: (-1073, 1022),
}


def unit(g: torch.Tensor) -> torch.Tensor:
    """g/‖g‖ in float64, scaled by a power of two first so that no square under- or overflows."""
    g = g.double()
    _, exponent = torch.frexp(g.abs().max())
    g = torch.ldexp(g, -exponent)
    return g / g.norm()


def direction_case(backend, dtype, exp_f, exp_r, seed, n=17, ranges=None, device="cpu"):
    """Gradients at 2**e scales spanning ``dtype``'s finite range (subnormals included): the
    step is finite, and exact against float64 math on the unit gradients, or skipped as
    OUT_OF_RANGE where a float64 Gram cannot hold the squares."""
    lo, hi = (ranges or FINITE)[dtype]
    gen = torch.Generator().manual_seed(seed)
    base_f, base_r = (torch.randn(n, generator=gen, dtype=torch.float64).clamp(-2, 2) for _ in range(2))

    def scaled(base, u):
        e = round(lo + u * (hi - 2 - lo))  # |base| ≤ 2: the largest element stays finite
        return torch.ldexp(base, torch.tensor(e)).to(dtype)

    gf, gr = scaled(base_f, exp_f), scaled(base_r, exp_r)
    d, status = probe(gf, gr, dtype=dtype, backend=backend, device=device)
    assert torch.isfinite(d).all()
    squares = [g.double().square().sum().item() for g in (gf, gr)]
    if dtype == torch.float64 and not all(2.2250738585072014e-308 <= s < math.inf for s in squares):
        assert status == BargainStatus.OUT_OF_RANGE and torch.equal(d, torch.zeros_like(d))
        return
    if not (gf.any() and gr.any()):
        assert status in (BargainStatus.FORGET_ZERO, BargainStatus.PRESERVE_ZERO, BargainStatus.BOTH_ZERO)
        return
    uf, ur = unit(gf), unit(gr)
    cos = float(uf @ ur)
    if 1 + cos < 1e-3:  # near-opposed: conditioning, not range, is the question (tested elsewhere)
        return
    assert status == BargainStatus.OK
    expected = (uf + ur) / math.sqrt(1 + cos)
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-15
    tol = 8 * eps / math.sqrt(1 + cos)
    torch.testing.assert_close(d, expected, rtol=tol, atol=tol)


def corrupt_state(opt, params, kind, draw):
    p = params[draw(st.integers(0, len(params) - 1))]
    state = opt.state[p]
    key = draw(st.sampled_from(sorted(state)))
    t = state[key]
    if kind == "shape":
        state[key] = torch.zeros(draw(st.integers(1, 5)), draw(st.integers(1, 5)), dtype=t.dtype)
    elif kind == "dtype":
        state[key] = t.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif kind == "drop":
        del state[key]
    elif kind == "device":
        state[key] = torch.empty_like(t, device="meta")
    elif kind == "nan":
        state[key] = torch.full_like(t, math.nan)


def corruption_case(backend, draw, device="cpu"):
    """A random corruption of a state dict, a live state, a group setting or a gradient."""
    base = draw(st.sampled_from(["adamw", "sgd"]))
    params, opt = make(backend, base, shapes=((6, 5), (3,), (4, 2)), device=device)
    step(params, opt, seed=1)
    route = draw(st.sampled_from(["state_dict", "state", "group", "gradient"]))
    kind = None
    if route == "state_dict":
        sd = copy.deepcopy(opt.state_dict())
        index = draw(st.integers(0, 2))
        key = draw(st.sampled_from(sorted(sd["state"][index])))
        kind = draw(st.sampled_from(["shape", "dtype", "drop", "nan", "negative"]))
        t = sd["state"][index][key]
        sd["state"][index][key] = {
            "shape": torch.zeros(2, 2),
            "dtype": t.to(torch.int64),
            "nan": torch.full_like(t, math.nan),
            "negative": -t.abs() - 1,
            "drop": None,
        }[kind]
        if kind == "drop":
            del sd["state"][index][key]
        snap = snapshot(params, opt)
        try:
            opt.load_state_dict(sd)
        except (ValueError, TypeError):
            assert_unchanged(params, opt, snap)
            return
        # accepted: only what is sound (a negative first moment, say) may load
    elif route == "state":
        kind = draw(st.sampled_from(["shape", "dtype", "drop", "device"]))
        corrupt_state(opt, params, kind, draw)
    elif route == "group":
        group = opt.param_groups[draw(st.integers(0, 1))]
        key, value = draw(
            st.sampled_from(
                [
                    ("lr", -1.0),
                    ("lr", math.nan),
                    ("betas", (0.9,)),
                    ("base", "adam"),
                    ("eps", math.inf),
                    ("weight_decay", -0.5),
                    ("momentum", -1.0),
                    ("dampening", 2.0),
                    ("maximize", None),
                ]
            )
        )
        group[key] = value
    snap = snapshot(params, opt)
    poison = None
    if route == "gradient":
        poison = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 1e-40, 0.0]))
    try:
        step(params, opt, seed=2, forget_poison=poison)
    except (ValueError, TypeError, RuntimeError):
        assert route in ("state", "group", "state_dict")
        assert_unchanged(params, opt, snap)
        return
    status = BargainStatus(opt.last_bargain.status.item())
    assert all(torch.isfinite(p).all() for p in params)
    if status in (BargainStatus.NONFINITE, BargainStatus.OUT_OF_RANGE):
        assert_unchanged(params, opt, snap)
    if poison is not None and not math.isfinite(poison):
        assert status == BargainStatus.NONFINITE
