"""Never corrupt a model: checkpoints, finite coefficients, exact skips, stale state, determinism.

Each test here failed on the code before these guarantees were built (see the section
headers for what used to happen); the property tests at the end throw random corruptions
at the optimizer and check the one invariant that matters: a step either raises with
nothing changed, or leaves every parameter finite and consistent with its status.
"""

import copy
import io
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from integrity_cases import (
    FINITE,
    SGD_KW,
    assert_unchanged,
    corruption_case,
    direction_case,
    make,
    pair,
    probe,
    snapshot,
    step,
)

from munba_kernels import BargainStatus, MUNBaOptimizer
from munba_kernels.backends import cpp, reference

BACKENDS = ["torch", "cpp"] if cpp.is_available() else ["torch"]


# ------------------------------------------------------------ 1. mismatched checkpoints
# Before: a (4, 5) exp_avg loaded for a (64, 512) parameter; the next step corrupted the
# heap (torch backend) or raised after earlier groups were updated (C++).
CORRUPTIONS = {
    "shape": lambda sd: sd["state"][0].update(exp_avg=torch.zeros(4, 5)),
    "dtype": lambda sd: sd["state"][0].update(exp_avg=torch.zeros(64, 512, dtype=torch.int32)),
    "missing key": lambda sd: sd["state"][0].pop("exp_avg_sq"),
    "extra key": lambda sd: sd["state"][0].update(max_exp_avg_sq=torch.zeros(64, 512)),
    "nan moment": lambda sd: sd["state"][1]["exp_avg"].fill_(math.nan),
    "negative second moment": lambda sd: sd["state"][1]["exp_avg_sq"].fill_(-1.0),
    "stray parameter": lambda sd: sd["state"].update({7: {"step": torch.tensor(1.0)}}),
    "step shape": lambda sd: sd["state"][1].update(step=torch.zeros(3)),
    "base": lambda sd: sd["param_groups"][0].update(base="adam"),
    "negative lr": lambda sd: sd["param_groups"][1].update(lr=-0.1),
    "nan tensor lr": lambda sd: sd["param_groups"][1].update(lr=torch.tensor(math.nan)),
    "betas length": lambda sd: sd["param_groups"][0].update(betas=(0.9,)),
    "amsgrad": lambda sd: sd["param_groups"][0].update(amsgrad=True),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_state_dict_is_refused_and_changes_nothing(corruption):
    params, opt = make()
    step(params, opt, seed=1)
    sd = copy.deepcopy(opt.state_dict())
    CORRUPTIONS[corruption](sd)
    snap = snapshot(params, opt)
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap)
    step(params, opt, seed=2)  # still a working optimizer
    assert all(torch.isfinite(p).all() for p in params)


def test_a_shape_mismatch_names_the_group_and_parameter():
    params, opt = make()
    step(params, opt, seed=1)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"param group 1: params\[0\].*exp_avg.*\(4, 5\).*\(7,\)"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_copies_the_state_so_steps_never_reach_the_callers_state_dict(backend):
    """Before: torch's load kept tensors it did not need to cast (e.g. ``step``), and the
    in-place kernels then advanced the caller's saved state dict as well."""
    params, opt = make(backend)
    step(params, opt, seed=1)
    saved = opt.state_dict()
    frozen = copy.deepcopy(saved)
    twins, twin_opt = make(backend)
    twin_opt.load_state_dict(saved)
    step(twins, twin_opt, seed=2)
    for index, entry in frozen["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved["state"][index][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("edit", ["shape", "dtype", "missing", "device"])
def test_states_edited_by_hand_are_refused_before_any_group_is_updated(backend, base, edit):
    """Group 0 is fine, group 1's state was edited: nothing at all may change."""
    params, opt = make(backend, base)
    step(params, opt, seed=1)
    key = "exp_avg" if base == "adamw" else "momentum_buffer"
    state = opt.state[params[1]]
    if edit == "shape":
        state[key] = torch.zeros(4, 5)
    elif edit == "dtype":
        state[key] = state[key].double()
    elif edit == "missing":
        del state["step"]
    else:
        state[key] = torch.zeros(7, device="meta")
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param group 1, params\[0\]"):
        step(params, opt, seed=2)
    assert_unchanged(params, opt, snap)


# ------------------------------------------- 4. loaded and copied optimizers are valid
def forget_zero_step(params, opt, gen):
    """A step whose forget gradient is zero: the preserve player moves alone along g/‖g‖."""
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.capture_forget()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    opt.zero_grad()
    return grads


@pytest.mark.parametrize(
    "torch_cls, kwargs, munba_kwargs",
    [
        (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1), dict()),
        (torch.optim.SGD, dict(lr=0.01, momentum=0.9, dampening=0.2), dict(base="sgd")),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_torch_optimizer_state_dict_loads_and_continues_like_torch(
    torch_cls, kwargs, munba_kwargs, backend
):
    gen = torch.Generator().manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(5, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(4, generator=gen)),
    ]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    torch_opt = torch_cls(theirs, **kwargs)
    for _ in range(3):
        for p in theirs:
            p.grad = torch.randn(p.shape, generator=gen)
        torch_opt.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = MUNBaOptimizer(ours, lr=123.0, backend=backend, **munba_kwargs)
    opt.load_state_dict(torch_opt.state_dict())
    group = opt.param_groups[0]
    assert group["lr"] == kwargs["lr"] and not {"foreach", "fused", "amsgrad"} & set(group)
    for _ in range(2):
        grads = forget_zero_step(ours, opt, gen)
        assert opt.last_bargain.status.item() == BargainStatus.FORGET_ZERO
        # torch's optimizer fed the same direction d = g/‖g‖ (coefficient rounded to fp32)
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        c = torch.tensor(1 / norm, dtype=torch.float32)
        for p, g in zip(theirs, grads):
            p.grad = g * c
        torch_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)


def test_torch_adam_with_l2_decay_and_a_mismatched_rule_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    adam = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], weight_decay=0.1)
    with pytest.raises(ValueError, match="L2"):
        MUNBaOptimizer([p]).load_state_dict(adam.state_dict())
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="torch.optim.SGD group"):
        MUNBaOptimizer([p]).load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_their_settings_and_step_like_the_original(how):
    params, opt = make(base="sgd", max_grad_norm=0.5, bargaining_power=(2.0, 1.0), opposition_tol=1e-3)
    step(params, opt, seed=1)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert (twin.max_grad_norm, twin.bargaining_power, twin.opposition_tol) == (0.5, (2.0, 1.0), 1e-3)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for s in (2, 3):
        step(params, opt, seed=s)
        step(twin_params, twin, seed=s)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=torch.tensor(-1.0)), "lr must be a non-negative"),
        (dict(lr=torch.tensor(math.nan)), "lr must be a non-negative"),
        (dict(lr=torch.tensor([0.1, 0.2])), "one element"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(betas=(0.9, 0.99, 0.999)), "betas must be a pair"),
        (dict(maximize="yes"), "maximize must be a bool"),
        (dict(bargaining_power=(1e150, 1e150)), "bargaining_power"),
        (dict(bargaining_power=(1e300, 1.0)), r"\[1e-150, 1e\+150\]"),
    ],
)
def test_bad_settings_are_named_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MUNBaOptimizer([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_groups_edited_by_hand_are_checked_at_step():
    params, opt = make()
    step(params, opt, seed=1)
    opt.param_groups[1]["lr"] = -1.0  # a scheduler gone wrong
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match="param group 1: lr"):
        step(params, opt, seed=2)
    assert_unchanged(params, opt, snap)


def test_a_parameter_given_twice_is_refused():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="appears twice"):
        MUNBaOptimizer([p, q, p])
    opt = MUNBaOptimizer([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1


# ----------------------------------------------- 2. coefficients stay finite everywhere


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_f, scale_r", [(1e-41, 1.0), (1e-42, 1e-44), (1.0, 1e-40), (1e36, 1e-39)])
def test_fp32_gradients_below_the_normal_range_give_the_exact_direction(backend, scale_f, scale_r):
    """Before: ‖g‖ < 3e-39 made α ≈ 1e41 overflow fp32 and every parameter NaN, status OK."""
    gf, gr = pair()
    d_ref, _ = probe(gf, gr, backend=backend)
    tiny_f, tiny_r = (gf * scale_f).float(), (gr * scale_r).float()
    assert tiny_f.abs().max() > 0 and tiny_r.abs().max() > 0
    d, status = probe(tiny_f, tiny_r, backend=backend)
    assert status == BargainStatus.OK and torch.isfinite(d).all()
    # the subnormal inputs carry fewer bits: compare against the direction of what they hold
    d_exact, _ = probe(tiny_f.double() / scale_f, tiny_r.double() / scale_r, dtype=torch.float64)
    torch.testing.assert_close(d, d_exact, rtol=1e-5, atol=1e-6)
    if scale_f >= 1e-41 and scale_r >= 1e-40:  # still ~full precision: the unscaled direction
        torch.testing.assert_close(d, d_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_bargaining_power_is_clipped_to_a_finite_step(backend):
    """Before: (1e150, 1e150) overflowed the coefficients to Inf, parameters NaN, status OK."""
    gf, gr = pair()
    with pytest.raises(ValueError, match="bargaining_power"):
        probe(gf, gr, backend=backend, bargaining_power=(1e150, 1e150))
    d, status = probe(gf, gr, backend=backend, bargaining_power=(1e150, 1e150), max_grad_norm=1.0)
    d_unit, _ = probe(gf, gr, backend=backend, max_grad_norm=1.0)
    assert status == BargainStatus.OK
    torch.testing.assert_close(d, d_unit, rtol=1e-6, atol=1e-7)
    d, status = probe(gf, gr, backend=backend, bargaining_power=(1e-150, 1e-150), max_grad_norm=1.0)
    assert status == BargainStatus.OK and d.abs().max().item() < 1e-70


def test_fp16_parameters_bound_the_step_norm():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        MUNBaOptimizer([p], bargaining_power=(1e3, 1e3))
    with pytest.raises(ValueError, match="float16"):  # d itself is rounded to float16
        MUNBaOptimizer([p], bargaining_power=(1e3, 1e3), state_dtype=torch.float32)
    MUNBaOptimizer([p], bargaining_power=(1e3, 1e3), max_grad_norm=1.0)  # clipped: fine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-170])
def test_float64_gradients_beyond_the_gram_range_skip_with_their_own_status(backend, scale):
    """Before: 1e±300 float64 gradients counted as BOTH_ZERO or NONFINITE (and 'raise' said NaN/Inf)."""
    gf, gr = pair()
    d, status = probe(gf * scale, gr, dtype=torch.float64, backend=backend)
    assert status == BargainStatus.OUT_OF_RANGE and torch.equal(d, torch.zeros_like(d))
    p = torch.nn.Parameter(torch.zeros(300, dtype=torch.float64))
    opt = MUNBaOptimizer([p], lr=1.0, backend=backend, nonfinite="raise")
    p.grad = gf * scale
    opt.capture_forget()
    p.grad = gr.clone()
    with pytest.raises(FloatingPointError, match="range") as err:
        opt.step()
    assert "NaN" not in str(err.value) and not opt.state[p]
    # NaN in float64 is still NaN, and in-range float64 extremes bargain as usual
    bad = gf.clone()
    bad[3] = math.nan
    assert probe(bad, gr, dtype=torch.float64, backend=backend)[1] == BargainStatus.NONFINITE
    d, status = probe(gf * 1e150, gr * 1e-150, dtype=torch.float64, backend=backend)
    d_ref, _ = probe(gf, gr, dtype=torch.float64, backend=backend)
    assert status == BargainStatus.OK
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-13)


def test_float64_tensors_beside_fp32_ones_keep_the_fp32_bargain():
    """A vanishing float64 part underflows in its own Gram but is negligible in the total."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.zeros(50))
    b = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = MUNBaOptimizer([a, b], lr=1.0, base="sgd")
    a.grad, b.grad = (
        torch.randn(50, generator=gen),
        torch.randn(20, generator=gen, dtype=torch.float64) * 1e-300,
    )
    opt.capture_forget()
    a.grad, b.grad = torch.randn(50, generator=gen), torch.zeros(20, dtype=torch.float64)
    opt.step()
    assert opt.last_bargain.status.item() == BargainStatus.OK
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and a.abs().max() > 0.01


# --------------------------------------------------------- 3. a skipped step leaves no trace
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [SGD_KW, dict(base="sgd", momentum=0.9), dict(base="adamw")])
def test_a_skipped_first_step_leaves_no_trace(backend, kwargs):
    """Before: a NaN first step created a zero momentum buffer, so the next step applied
    dampening (0.7·d instead of d) and the run diverged from one that never skipped."""
    params, opt = make(backend, shapes=((9, 4), (5,)), **kwargs)
    twins, clean = make(backend, shapes=((9, 4), (5,)), **kwargs)
    step(params, opt, seed=1, forget_poison=math.nan)
    assert opt.last_bargain.status.item() == BargainStatus.NONFINITE
    for s in (2, 3, 4):
        step(params, opt, seed=s)
        step(twins, clean, seed=s)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
        for key, value in clean.state[b].items():
            assert torch.equal(opt.state[a][key], value), key


# ------------------------------------------------------------- 5. stale state across steps
def test_zero_grad_drops_a_captured_forget_gradient():
    """Before: zero_grad() kept it, and the next step bargained with the old gradient."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p])
    p.grad = torch.ones(3)
    opt.capture_forget()
    opt.zero_grad()
    assert opt.captured_forget_gradients() == []
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="forget gradient first"):
        opt.step()
    opt.capture_forget()  # a new capture is allowed


def test_an_amp_step_skipped_on_a_preserve_overflow_leaves_the_next_iteration_clean():
    """Before: the scaler skipped step(), the capture stayed behind, and the next
    capture_forget() raised.  A loop that zeroes its gradients now starts clean."""
    model = torch.nn.Linear(4, 2)
    opt = MUNBaOptimizer(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4)
    statuses = []
    for it in range(3):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        opt.capture_forget()
        preserve = model(x).abs().mean() * (math.inf if it == 0 else 1.0)
        scaler.scale(preserve).backward()
        scaler.step(opt)
        scaler.update()
        statuses.append(None if opt.last_bargain is None else opt.last_bargain.status.item())
    assert statuses == [None, BargainStatus.OK, BargainStatus.OK]
    assert scaler.get_scale() == 2.0**9  # the overflow backed the scale off once
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_warmup_from_lr_zero_without_capture_is_an_error():
    """Before: any fresh optimizer at lr 0 took a missing capture as a zero forget gradient."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = MUNBaOptimizer([p], lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # lr 0 at step 0
    assert opt.param_groups[0]["lr"] == 0
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="forget gradient first"):
        opt.step()
    # what torch.distributed.checkpoint does on a fresh optimizer is still allowed
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p, torch.ones(3)) and opt.state[p]["step"].item() == 1


# ------------------------------------------------------------------------- 6. determinism
def test_the_torch_backend_gram_is_thread_count_invariant_and_equals_cpp():
    gen = torch.Generator().manual_seed(0)
    forget = [torch.randn(300_001, generator=gen), None, torch.randn(7, 9, generator=gen).t()]
    preserve = [
        torch.randn(300_001, generator=gen),
        torch.randn(5, generator=gen),
        torch.randn(9, 7, generator=gen),
    ]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(reference.gram(forget, preserve, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    if cpp.is_available():
        assert torch.equal(results[0], cpp.gram(forget, preserve, "cpu"))


# ------------------------------------------------------------------ property tests
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(list(FINITE)),
    exp_f=st.floats(0, 1),
    exp_r=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_the_direction_is_finite_and_exact_over_each_dtypes_whole_finite_range(
    backend, dtype, exp_f, exp_r, seed
):
    direction_case(backend, dtype, exp_f, exp_r, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruptions_either_raise_untouched_or_leave_finite_consistent_parameters(backend, data):
    corruption_case(backend, data.draw)
