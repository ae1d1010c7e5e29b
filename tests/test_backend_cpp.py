"""The compiled C++ CPU backend against the plain-torch reference backend (the oracle).

Tolerances, and why:
* Gram: both sides accumulate in float64 (products of fp32/bf16/fp16 values are exact
  there), only the summation order differs, so rtol 1e-12 (fr: relative to ‖g_f‖‖g_r‖).
* fp32/fp64 updates: the same formulas in the same order; torch's fused AdamW rounds the
  momentum lerp once (an FMA) where the kernel rounds twice, so a state can differ by about
  one ulp of its magnitude and a parameter by one rounding flip: ``ULPS`` = 2.
* bf16/fp16 updates: both keep d in fp32 (never rounded to the gradient dtype, the
  contract); the reference runs torch's fused rule on fp32 copies and rounds each result
  once.  Against the reference run on fp32 inputs a result may differ by one rounding flip;
  against the reference itself by a couple of ulps (DESIGN.md §4).
"ulps" are relative to each element or, for elements near zero after cancellation, to
the tensor's largest magnitude (``assert_ulps``).  A wrong formula is off by far more.
"""

import os

import pytest
import torch
from buckets import bucket as two_players
from buckets import clone_bucket, coefficients_for, per_param_states, players_bucket, sgd_state
from buckets import float64_gram as packed_float64_gram

from munba_kernels import MUNBaOptimizer
from munba_kernels.backends import cpp, reference
from munba_kernels.backends.base import AdamWHyper, SGDHyper

requires_cpp = pytest.mark.skipif(not cpp.is_available(), reason=cpp.unavailable_reason() or "built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 1 element, primes, a 3-d tensor, an empty tensor, one larger than a 32768-element chunk
SHAPES = [(1,), (7,), (13, 17), (2, 3, 5), (0,), (300_003,), (65_537,)]
ULPS = 2


def test_extension_is_built_when_required():
    """`make test` sets MUNBA_REQUIRE_CPP=1, so CI proves the extension builds and loads."""
    if os.environ.get("MUNBA_REQUIRE_CPP") != "1":
        pytest.skip("MUNBA_REQUIRE_CPP is not set")
    assert cpp.is_available(), cpp.unavailable_reason()


def test_backend_reports_itself():
    assert cpp.name == "cpp"
    assert cpp.supports(torch.device("cpu")) and not cpp.supports(torch.device("meta"))
    assert (cpp.unavailable_reason() == "") == cpp.is_available()


def assert_ulps(actual, expected, ulps, before=None):
    """Within ``ulps`` ulps of each element, or of the largest magnitude in ``expected`` or
    ``before`` (the tensor before the update: where the update cancels it, the rounding
    error is relative to the operands, not to the small result)."""
    eps = torch.finfo(expected.dtype).eps
    scale = max(
        [t.detach().double().abs().max().item() for t in (expected, before) if t is not None and t.numel()],
        default=0.0,
    )
    torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=ulps * eps * scale, equal_nan=True)


def random_grads(shapes, dtype, seed, missing=()):
    gen = torch.Generator().manual_seed(seed)
    return [None if i in missing else torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)]


def float64_gram(forget, preserve):
    def flat(gs, other):
        return torch.cat(
            [(g if g is not None else torch.zeros_like(o)).double().flatten() for g, o in zip(gs, other)]
        )

    f, r = flat(forget, preserve), flat(preserve, forget)
    return torch.stack([f @ f, f @ r, r @ r])


def assert_gram_close(actual, expected):
    assert actual.dtype == torch.float64 and actual.shape == (3,)
    ff, fr, rr = expected.tolist()
    torch.testing.assert_close(actual[[0, 2]], expected[[0, 2]], rtol=1e-12, atol=0)
    assert abs(actual[1].item() - fr) <= 1e-12 * (ff * rr) ** 0.5


# ---------------------------------------------------------------------------------- Gram


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_matches_float64_dot_products(dtype):
    forget = random_grads(SHAPES, dtype, seed=1, missing={1})
    preserve = random_grads(SHAPES, dtype, seed=2, missing={3})
    got = cpp.gram([forget, preserve], "cpu")
    assert_gram_close(got, float64_gram(forget, preserve))
    assert_gram_close(got, reference.gram([forget, preserve], "cpu"))


@requires_cpp
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_gram_of_tiny_and_huge_fp32_gradients_neither_underflows_nor_overflows(scale):
    forget = [g * scale for g in random_grads(SHAPES, torch.float32, seed=3)]
    preserve = random_grads(SHAPES, torch.float32, seed=4)
    assert_gram_close(cpp.gram([forget, preserve], "cpu"), float64_gram(forget, preserve))


@requires_cpp
def test_gram_is_bitwise_deterministic_for_any_thread_count():
    forget = random_grads([(1_000_003,), (70_001,), (5,)], torch.float32, seed=5)
    preserve = random_grads([(1_000_003,), (70_001,), (5,)], torch.float32, seed=6)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(cpp.gram([forget, preserve], "cpu"))
    finally:
        torch.set_num_threads(threads)
    # fixed chunks summed in a fixed order: identical, not merely close
    assert all(torch.equal(r, results[0]) for r in results)
    assert_gram_close(results[0], float64_gram(forget, preserve))


@requires_cpp
def test_gram_of_empty_lists_and_of_noncontiguous_gradients():
    assert torch.equal(cpp.gram([[], []], "cpu"), torch.zeros(3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(40, 50, generator=gen)
    r = torch.randn(50, 40, generator=gen).t()  # same shape, transposed layout
    s = torch.randn(90, generator=gen)[::3]  # not dense at all
    got = cpp.gram([[f, s, None], [r, s, s]], "cpu")
    assert_gram_close(got, float64_gram([f, s, None], [r, s, s]))


@requires_cpp
def test_gram_rejects_a_pair_without_gradients():
    with pytest.raises(RuntimeError, match="no gradient"):
        cpp.gram([[None], [None]], "cpu")


# ------------------------------------------------------------------ update pass, directly


def make_bucket(dtype, base, seed, first_step=False, missing_f=(1, 4), missing_r=(2,)):
    """A bucket over SHAPES with non-trivial states; step counts differ per tensor."""
    gen = torch.Generator().manual_seed(seed)

    def rand(s, scale=1.0):
        return (torch.randn(s, generator=gen) * scale).to(dtype)

    params, forget, preserve, states = [], [], [], []
    for i, s in enumerate(SHAPES):
        params.append(rand(s))
        forget.append(None if i in missing_f else rand(s))
        preserve.append(None if i in missing_r else rand(s, 3.0))
        if base == "adamw":
            state = {
                "step": torch.tensor(float(i % 3)),
                "exp_avg": rand(s, 0.1),
                "exp_avg_sq": rand(s, 0.1).abs() if i % 3 else torch.zeros(s, dtype=dtype),
            }
        else:
            state = sgd_state(rand(s, 0.5), first_step)
        states.append(state)
    return two_players(params, forget, preserve, states, first_step)


def assert_buckets_close(actual, expected, ulps, before):
    for a, e, b in zip(actual.params, expected.params, before.params):
        assert_ulps(a, e.to(a.dtype), ulps, b)
    for sa, se, sb in zip(per_param_states(actual), per_param_states(expected), per_param_states(before)):
        for key in se:
            if key == "step":
                assert torch.equal(sa[key], se[key])
            else:
                assert_ulps(sa[key], se[key].to(sa[key].dtype), ulps, sb[key])


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


COEFFICIENTS = {
    "typical": [0.3, -1.7],
    "zero": [0.0, 0.0],
    "forget-only": [2.5, 0.0],
    "huge-tiny": [1e30, 1e-30],
}
ADAMW = {
    "default": AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 1e-2, False),
    "maximize-tensor-lr": AdamWHyper(torch.tensor(3e-3), 0.8, 0.95, 1e-6, 0.1, True),
    "large-lerp-weight": AdamWHyper(5e-2, 0.3, 0.9, 1e-8, 0.0, False),  # torch's other lerp form
}
SGD = {
    "plain": SGDHyper(1e-2, 0.0, 0.0, False, 0.0, False),
    "momentum-decay": SGDHyper(1e-2, 0.9, 0.0, False, 5e-4, False),
    "nesterov-maximize": SGDHyper(torch.tensor(3e-2), 0.9, 0.0, True, 1e-2, True),
    "dampening": SGDHyper(1e-1, 0.5, 0.3, False, 0.0, False),
}
CASES = [("adamw", name) for name in ADAMW] + [("sgd", name) for name in SGD]


def run_update(backend, base, bucket, coefficients, skip, hp):
    coefficients = coefficients_for(coefficients, bucket.dtype)
    getattr(backend, base)(bucket, coefficients, torch.tensor(float(skip)), hp)


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefficients", list(COEFFICIENTS))
@pytest.mark.parametrize("base,config", CASES)
@pytest.mark.parametrize("first_step", [False, True])
def test_update_matches_reference(dtype, coefficients, base, config, first_step):
    if first_step and base == "adamw":
        pytest.skip("first_step only changes SGD's momentum buffer")
    if dtype == torch.float16 and coefficients == "huge-tiny":
        pytest.skip("1e30·g overflows fp16: the reference rounds d to inf, the kernel keeps it in fp32")
    hp = (ADAMW if base == "adamw" else SGD)[config]
    c = COEFFICIENTS[coefficients]
    ours = make_bucket(dtype, base, seed=11, first_step=first_step)
    before = clone_bucket(ours)
    grads = [g.clone() for g in ours.forget + ours.preserve if g is not None]
    exact = clone_bucket(ours, opmath(dtype))  # the reference on the kernel's own math
    theirs = clone_bucket(ours)  # the reference itself (bf16/fp16: d rounded first)
    # Repeated calls exercise evolving states and step counts.  fp16 AdamW gets one call:
    # a stored (1-β2)d² often lands among fp16's subnormals (11 bits and fewer), where
    # one rounding apart becomes a large relative difference that m/sqrt(v) amplifies.
    calls = 1 if dtype == torch.float16 and base == "adamw" else 3
    for _ in range(calls):
        run_update(cpp, base, ours, c, 0.0, hp)
        run_update(reference, base, exact, c, 0.0, hp)
        run_update(reference, base, theirs, c, 0.0, hp)
        for bucket in (ours, exact, theirs):  # the counts have moved on: no longer a first step
            bucket.first_step = False
    assert_buckets_close(ours, exact, ULPS if dtype in (torch.float32, torch.float64) else 1, before)
    assert_buckets_close(ours, theirs, ULPS, before)
    # gradients are read, never written
    assert all(
        torch.equal(a, b) for a, b in zip(grads, [g for g in ours.forget + ours.preserve if g is not None])
    )


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base,config", [("adamw", "default"), ("sgd", "momentum-decay")])
def test_skip_writes_nothing(dtype, base, config):
    hp = (ADAMW if base == "adamw" else SGD)[config]
    bucket = make_bucket(dtype, base, seed=12)
    before = clone_bucket(bucket)
    run_update(cpp, base, bucket, COEFFICIENTS["typical"], 1.0, hp)
    for a, b in zip(bucket.params, before.params):
        assert torch.equal(a, b)
    for sa, sb in zip(per_param_states(bucket), per_param_states(before)):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


@requires_cpp
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_noncontiguous_gradients_and_channels_last_params(base):
    """Transposed gradients are copied into the parameter's layout; channels_last parameters
    (dense, not contiguous) are updated in place in their own layout.  The oracle gets the
    gradients in the parameter's layout: torch's fused CPU kernels (and so the reference
    backend) pair elements in storage order and get mismatched layouts wrong."""
    gen = torch.Generator().manual_seed(13)
    hp = ADAMW["default"] if base == "adamw" else SGD["momentum-decay"]
    params, forget, preserve, states = [], [], [], []
    for p, gf, gr in [
        (torch.randn(6, 9), torch.randn(9, 6).t(), torch.randn(6, 9)),
        (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.randn(2, 3, 4, 5), None),
        (
            torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last),
            torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last),
            torch.randn(3, 4, 5, 6)[:, :, :, :],
        ),
    ]:
        params.append(p)
        forget.append(gf)
        preserve.append(gr)
        like = torch.zeros_like(p, memory_format=torch.preserve_format)
        if base == "adamw":
            states.append({"step": torch.tensor(0.0), "exp_avg": like, "exp_avg_sq": like.clone()})
        else:
            states.append(sgd_state(like.normal_(generator=gen), False))
    ours = two_players(params, forget, preserve, states)
    theirs, before = clone_bucket(ours), clone_bucket(ours)
    for grads in (theirs.forget, theirs.preserve):
        grads[:] = [None if g is None else torch.empty_like(p).copy_(g) for g, p in zip(grads, theirs.params)]
    run_update(cpp, base, ours, COEFFICIENTS["typical"], 0.0, hp)
    run_update(reference, base, theirs, COEFFICIENTS["typical"], 0.0, hp)
    assert_buckets_close(ours, theirs, ULPS, before)
    assert ours.params[1].is_contiguous(memory_format=torch.channels_last)


@requires_cpp
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_gapped_view_params_are_updated_through_a_copy(base):
    """A parameter that is a gapped view cannot be walked linearly: it is staged through a
    contiguous copy and written back, leaving the elements between untouched."""
    hp = ADAMW["default"] if base == "adamw" else SGD["momentum-decay"]
    storage = torch.randn(40)
    p = storage[::2]
    like = torch.zeros_like(p, memory_format=torch.preserve_format)
    if base == "adamw":
        state = {"step": torch.tensor(0.0), "exp_avg": like, "exp_avg_sq": like.clone()}
    else:
        state = sgd_state(like, True)
    bucket = two_players([p], [torch.randn(20)], [torch.randn(20)], [state])
    theirs, before = clone_bucket(bucket), clone_bucket(bucket)  # contiguous copies
    gaps = storage[1::2].clone()
    run_update(cpp, base, bucket, COEFFICIENTS["typical"], 0.0, hp)
    run_update(reference, base, theirs, COEFFICIENTS["typical"], 0.0, hp)
    assert_buckets_close(bucket, theirs, ULPS, before)
    assert torch.equal(storage[::2], bucket.params[0]) and torch.equal(storage[1::2], gaps)


# --------------------------------------------------------------------- through the optimizer

OPTIMIZER_CONFIGS = {
    "adamw": dict(base="adamw", betas=(0.8, 0.95), weight_decay=1e-2),
    "adamw-clip-maximize": dict(base="adamw", max_grad_norm=0.5, maximize=True),
    "sgd-nesterov-decay": dict(base="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd-dampening-clip": dict(base="sgd", momentum=0.9, dampening=0.1, max_grad_norm=1.0),
    "sgd-plain": dict(base="sgd"),
}


def gradient_stream(steps, dtype, seed):
    """Per step: forget/preserve gradients; tensor 1 never has a forget gradient, tensor 2
    never a preserve gradient, tensor 3 neither (it must stay untouched)."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        scale_f, scale_r = 10 ** (4 * torch.rand(2, generator=gen) - 2)
        gf = [(torch.randn(s, generator=gen) * scale_f).to(dtype) for s in SHAPES]
        gr = [(torch.randn(s, generator=gen) * scale_r).to(dtype) for s in SHAPES]
        gf[1] = gf[3] = None
        gr[2] = gr[3] = None
        stream.append((gf, gr))
    return stream


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(OPTIMIZER_CONFIGS))
def test_optimizer_with_cpp_matches_torch_backend_over_ten_steps(dtype, config):
    kwargs = OPTIMIZER_CONFIGS[config]
    if dtype == torch.float16 and kwargs["base"] == "adamw":
        pytest.skip(
            "fp16 AdamW states underflow here: ‖d‖ = √2 spread over ~4e5 elements puts "
            "(1-β2)d² below fp16's subnormals, so v = 0 and both backends divide by eps"
        )
    gen = torch.Generator().manual_seed(21)
    start = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    runs = {}
    for backend in ("cpp", "torch"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [dict(params=params[:4], lr=1e-2), dict(params=params[4:], lr=3e-3)]
        opt = MUNBaOptimizer(groups, backend=backend, **kwargs)
        grams = []
        for gf, gr in gradient_stream(10, dtype, seed=22):
            for p, g in zip(params, gf):
                p.grad = g
            opt.capture_forget()
            for p, g in zip(params, gr):
                p.grad = g
            opt.step()
            grams.append(opt.last_bargain.gram.clone())
        runs[backend] = (params, opt, grams)
    (ours, opt, our_grams), (theirs, ref, their_grams) = runs["cpp"], runs["torch"]
    for a, b in zip(our_grams, their_grams):
        assert_gram_close(a, b)
    # Differences of one rounding per step accumulate over ten steps: bf16/fp16 round d
    # differently (see the module docstring).  fp64 uses the float64 Gram's α unrounded and
    # the two Grams' summation orders differ in the last bits, so d differs by an ulp every
    # step; where AdamW's denominator is near eps, m/denom amplifies that (up to ~1e-13
    # seen), so fp64 gets 1e-12 (4500 ulps, still 1e5 below fp32's bound).  fp32 rounds α to
    # fp32, which hides those bits; the direct tests above hold fp64 to 2 ulps.
    ulps = {torch.float32: ULPS, torch.float64: 4500}.get(dtype, 4)
    # A state element sums ten steps' terms that may cancel: its rounding error is relative
    # to the terms' size, i.e. to the state's typical magnitude across all tensors.
    typical = {
        key: max(ref.state[b][key].abs().max() for b in theirs[:3] + theirs[4:] if ref.state[b][key].numel())
        for key in ref.state[theirs[0]]
    }
    for a, b, s in zip(ours, theirs, start):
        assert_ulps(a.detach(), b.detach(), ulps, s)
        for key, value in ref.state[b].items():
            if key == "step":
                assert torch.equal(opt.state[a][key], value)
            else:
                assert_ulps(opt.state[a][key], value, ulps, typical[key].reshape(1))
    assert torch.equal(ours[3], start[3]) and ours[3] not in opt.state


@requires_cpp
def test_auto_picks_cpp_on_cpu():
    from munba_kernels import backends

    assert backends.resolve("auto", torch.device("cpu")) is cpp


def test_bf16_stores_round_to_nearest_even_like_torch():
    """The bf16 kernels round with integer bit operations (so they vectorise); every bit must
    match torch's float -> bf16 conversion: ties to even, ±inf and overflow included.  SGD with
    lr 1 and d = g_r stores exactly bf16(fp32(p) − fp32(g))."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 16  # two chunks and a tail: every clone's main loop and remainder
    p = (torch.randn(n + 37, generator=gen) * 10).bfloat16()
    g = (torch.randn(n + 37, generator=gen) * 10).bfloat16()
    # Differences exactly halfway between two bf16 values (spacing 2**-7 in [1, 2)): ties go to
    # the even neighbour, down from 1 + 2**-8 and up from 1 + 3 * 2**-8, either sign.
    p[:4] = torch.tensor([1.0, 1 + 2**-7, -1.0, -(1 + 2**-7)]).bfloat16()
    g[:4] = torch.tensor([-(2**-8), -(2**-8), 2**-8, 2**-8]).bfloat16()
    p[8:12] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38]).bfloat16()
    expected = (p.float() - g.float()).bfloat16()
    bucket = two_players([p], [None], [g], [{}])
    hp = SGDHyper(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    cpp.sgd(bucket, coefficients_for([0.0, 1.0], torch.bfloat16), torch.zeros(()), hp)
    # NaN payloads are not compared: torch's own vectorised and scalar conversions disagree on them.
    assert torch.equal(p.isnan(), expected.isnan()) and p.isnan().sum() == 1
    finite = ~expected.isnan()
    assert torch.equal(p[finite].view(torch.int16), expected[finite].view(torch.int16))


# ------------------------------------------------------------------------ K players
def k_player_grads(players, dtype, seed, shapes=SHAPES):
    """Player k's gradients at scale 10^(k-1); player k lacks tensor k (counts as zero)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [None if i == k else (torch.randn(s, generator=gen) * 10.0 ** (k - 1)).to(dtype) for i, s in enumerate(shapes)]
        for k in range(players)
    ]


@requires_cpp
@pytest.mark.parametrize("players", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_player_gram_matches_float64_and_the_reference_bitwise(players, dtype):
    """Each entry is its own pair's sum in the C++ chunk order, which the reference spells
    out: bitwise equal; and within 1e-12 of float64 dot products (relative to the
    Cauchy-Schwarz bound of the entry)."""
    grads = k_player_grads(players, dtype, seed=21)
    got = cpp.gram(grads, "cpu")
    assert got.dtype == torch.float64 and got.shape == (players * (players + 1) // 2,)
    assert torch.equal(got, reference.gram(grads, "cpu"))
    want = packed_float64_gram(grads)
    pairs = [(i, j) for i in range(players) for j in range(i, players)]
    diag = {i: want[pairs.index((i, i))].item() for i in range(players)}
    for entry, (i, j) in enumerate(pairs):
        assert abs(got[entry].item() - want[entry].item()) <= 1e-12 * (diag[i] * diag[j]) ** 0.5


@requires_cpp
def test_k_player_gram_is_thread_count_invariant():
    grads = k_player_grads(3, torch.float32, seed=22, shapes=[(300_007,), (70_001,), (9,)])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(cpp.gram(grads, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


K_COEFFICIENTS = {3: [0.3, -1.7e-2, 4e-3], 4: [0.2, 1e-30, -0.05, 1e30]}


@requires_cpp
@pytest.mark.parametrize("players", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("base,config", [("adamw", "default"), ("sgd", "nesterov-maximize"), ("sgd", "dampening")])
def test_k_player_update_matches_reference(players, dtype, base, config):
    """d = Σ c_k s_k g_k is formed in the compute dtype from K gradients: the kernel (which
    forms it tile by tile in L1 and then runs the two-player rule) against the reference."""
    hp = (ADAMW if base == "adamw" else SGD)[config]
    two = make_bucket(dtype, base, seed=31)
    grads = k_player_grads(players, dtype, seed=32)
    ours = players_bucket(two.params, grads, per_param_states(two), two.first_step)
    before, exact, theirs = clone_bucket(ours), clone_bucket(ours, opmath(dtype)), clone_bucket(ours)
    read = [g.clone() for player in grads for g in player if g is not None]
    for _ in range(3):
        run_update(cpp, base, ours, K_COEFFICIENTS[players], 0.0, hp)
        run_update(reference, base, exact, K_COEFFICIENTS[players], 0.0, hp)
        run_update(reference, base, theirs, K_COEFFICIENTS[players], 0.0, hp)
    assert_buckets_close(ours, exact, ULPS if dtype in (torch.float32, torch.float64) else 1, before)
    assert_buckets_close(ours, theirs, ULPS, before)
    assert all(torch.equal(a, b) for a, b in zip(read, [g for player in grads for g in player if g is not None]))


@requires_cpp
def test_k_player_skip_writes_nothing():
    two = make_bucket(torch.float32, "adamw", seed=33)
    ours = players_bucket(two.params, k_player_grads(3, torch.float32, seed=34), per_param_states(two))
    before = clone_bucket(ours)
    run_update(cpp, "adamw", ours, [float("nan"), 1.0, 2.0], 1.0, ADAMW["default"])
    assert_buckets_close(ours, before, 0, before)
