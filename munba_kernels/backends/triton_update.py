"""Pass 2 on the GPU: bargained direction + AdamW / SGD, fused, one launch per bucket.

Each program takes one chunk of one tensor from a chunk table (see :mod:`.triton_tables`),
loads ``[c_1..c_K, s_1..s_K]`` and the skip flag from device memory, forms
``d = Σ_k c_k·(s_k·g_k)`` in registers (K = ``PLAYERS``, a constexpr; the table has one
gradient column per player; the powers of two ``s`` keep huge or tiny coefficients inside
fp32, see :func:`.base.kernel_coefficients`) and applies torch.optim.AdamW's or SGD's rule,
reading every array once and writing the parameter and its states once.  Math runs in
fp32 (fp64 for fp64 parameters) with one rounding on store; ``d`` stays in registers and
is never rounded to the gradient dtype (the contract in :mod:`.base`).

States are stored in ``STATE`` (a constexpr): the parameter dtype, or fp32 for bf16/fp16
parameters; the table carries only addresses, so nothing else changes.

A missing gradient has address 0 in the table and its loads are masked off, so it costs
no bandwidth (a zeros buffer would cost a read and memory as large as the largest tensor).
When ``skip`` is 1.0 every chunk is empty: nothing is read or written.
The step counts advance on the device by ``1 - skip`` before the launch, and each program
reads its tensor's own count: AdamW for the bias corrections (params added later may lag),
SGD with momentum to know a tensor's first step (a count of 1), so that a skipped first
step leaves the next one first.

Bytes moved per parameter (fp32; bf16/fp16 halve them):
* AdamW: read g_f, g_r, p, m, v = 20 B, write p, m, v = 12 B → 32 B.  At H100's
  ~3.35 TB/s: ~0.1 G params/ms, ~9.6 ms per 1e9 parameters (bf16: ~4.8 ms; bf16 params
  with fp32 states: read 2+2+2+4+4, write 2+4+4 = 24 B, ~7.2 ms).
* SGD with momentum: read g_f, g_r, p, buf = 16 B, write p, buf = 8 B → 24 B (~7.2 ms
  per 1e9); without momentum 12 + 4 = 16 B.  On the first step the buffer is not read.
A missing gradient saves its 4 B.  The unfused reference moves d through memory twice
more (write d, read it back) and launches ~10 kernels per bucket.

Launch configuration: autotuned on the GPU over a few (BLOCK, num_warps) pairs keyed on
the dtype.  Autotuning re-runs the kernel, and this kernel updates tensors in place that
sit behind an address table (out of reach of ``restore_value``), so the first launch per
key tunes on scratch tensors (:func:`_tune_on_scratch`) and later launches use the cached
choice.  The choice cannot change results: the rule is elementwise.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_tables
from .base import AdamWHyper, SGDHyper, TensorBucket, copy_back, stage_for_linear_walk

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRETED:  # the interpreter would time each config at a crawl; one is enough
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16))
    ]


@triton.jit
def _div(a, b, COMPUTE: tl.constexpr):
    # Triton's fp32 "/" is an approximate (2-ulp) division; torch's is IEEE-rounded.
    if COMPUTE == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(a, COMPUTE: tl.constexpr):
    # Likewise tl.sqrt is approximate in fp32 (exact in fp64).
    if COMPUTE == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _f64(x):
    # Float arguments arrive as fp64 scalars on the GPU (their annotation) but as Python
    # floats in the interpreter, where tl arithmetic would first round them to fp32.
    # full() converts exactly in both cases.
    return tl.full([], x, tl.float64)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32/fp64 registers rounded to nearest-even in DTYPE, as torch's casts round."""
    if DTYPE == tl.bfloat16:
        # Round by integer arithmetic, then cast exactly.  The GPU's own cast rounds the same
        # way, but the interpreter's truncates (and mishandles carries); a few integer ops
        # per element are free here and make bf16 results identical in both.  NaN is kept.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def _term(row, offs, mask, coefficients, k, PLAYERS: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """c_k·(s_k·g_k) for one block (a missing gradient has address 0 and reads nothing)."""
    addr = tl.load(row + 1 + k)
    c = tl.load(coefficients + k).to(COMPUTE)
    s = tl.load(coefficients + PLAYERS + k).to(COMPUTE)
    g = tl.load(addr.to(tl.pointer_type(DTYPE)) + offs, mask=mask & (addr != 0), other=0.0).to(COMPUTE)
    return c * (g * s)


@triton.jit
def _direction(row, offs, mask, coefficients, PLAYERS: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """d = Σ_k c_k·(s_k·g_k) for one block, players added in order, in the compute dtype (never rounded)."""
    d = _term(row, offs, mask, coefficients, 0, PLAYERS, DTYPE, COMPUTE)
    for k in tl.static_range(1, PLAYERS):
        d = d + _term(row, offs, mask, coefficients, k, PLAYERS, DTYPE, COMPUTE)
    return d


@triton.autotune(configs=_configs(), key=["DTYPE", "STATE"])
@triton.jit
def _adamw_kernel(
    tensors,  # int64 [n, K + 5]: p, g_1..g_K, exp_avg, exp_avg_sq, step addresses; numel
    chunks,  # int64 [n_chunks, 2]: tensor index, first element
    coefficients,  # float64 [2K]: c_1..c_K, s_1..s_K
    skip_ptr,  # float32 []: 1.0 = write nothing
    lr_ptr,  # lr as a device tensor (LR_ON_DEVICE), else unused
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    log2_beta1: tl.float64,  # beta**step = exp2(step * log2(beta)), in fp64 like torch's pow
    log2_beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    PLAYERS: tl.constexpr,
    DTYPE: tl.constexpr,
    STATE: tl.constexpr,  # dtype of exp_avg / exp_avg_sq
    COMPUTE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK == 0)
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tensors + (PLAYERS + 5) * t
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + PLAYERS + 1).to(tl.pointer_type(STATE))
    v_ptr = tl.load(row + PLAYERS + 2).to(tl.pointer_type(STATE))
    step = tl.load(tl.load(row + PLAYERS + 3).to(tl.pointer_type(tl.float32))).to(tl.float64)
    numel = tl.load(row + PLAYERS + 4)
    # A skipped step ends every chunk at 0: no load or store is issued at all.
    end = tl.where(tl.load(skip_ptr) == 0.0, numel, 0)
    lr = tl.load(lr_ptr).to(tl.float64) if LR_ON_DEVICE else _f64(lr)
    # Per-program scalars in fp64 (as torch computes them in double), rounded once.
    bias_correction1 = 1.0 - tl.exp2(step * _f64(log2_beta1))
    bias_correction2 = 1.0 - tl.exp2(step * _f64(log2_beta2))
    step_size = (lr / bias_correction1).to(COMPUTE)
    bc2_sqrt = tl.sqrt(bias_correction2).to(COMPUTE)
    decay = (1.0 - lr * _f64(weight_decay)).to(COMPUTE)
    w1 = (1.0 - _f64(beta1)).to(COMPUTE)
    b2 = _f64(beta2).to(COMPUTE)
    w2 = (1.0 - _f64(beta2)).to(COMPUTE)
    eps_c = _f64(eps).to(COMPUTE)
    # Runtime trip count: a small tensor's program (or a skipped step) does no idle iterations.
    for i in range(0, tl.minimum(end - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        d = _direction(row, offs, mask, coefficients, PLAYERS, DTYPE, COMPUTE)
        if MAXIMIZE:
            d = -d
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        p = p * decay
        m = m + w1 * (d - m)  # torch's lerp(m, d, 1 - beta1)
        v = b2 * v + w2 * d * d
        denom = _div(_sqrt(v, COMPUTE), bc2_sqrt, COMPUTE) + eps_c
        p = p - step_size * _div(m, denom, COMPUTE)
        tl.store(p_ptr + offs, _round(p, DTYPE), mask=mask)
        tl.store(m_ptr + offs, _round(m, STATE), mask=mask)
        tl.store(v_ptr + offs, _round(v, STATE), mask=mask)


@triton.autotune(configs=_configs(), key=["DTYPE", "STATE"])
@triton.jit
def _sgd_kernel(
    tensors,  # int64 [n, K + 4]: p, g_1..g_K, momentum_buffer, step addresses; numel
    chunks,
    coefficients,
    skip_ptr,
    lr_ptr,
    lr: tl.float64,
    momentum: tl.float64,
    dampening: tl.float64,
    weight_decay: tl.float64,
    PLAYERS: tl.constexpr,
    DTYPE: tl.constexpr,
    STATE: tl.constexpr,  # dtype of momentum_buffer
    COMPUTE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,  # every count is 1 (host knowledge): the buffer is not read
    NESTEROV: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK == 0)
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tensors + (PLAYERS + 4) * t
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    buf_ptr = tl.load(row + PLAYERS + 1).to(tl.pointer_type(STATE))
    numel = tl.load(row + PLAYERS + 3)
    # A skipped step ends every chunk at 0: no load or store is issued at all.
    end = tl.where(tl.load(skip_ptr) == 0.0, numel, 0)
    lr = tl.load(lr_ptr).to(COMPUTE) if LR_ON_DEVICE else _f64(lr).to(COMPUTE)
    wd = _f64(weight_decay).to(COMPUTE)
    mom = _f64(momentum).to(COMPUTE)
    keep = (1.0 - _f64(dampening)).to(COMPUTE)
    # Runtime trip count: a small tensor's program (or a skipped step) does no idle iterations.
    for i in range(0, tl.minimum(end - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        d = _direction(row, offs, mask, coefficients, PLAYERS, DTYPE, COMPUTE)
        if MAXIMIZE:
            d = -d
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if DECAY:  # a constexpr, not wd*p with wd = 0: an inf parameter would give NaN
            d = d + wd * p
        if HAS_MOMENTUM:
            if FIRST_STEP:
                buf = d
            else:
                # torch's "buf is None" branch, decided on the device: a first step that
                # was skipped left the count at 0, so this one is first (count 1).
                first = tl.load(tl.load(row + PLAYERS + 2).to(tl.pointer_type(tl.float32))) == 1.0
                buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                buf = tl.where(first, d, mom * buf + keep * d)
            tl.store(buf_ptr + offs, _round(buf, STATE), mask=mask)
            if NESTEROV:
                d = d + mom * buf
            else:
                d = buf
        p = p - lr * d
        tl.store(p_ptr + offs, _round(p, DTYPE), mask=mask)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows(bucket: TensorBucket, state_keys: tuple[str | None, ...]):
    """Table rows ``[p, g_1..g_K, *states]`` and sizes, tensors to keep alive, staged copies.

    A ``None`` state key is an unused column (address 0), so a kernel's row width is fixed.
    A parameter that is not dense, or whose states have other strides, is updated through
    contiguous copies (:func:`.base.stage_for_linear_walk`) that :func:`.base.copy_back`
    writes back after the launch.
    """
    elementwise = tuple(k for k in state_keys if k not in (None, "step"))
    params, staged_states, staged = stage_for_linear_walk(bucket, elementwise)
    by_key = dict(zip(elementwise, staged_states))
    rows, numels, keep_alive = [], [], []
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        states = [None if k is None else by_key[k][i] if k in by_key else bucket.states[k][i] for k in state_keys]
        grads = [None if player[i] is None else triton_tables.laid_out_like(player[i], p) for player in bucket.grads]
        keep_alive.extend(g for g in grads if g is not None)  # copies must outlive the launch
        rows.append([p.data_ptr(), *map(_address, grads), *map(_address, states)])
        numels.append(p.numel())
    return rows, numels, keep_alive, staged


def _lr_args(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """(pointer, value): a device lr is read by the kernel; a float or a host tensor is passed
    by value (reading a CPU tensor involves no device synchronisation)."""
    if isinstance(lr, Tensor) and lr.device == device:
        return lr, 0.0
    return None, float(lr)


def _kernel_dtypes(bucket: TensorBucket) -> dict:
    """The DTYPE, STATE and COMPUTE constexprs of a bucket."""
    if bucket.dtype not in triton_tables.TL_DTYPES:
        raise TypeError(f"the triton backend does not support {bucket.dtype} parameters")
    return dict(
        DTYPE=triton_tables.TL_DTYPES[bucket.dtype],
        STATE=triton_tables.TL_DTYPES[bucket.state_dtype],
        COMPUTE=tl.float64 if bucket.dtype == torch.float64 else tl.float32,
    )


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta = 0: beta**step = 0


_TUNED: set[tuple] = set()
_SCRATCH_NUMEL = 1 << 22


def _tune_on_scratch(kernel, state_keys, device: torch.device, launch_args: dict) -> None:
    """Run the autotuner once per (kernel, device, dtype) on scratch tensors (see module doc).

    The scratch launch has the same constexprs and argument dtypes as the real one, so it
    fills the autotuner's cache entry that the real launch then uses.  4M elements per
    array is large enough that timings reflect streaming bandwidth.
    """
    # Everything the autotuner keys on: DTYPE and the dtypes of the tensor arguments (a
    # device lr adds one).  A key tuned here is never benchmarked on the real tensors.
    key = (
        kernel,
        device,
        launch_args["DTYPE"],
        launch_args["STATE"],
        *(a.dtype for a in launch_args.values() if isinstance(a, Tensor)),
    )
    if len(kernel.configs) == 1 or key in _TUNED:
        return
    torch_dtype = {v: k for k, v in triton_tables.TL_DTYPES.items()}

    def scratch(column):
        if column == "step":
            return torch.ones((), dtype=torch.float32, device=device)
        if column is None:
            return None
        dtype = launch_args["DTYPE" if column in ("param", "gradient") else "STATE"]
        return torch.zeros(_SCRATCH_NUMEL, dtype=torch_dtype[dtype], device=device)

    columns = [scratch(k) for k in ("param", *["gradient"] * launch_args["PLAYERS"], *state_keys)]
    tables = triton_tables.build([list(map(_address, columns))], [_SCRATCH_NUMEL], device)
    args = dict(launch_args)
    args["coefficients"] = torch.ones_like(args["coefficients"])
    args["skip_ptr"] = torch.zeros_like(args["skip_ptr"])  # a skipped run would time nothing
    if args["lr_ptr"] is not None:
        args["lr_ptr"] = torch.zeros_like(args["lr_ptr"])
    kernel[(tables.n_chunks,)](tables.tensors, tables.chunks, **args)
    _TUNED.add(key)


def _launch(kernel, bucket: TensorBucket, state_keys: tuple[str | None, ...], launch_args: dict) -> None:
    rows, numels, keep_alive, staged = _rows(bucket, state_keys)
    if not rows:
        return
    device = bucket.device
    _tune_on_scratch(kernel, state_keys, device, launch_args)
    tables = triton_tables.build(rows, numels, device)
    kernel[(tables.n_chunks,)](tables.tensors, tables.chunks, **launch_args)
    copy_back(staged)
    del keep_alive  # only now may the gradient copies be freed


def adamw(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: AdamWHyper) -> None:
    steps = bucket.state("step")
    # One foreach launch; a skipped step adds exactly 0.  The kernel reads the new counts.
    torch._foreach_add_(steps, 1.0 - skip)
    lr_ptr, lr = _lr_args(hp.lr, bucket.device)
    launch_args = dict(
        coefficients=coefficients,
        skip_ptr=skip,
        lr_ptr=lr_ptr,
        lr=lr,
        beta1=hp.beta1,
        beta2=hp.beta2,
        log2_beta1=_log2(hp.beta1),
        log2_beta2=_log2(hp.beta2),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        PLAYERS=bucket.players,
        **_kernel_dtypes(bucket),
        LR_ON_DEVICE=lr_ptr is not None,
        MAXIMIZE=hp.maximize,
        CHUNK=triton_tables.CHUNK,
    )
    _launch(_adamw_kernel, bucket, ("exp_avg", "exp_avg_sq", "step"), launch_args)


def sgd(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: SGDHyper) -> None:
    lr_ptr, lr = _lr_args(hp.lr, bucket.device)
    has_momentum = hp.momentum != 0
    if has_momentum:  # as adamw: a skipped step adds exactly 0; the kernel reads the new counts
        torch._foreach_add_(bucket.state("step"), 1.0 - skip)
    launch_args = dict(
        coefficients=coefficients,
        skip_ptr=skip,
        lr_ptr=lr_ptr,
        lr=lr,
        momentum=hp.momentum,
        dampening=hp.dampening,
        weight_decay=hp.weight_decay,
        PLAYERS=bucket.players,
        **_kernel_dtypes(bucket),
        LR_ON_DEVICE=lr_ptr is not None,
        MAXIMIZE=hp.maximize,
        DECAY=hp.weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bucket.first_step,
        NESTEROV=hp.nesterov,
        CHUNK=triton_tables.CHUNK,
    )
    state_keys = ("momentum_buffer", "step") if has_momentum else (None, None)
    _launch(_sgd_kernel, bucket, state_keys, launch_args)
