"""fp32 optimizer states for bf16/fp16 parameters (``state_dtype=torch.float32``).

The reference backend is the oracle: it is checked here against a float64 computation of
torch.optim.AdamW/SGD's formulas, then the C++ backend is checked against it (the Triton
backend in ``tests/triton_interpreted/``), and the optimizer's state handling (allocation,
buckets, ``load_state_dict``) end to end.
"""

import copy

import pytest
import torch
from buckets import bucket as two_players
from buckets import clone_bucket, coefficients_for, per_param_states, sgd_state

from munba_kernels import MUNBaOptimizer
from munba_kernels.backends import cpp, reference
from munba_kernels.backends.base import AdamWHyper, SGDHyper

requires_cpp = pytest.mark.skipif(not cpp.is_available(), reason=cpp.unavailable_reason() or "built")

LOW = [torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (13, 17), (0,), (40_001,)]
COEFFICIENTS = [0.3, -1.7]
ADAMW = AdamWHyper(1e-2, 0.8, 0.95, 1e-6, 1e-2, False)
SGD = SGDHyper(1e-2, 0.9, 0.1, False, 5e-4, False)


def ulp(dtype):
    return torch.finfo(dtype).eps


def make_bucket(dtype, base, seed, first_step=False):
    """bf16/fp16 params and gradients, fp32 states with values no bf16 can hold."""
    gen = torch.Generator().manual_seed(seed)

    def rand(s, scale=1.0, to=dtype):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(to)

    params, forget, preserve, states = [], [], [], []
    for i, s in enumerate(SHAPES):
        params.append(rand(s))
        forget.append(None if i == 1 else rand(s))
        preserve.append(rand(s, 3.0))
        if base == "adamw":
            states.append(
                {
                    "step": torch.tensor(float(i % 3)),
                    "exp_avg": rand(s, 0.1, torch.float32) if i % 3 else torch.zeros(s),
                    "exp_avg_sq": rand(s, 0.1, torch.float32).abs() if i % 3 else torch.zeros(s),
                }
            )
        else:
            states.append(sgd_state(torch.zeros(s) if first_step else rand(s, 0.5, torch.float32), first_step))
    return two_players(params, forget, preserve, states, first_step)


def run(backend, base, bucket, skip=0.0):
    c = coefficients_for(COEFFICIENTS, bucket.dtype)
    getattr(backend, base)(bucket, c, torch.tensor(skip), ADAMW if base == "adamw" else SGD)


def float64_step(base, bucket):
    """torch.optim's rule in float64 on d as the backends form it (in fp32, never rounded to
    the gradient dtype); returns the new (params, states) in float64."""
    c = torch.tensor(COEFFICIENTS, dtype=torch.float32)
    params, states = [], []
    for p, gf, gr, st in zip(bucket.params, bucket.forget, bucket.preserve, per_param_states(bucket)):
        d = c[1] * gr.float()
        if gf is not None:
            d = c[0] * gf.float() + d
        d = d.double()  # the contract: d stays in fp32, never rounded to the gradient dtype
        p = p.double()
        if base == "adamw":
            hp, step = ADAMW, st["step"].item() + 1
            m = st["exp_avg"].double() + (1 - hp.beta1) * (d - st["exp_avg"].double())
            v = hp.beta2 * st["exp_avg_sq"].double() + (1 - hp.beta2) * d * d
            denom = v.sqrt() / (1 - hp.beta2**step) ** 0.5 + hp.eps
            p = p * (1 - hp.lr * hp.weight_decay) - hp.lr / (1 - hp.beta1**step) * m / denom
            states.append({"step": torch.tensor(step), "exp_avg": m, "exp_avg_sq": v})
        else:
            hp = SGD
            d = d + hp.weight_decay * p
            buf = st["momentum_buffer"].double()
            buf = d if bucket.first_step else hp.momentum * buf + (1 - hp.dampening) * d
            p = p - hp.lr * buf
            states.append({"momentum_buffer": buf, "step": st["step"] + 1})
        params.append(p)
    return params, states


def assert_bucket_close(got, want_params, want_states, dtype, param_ulps, state_rtol):
    """Params within ``param_ulps`` of their dtype, fp32 states within ``state_rtol``."""
    for a, b in zip(got.params, want_params):
        assert a.dtype == dtype
        torch.testing.assert_close(
            a.double(), b.double(), rtol=param_ulps * ulp(dtype), atol=param_ulps * ulp(dtype)
        )
    for sa, sb in zip(per_param_states(got), want_states):
        for key, value in sb.items():
            if key == "step":
                assert sa[key].item() == value.item()
            else:
                assert sa[key].dtype == torch.float32
                torch.testing.assert_close(sa[key].double(), value.double(), rtol=state_rtol, atol=state_rtol)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("base,first_step", [("adamw", False), ("sgd", True), ("sgd", False)])
def test_reference_matches_float64_formulas(dtype, base, first_step):
    """One step of the oracle against float64: states to fp32 accuracy (a bf16 state would
    be off by ~2**-9), params within one rounding of their dtype."""
    bucket = make_bucket(dtype, base, seed=1, first_step=first_step)
    want_params, want_states = float64_step(base, bucket)
    run(reference, base, bucket)
    assert_bucket_close(bucket, want_params, want_states, dtype, param_ulps=1, state_rtol=1e-6)


@requires_cpp
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("base,first_step", [("adamw", False), ("sgd", True), ("sgd", False)])
def test_cpp_matches_reference_with_fp32_states(dtype, base, first_step):
    """Three calls (first step, then later ones).  Both backends round d to the gradient
    dtype (the contract in backends/base.py) and keep fp32 states, so a state may differ by a
    few fp32 ulps (operation order), a parameter by one rounding flip of its dtype."""
    ours = make_bucket(dtype, base, seed=2, first_step=first_step)
    theirs = clone_bucket(ours)
    for k in range(3):
        ours.first_step = theirs.first_step = first_step and k == 0
        run(cpp, base, ours)
        run(reference, base, theirs)
    assert_bucket_close(ours, theirs.params, per_param_states(theirs), dtype, param_ulps=1, state_rtol=1e-5)


@requires_cpp
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_cpp_skip_writes_nothing_with_fp32_states(base):
    bucket = make_bucket(torch.bfloat16, base, seed=3)
    before = clone_bucket(bucket)
    run(cpp, base, bucket, skip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(bucket.params, before.params))
    for sa, sb in zip(per_param_states(bucket), per_param_states(before)):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


@requires_cpp
def test_cpp_rejects_states_of_another_dtype():
    bucket = make_bucket(torch.bfloat16, "sgd", seed=4)
    bucket.states["momentum_buffer"][0] = bucket.states["momentum_buffer"][0].half()
    with pytest.raises(RuntimeError, match="state"):
        run(cpp, "sgd", bucket)


# ------------------------------------------------------------------------ the optimizer


def test_state_dtype_is_validated():
    with pytest.raises(ValueError, match="state_dtype"):
        MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2))], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2))], state_dtype="float32")


def two_step(opt, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.capture_forget()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_states_are_allocated_in_the_state_dtype_and_bucketed_by_it(base):
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    params = [torch.nn.Parameter(torch.randn(5).to(dt)) for dt in dtypes]
    extra = dict(momentum=0.9) if base == "sgd" else {}
    opt = MUNBaOptimizer(params, base=base, state_dtype=torch.float32, backend="torch", **extra)
    two_step(opt, params, seed=5)
    key = "exp_avg" if base == "adamw" else "momentum_buffer"
    want = [torch.float32, torch.float32, torch.float32, torch.float64]
    assert [opt.state[p][key].dtype for p in params] == want
    buckets = opt._buckets(opt.param_groups[0], [(p, (None, p)) for p in params])
    assert [(b.dtype, b.state_dtype) for b in buckets] == list(zip(dtypes, want))
    default = MUNBaOptimizer(params[:1], base=base, backend="torch", **extra)
    two_step(default, params[:1], seed=6)
    assert default.state[params[0]][key].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_load_state_dict_keeps_fp32_states_bit_exact(backend):
    params = [torch.nn.Parameter(torch.randn(3, 4).bfloat16()), torch.nn.Parameter(torch.randn(6).half())]
    opt = MUNBaOptimizer(params, state_dtype=torch.float32, backend=backend)
    for k in range(3):
        two_step(opt, params, seed=10 + k)
    saved = copy.deepcopy(opt.state_dict())  # as torch.save/load: no aliasing with opt
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MUNBaOptimizer(clones, state_dtype=torch.float32, backend=backend)
    resumed.load_state_dict(saved)
    for p, q in zip(params, clones):
        for key, value in opt.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype
            assert torch.equal(resumed.state[q][key], value)
    two_step(opt, params, seed=20)
    two_step(resumed, clones, seed=20)
    assert all(torch.equal(p, q) for p, q in zip(params, clones))


def test_load_state_dict_restores_the_saved_state_dtype_and_casts_settingless_states():
    """A MUNBa state dict carries its state_dtype, which a resumed run keeps (as torch keeps a
    saved lr); a state dict without settings (torch's, or older) takes this optimizer's."""
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = MUNBaOptimizer([p], backend="torch")
    two_step(opt, [p], seed=30)
    q = torch.nn.Parameter(p.detach().clone())
    wide = MUNBaOptimizer([q], state_dtype=torch.float32, backend="torch")
    wide.load_state_dict(opt.state_dict())
    assert wide.state_dtype is None and wide.state[q]["exp_avg"].dtype == torch.bfloat16
    settingless = opt.state_dict()
    for group in settingless["param_groups"]:
        del group["munba"]
    wide = MUNBaOptimizer([q], state_dtype=torch.float32, backend="torch")
    wide.load_state_dict(settingless)
    assert wide.state_dtype == torch.float32 and wide.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(wide.state[q]["exp_avg"], opt.state[p]["exp_avg"].float())  # exact widening


def test_fp32_states_track_an_fp32_run_more_closely_than_bf16_states():
    """Many small-lr AdamW steps on bf16 parameters.  In bf16, v's per-step increment
    (1 - β2)·d² is below half an ulp of v once v holds a few dozen of them, so v stalls;
    fp32 states follow the fp32 run's v, and so its update size, closely."""
    gen = torch.Generator().manual_seed(40)
    start = torch.randn(4096, generator=gen)
    # bf16-representable gradients: every run sees the same ones, so only storage differs.
    grads = [
        (
            torch.randn(4096, generator=gen).bfloat16().float(),
            torch.randn(4096, generator=gen).bfloat16().float(),
        )
        for _ in range(300)
    ]
    runs = {}
    for name, dtype, state_dtype in [
        ("fp32", torch.float32, None),
        ("bf16-states", torch.bfloat16, None),
        ("fp32-states", torch.bfloat16, torch.float32),
    ]:
        p = torch.nn.Parameter(start.to(dtype))
        opt = MUNBaOptimizer([p], lr=1e-4, weight_decay=0.0, state_dtype=state_dtype)
        for gf, gr in grads:
            p.grad = gf.to(dtype)
            opt.capture_forget()
            p.grad = gr.to(dtype)
            opt.step()
        runs[name] = opt.state[p]["exp_avg_sq"].double()

    def error(name):
        return ((runs[name] - runs["fp32"]).norm() / runs["fp32"].norm()).item()

    # Seen: bf16 states 1.6e-2, fp32 states 0 (weight_decay=0: v depends on d alone).
    assert error("fp32-states") < 1e-5
    assert error("bf16-states") > 5e-3
