"""Triton kernels against the reference backend and float64 math.

Runs where the kernels can: under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
which must be set before triton is imported, so ``tests/test_backend_triton.py`` runs this
directory in a subprocess) or natively on a CUDA device.  The interpreter is slow: tensors
stay small and the chunk size is lowered so that several tensors span many chunks.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip(
        "needs TRITON_INTERPRET=1 (tests/test_backend_triton.py runs this in a subprocess) or CUDA",
        allow_module_level=True,
    )

from munba_kernels import MUNBaOptimizer  # noqa: E402
from munba_kernels.backends import reference, triton_backend, triton_tables  # noqa: E402
from munba_kernels.backends.base import AdamWHyper, SGDHyper  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from buckets import bucket, clone_bucket, coefficients_for, per_param_states, players_bucket, sgd_state  # noqa: E402
from buckets import float64_gram as packed_float64_gram  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 1 element, primes, an empty tensor, one just over a chunk, one spanning three chunks.
SHAPES = [(1,), (7,), (0,), (13, 17), (257,), (3, 5, 2), (600,)]
SMALL_CHUNK = 256

# Tolerances.  fp32: torch's fused kernel and ours evaluate the same formulas in a
# different order (and a GPU contracts a*b+c into an FMA), so each step may differ by a
# few ulps of fp32 (2**-23 ≈ 1.2e-7); 1e-6 ≈ 8 ulps over the few steps a test takes.
# Every operand here is O(1) (parameters, states, and d = c·g), so the absolute term is
# the same size: under cancellation (buf = 0.9·buf + 0.9·d near zero) the rounding error
# is relative to the operands, not to the small result.  bf16/fp16: states are stored in
# the parameter dtype, so a 1-ulp difference in one rounding can surface once more a
# step later: 3 ulps.  fp64: 1e-12.
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=3 * 2**-8, atol=3 * 2**-8),
    torch.float16: dict(rtol=3 * 2**-11, atol=3 * 2**-11),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(triton_tables, "CHUNK", SMALL_CHUNK)


def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def gradients(dtype, seed=0):
    """Forget/preserve gradients per shape; tensor 1 lacks g_f, tensor 3 lacks g_r."""
    gen = torch.Generator().manual_seed(seed)
    gf = [randn(s, dtype, gen, 1e-3) for s in SHAPES]
    gr = [randn(s, dtype, gen, 1e2) for s in SHAPES]
    gf[1] = None
    gr[3] = None
    return gf, gr


def float64_gram(forget, preserve):
    return packed_float64_gram([forget, preserve])


# ---------------------------------------------------------------------------- Gram
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_matches_float64_dot_and_is_deterministic(dtype):
    gf, gr = gradients(dtype)
    got = triton_backend.gram([gf, gr], DEVICE)
    assert got.dtype == torch.float64 and got.device == DEVICE
    torch.testing.assert_close(got.cpu(), float64_gram(gf, gr), rtol=1e-12, atol=0)
    assert torch.equal(triton_backend.gram([gf, gr], DEVICE), got)  # bitwise on repeat


def test_gram_mixes_dtypes_and_layouts_in_one_call():
    gen = torch.Generator().manual_seed(3)
    a = randn((9, 31), torch.float32, gen)
    gf = [a.t(), randn((300,), torch.bfloat16, gen), None]  # a transposed gradient
    gr = [
        randn((31, 9), torch.float32, gen),
        randn((300,), torch.bfloat16, gen),
        randn((5,), torch.float16, gen),
    ]
    got = triton_backend.gram([gf, gr], DEVICE)
    torch.testing.assert_close(got.cpu(), float64_gram(gf, gr), rtol=1e-12, atol=0)


def test_gram_of_nothing_is_zero():
    empty = torch.zeros(0, device=DEVICE)
    for gf, gr in (([], []), ([empty], [None]), ([None], [empty])):
        assert torch.equal(triton_backend.gram([gf, gr], DEVICE).cpu(), torch.zeros(3, dtype=torch.float64))


# ----------------------------------------------------------------------- updates
def make_bucket(dtype, rule, gf, gr, seed=1, first_step=False, state_dtype=None):
    """Params with non-trivial states (in ``state_dtype``, default the param dtype); AdamW
    step counts differ per param (added at different times)."""
    gen = torch.Generator().manual_seed(seed)
    sd = state_dtype or dtype
    params, states = [], []
    for i, s in enumerate(SHAPES):
        p = randn(s, dtype, gen)
        params.append(p)
        zeros = torch.zeros_like(p, dtype=sd)
        if rule == "adamw":
            step = torch.tensor(float(3 * (i % 3)), device=DEVICE)
            m = randn(s, sd, gen, 0.1) if step > 0 else zeros
            v = randn(s, sd, gen, 0.1).square() if step > 0 else zeros.clone()
            states.append(dict(step=step, exp_avg=m, exp_avg_sq=v))
        else:
            states.append(sgd_state(zeros if first_step else randn(s, sd, gen), first_step))
    return bucket(params, gf, gr, states, first_step)


def assert_buckets_close(got, want, dtype, exact=False):
    tol = dict(rtol=0, atol=0) if exact else TOL[dtype]
    for a, b in zip(got.params, want.params):
        torch.testing.assert_close(a, b, **tol)
    for sa, sb in zip(per_param_states(got), per_param_states(want)):
        for key in sb:
            torch.testing.assert_close(sa[key], sb[key], **(tol if key != "step" else dict(rtol=0, atol=0)))


COEFFICIENTS = {
    "bargained": [0.37, 2.9e-3],
    "clipped": [0.37 / 1.4142135623730951, 2.9e-3 / 1.4142135623730951],
    "degenerate": [0.0, 0.0],
}


def run_steps(backend, bucket, rule, hp, coefficients, steps=3, skip=0.0):
    c = coefficients_for(coefficients, bucket.dtype, DEVICE)
    s = torch.tensor(skip, dtype=torch.float32, device=DEVICE)
    for k in range(steps):
        bucket.first_step = bucket.first_step and k == 0
        getattr(backend, rule)(bucket, c, s, hp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "maximize, weight_decay, lr_kind", [(False, 1e-2, "float"), (True, 0.0, "tensor"), (False, 0.3, "tensor")]
)
@pytest.mark.parametrize("coefficients", ["bargained", "clipped", "degenerate"])
def test_adamw_matches_reference(dtype, maximize, weight_decay, lr_kind, coefficients):
    gf, gr = gradients(dtype)
    want = make_bucket(dtype, "adamw", gf, gr)
    got = clone_bucket(want)
    lr = 1e-2 if lr_kind == "float" else torch.tensor(1e-2, device=DEVICE)
    hp = AdamWHyper(lr, 0.8, 0.95, 1e-7, weight_decay, maximize)
    run_steps(reference, want, "adamw", hp, COEFFICIENTS[coefficients])
    run_steps(triton_backend, got, "adamw", hp, COEFFICIENTS[coefficients])
    assert_buckets_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "momentum, dampening, nesterov, weight_decay, maximize",
    [(0.0, 0.0, False, 0.0, False), (0.9, 0.1, False, 5e-4, True), (0.9, 0.0, True, 1e-2, False)],
)
@pytest.mark.parametrize("first_step", [True, False])
def test_sgd_matches_reference(dtype, momentum, dampening, nesterov, weight_decay, maximize, first_step):
    gf, gr = gradients(dtype)
    want = make_bucket(dtype, "sgd", gf, gr, first_step=first_step)
    if momentum == 0:
        want.states.clear()
    got = clone_bucket(want)
    lr = torch.tensor(1e-2, device=DEVICE) if first_step else 1e-2
    hp = SGDHyper(lr, momentum, dampening, nesterov, weight_decay, maximize)
    run_steps(reference, want, "sgd", hp, COEFFICIENTS["bargained"])
    run_steps(triton_backend, got, "sgd", hp, COEFFICIENTS["bargained"])
    assert_buckets_close(got, want, dtype)


# A skipped step leaves step = 0 for new params, so the (unused) bias correction divides
# by zero; numpy warns about it under the interpreter.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("rule", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_writes_nothing(rule, dtype):
    gf, gr = gradients(dtype)
    bucket = make_bucket(dtype, rule, gf, gr, first_step=rule == "sgd")
    before = clone_bucket(bucket)
    hp = (
        AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 1e-2, False)
        if rule == "adamw"
        else SGDHyper(1e-2, 0.9, 0.0, True, 1e-2, False)
    )
    run_steps(triton_backend, bucket, rule, hp, [float("nan"), 1.0], steps=2, skip=1.0)
    assert_buckets_close(bucket, before, dtype, exact=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule, first_step", [("adamw", False), ("sgd", True), ("sgd", False)])
def test_fp32_states_for_low_precision_params_match_reference(dtype, rule, first_step):
    """bf16/fp16 params with fp32 states (``state_dtype=torch.float32``): the states keep
    fp32 accuracy; first step, then later ones."""
    gf, gr = gradients(dtype)
    want = make_bucket(dtype, rule, gf, gr, first_step=first_step, state_dtype=torch.float32)
    got = clone_bucket(want)
    hp = (
        AdamWHyper(1e-2, 0.8, 0.95, 1e-7, 1e-2, False)
        if rule == "adamw"
        else SGDHyper(1e-2, 0.9, 0.1, False, 5e-4, False)
    )
    run_steps(reference, want, rule, hp, COEFFICIENTS["bargained"])
    run_steps(triton_backend, got, rule, hp, COEFFICIENTS["bargained"])
    for a, b in zip(got.params, want.params):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for sa, sb in zip(per_param_states(got), per_param_states(want)):
        for key in sb:
            assert sa[key].dtype == sb[key].dtype == torch.float32
            # Neither rounds d to the gradient dtype: fp32 states agree to fp32 accuracy.
            torch.testing.assert_close(sa[key], sb[key], **TOL[torch.float32])


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_gapped_view_params_are_staged(rule):
    """A parameter that is a strided view (and one whose state has other strides) is
    updated through contiguous copies; the elements between stay untouched."""
    gen = torch.Generator().manual_seed(9)
    storage = randn((600,), torch.float32, gen)
    gapped = storage[::3]  # 200 elements, stride 3
    square = randn((12, 12), torch.float32, gen)
    gf = [randn((200,), torch.float32, gen), randn((12, 12), torch.float32, gen)]
    gr = [randn((200,), torch.float32, gen), None]
    if rule == "adamw":
        hp = AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 1e-2, False)
        states = [
            dict(
                step=torch.tensor(2.0, device=DEVICE),
                exp_avg=randn((200,), torch.float32, gen, 0.1),
                exp_avg_sq=randn((200,), torch.float32, gen, 0.1).square(),
            ),
            dict(
                step=torch.tensor(1.0, device=DEVICE),
                exp_avg=randn((12, 12), torch.float32, gen, 0.1).t(),
                exp_avg_sq=randn((12, 12), torch.float32, gen, 0.1).square(),
            ),
        ]
    else:
        hp = SGDHyper(1e-2, 0.9, 0.0, True, 1e-2, False)
        states = [
            sgd_state(randn((200,), torch.float32, gen), False),
            sgd_state(randn((12, 12), torch.float32, gen).t(), False),
        ]
    got = bucket([gapped, square], gf, gr, states)
    want = bucket(
        [gapped.clone(), square.clone()],
        gf,
        gr,
        [{k: v.clone(memory_format=torch.contiguous_format) for k, v in s.items()} for s in states],
    )
    between = [storage[1::3].clone(), storage[2::3].clone()]
    run_steps(reference, want, rule, hp, COEFFICIENTS["bargained"], steps=2)
    run_steps(triton_backend, got, rule, hp, COEFFICIENTS["bargained"], steps=2)
    assert_buckets_close(got, want, torch.float32)
    assert torch.equal(storage[::3], got.params[0])
    assert torch.equal(storage[1::3], between[0]) and torch.equal(storage[2::3], between[1])


def test_noncontiguous_gradient_is_paired_by_index():
    gen = torch.Generator().manual_seed(5)
    p = randn((6, 11), torch.float32, gen)
    gf, gr = randn((11, 6), torch.float32, gen).t(), randn((6, 11), torch.float32, gen)
    want = bucket([p.clone()], [gf.contiguous()], [gr], [], True)
    got = bucket([p.clone()], [gf], [gr], [], True)
    hp = SGDHyper(0.1, 0.0, 0.0, False, 0.0, False)
    run_steps(reference, want, "sgd", hp, [0.5, 0.25], steps=1)
    run_steps(triton_backend, got, "sgd", hp, [0.5, 0.25], steps=1)
    assert_buckets_close(got, want, torch.float32)


def test_chunk_table_addresses_beyond_int32(monkeypatch):
    chunk = 1 << 16  # the default: a table for a 6.4e9-element tensor has ~1e5 rows
    monkeypatch.setattr(triton_tables, "CHUNK", chunk)
    big = 3 * 2**31 + 5
    tables = triton_tables.build([[1], [2]], [big, 1], torch.device("cpu"))
    chunks = tables.chunks.cpu()
    assert chunks.dtype == torch.int64 and tables.n_chunks == (big + chunk - 1) // chunk + 1
    assert chunks[-2].tolist() == [0, big // chunk * chunk]
    assert chunks[-1].tolist() == [1, 0]


# ------------------------------------------------------------------ whole optimizer
def train(backend, base, dtype, max_grad_norm, steps=5, state_dtype=None):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(randn(s, dtype, gen)) for s in SHAPES]
    extra = dict(momentum=0.9, nesterov=True) if base == "sgd" else {}
    opt = MUNBaOptimizer(
        [dict(params=params[:4]), dict(params=params[4:], lr=3e-3)],
        lr=1e-2,
        base=base,
        weight_decay=1e-2,
        max_grad_norm=max_grad_norm,
        backend=backend,
        state_dtype=state_dtype,
        **extra,
    )
    for step in range(steps):
        gf, gr = gradients(dtype, seed=100 + step)
        for p, g in zip(params, gf):
            p.grad = g
        opt.capture_forget()
        for p, g in zip(params, gr):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize(
    "dtype, max_grad_norm, state_dtype",
    [(torch.float32, None, None), (torch.bfloat16, 1.0, None), (torch.bfloat16, 1.0, torch.float32)],
)
def test_optimizer_triton_matches_torch_backend(base, dtype, max_grad_norm, state_dtype):
    got, opt_t = train("triton", base, dtype, max_grad_norm, state_dtype=state_dtype)
    want, opt_r = train("torch", base, dtype, max_grad_norm, state_dtype=state_dtype)
    torch.testing.assert_close(opt_t.last_bargain.gram, opt_r.last_bargain.gram, rtol=1e-12, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
        for key, value in opt_r.state[b].items():
            assert opt_t.state[a][key].dtype == value.dtype == (state_dtype or value.dtype)
            torch.testing.assert_close(opt_t.state[a][key], value, **TOL[state_dtype or dtype])


# ------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_passes_are_custom_ops_that_compile_without_graph_breaks(rule):
    """fullgraph=True over both passes: the launchers (pointer tables, autotuning) stay
    inside the munba::triton_* ops, which dynamo records as single nodes."""
    import torch._dynamo

    torch._dynamo.reset()
    hp = (
        AdamWHyper(1e-2, 0.8, 0.95, 1e-7, 1e-2, False)
        if rule == "adamw"
        else SGDHyper(torch.tensor(1e-2, device=DEVICE), 0.9, 0.1, False, 5e-4, False)
    )
    gf, gr = gradients(torch.float32)

    def passes(b):
        gram = triton_backend.gram(b.grads, DEVICE)
        coefficients = coefficients_for((gram[:2] / gram.sum().sqrt()).to(torch.float64), torch.float32, DEVICE)
        getattr(triton_backend, rule)(b, coefficients, torch.zeros((), device=DEVICE), hp)
        return gram

    want = make_bucket(torch.float32, rule, gf, gr)
    got = clone_bucket(want)
    compiled = torch.compile(passes, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(got), passes(want), rtol=0, atol=0)
    assert_buckets_close(got, want, torch.float32, exact=True)


# -------------------------------------------------------------------- K players
def k_gradients(players, dtype, seed=0):
    """``players`` gradients per shape at scales 1e-3..1e2; player k lacks tensor k."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for k in range(players):
        scale = 10.0 ** (-3 + 5 * k / max(players - 1, 1))
        grads.append([None if i == k else randn(s, dtype, gen, scale) for i, s in enumerate(SHAPES)])
    return grads


@pytest.mark.parametrize("players", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_k_player_gram_matches_float64_pairwise_dots(players, dtype):
    grads = k_gradients(players, dtype)
    got = triton_backend.gram(grads, DEVICE)
    assert got.shape == (players * (players + 1) // 2,) and got.dtype == torch.float64
    want = packed_float64_gram(grads)
    diagonal = torch.tensor([want[i * players - i * (i - 1) // 2].item() for i in range(players)])
    # each entry to 1e-12 of its Cauchy-Schwarz bound sqrt(g_i·g_i g_j·g_j)
    bound = torch.tensor(
        [(diagonal[i] * diagonal[j]).sqrt().item() for i in range(players) for j in range(i, players)]
    )
    assert ((got.cpu() - want).abs() <= 1e-12 * bound).all()
    assert torch.equal(triton_backend.gram(grads, DEVICE), got)  # bitwise on repeat


K_COEFFICIENTS = {3: [0.37, -2.9e-3, 1.1e-1], 4: [0.2, 3e-3, -0.05, 1e-3]}


@pytest.mark.parametrize("players", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_k_player_update_matches_reference(players, dtype, rule):
    grads = k_gradients(players, dtype, seed=4)
    two = make_bucket(dtype, rule, grads[0], grads[1], first_step=rule == "sgd")
    want = players_bucket(two.params, grads, per_param_states(two), two.first_step)
    got = clone_bucket(want)
    if rule == "adamw":
        hp = AdamWHyper(1e-2, 0.8, 0.95, 1e-7, 1e-2, False)
    elif players == 3:  # nesterov (no dampening); 4: dampening
        hp = SGDHyper(1e-2, 0.9, 0.0, True, 5e-4, False)
    else:
        hp = SGDHyper(1e-2, 0.9, 0.1, False, 5e-4, False)
    run_steps(reference, want, rule, hp, K_COEFFICIENTS[players])
    run_steps(triton_backend, got, rule, hp, K_COEFFICIENTS[players])
    assert_buckets_close(got, want, dtype)


def test_optimizer_with_three_players_matches_torch_backend():
    def run(backend):
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(randn(s, torch.float32, gen)) for s in SHAPES]
        opt = MUNBaOptimizer(params, lr=1e-2, players=("a", "b", "c"), bargaining_power=(1.0, 2.0, 0.5), backend=backend)
        for step in range(3):
            grads = k_gradients(3, torch.float32, seed=50 + step)
            for name, player in zip(("a", "b"), grads):
                for p, g in zip(params, player):
                    p.grad = g
                opt.capture(name)
            for p, g in zip(params, grads[2]):
                p.grad = g
            opt.step()
            opt.zero_grad()
        return params, opt

    got, opt_t = run("triton")
    want, opt_r = run("torch")
    torch.testing.assert_close(opt_t.last_bargain.gram, opt_r.last_bargain.gram, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt_t.last_bargain.alpha, opt_r.last_bargain.alpha, rtol=1e-12, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
