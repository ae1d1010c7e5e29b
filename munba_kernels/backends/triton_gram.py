"""Pass 1 on the GPU: the packed Gram of K players' gradients (``[ff, fr, rr]`` for two), in float64.

Stage 1 is one launch per dtype over a chunk table (see :mod:`.triton_tables`): each
program streams its chunk of ``g_f`` and ``g_r``, accumulates ``f·f``, ``f·r``, ``r·r`` in
float64 registers and writes its three partial sums to its own slot of a buffer.  Stage 2,
one program, sums the slots in a fixed order.  No atomics, no host synchronisation, and
the result is bitwise reproducible: the reduction order depends only on the tensor list.

Both kernels use a *fixed* launch configuration, deliberately not autotuned: the order of
a ``tl.sum`` depends on BLOCK and num_warps, so an autotuner choosing by timing noise could
change the Gram's last bits from one process to the next and break bit-for-bit resumption.

Bytes moved per parameter (a streaming read of both gradients; the partials are
24 B per 64K-element chunk, negligible): fp32 8 B, bf16/fp16 4 B.  At H100's ~3.35 TB/s
that is a roofline of ~0.42 G params/ms in fp32 (~2.4 ms for 1e9 parameters) and twice
that in bf16.  The fp64 accumulation costs ~3 DFMA per element: H100's ~67 TFLOP/s of
fp64 keeps this pass memory-bound.

K ≥ 3 players: :func:`_gram_partials_k_kernel` loads a ``[KP, BLOCK]`` tile of all K
gradients at once (KP = K rounded up to a power of two; missing rows are masked off) and
accumulates their ``[KP, KP, BLOCK]`` outer products, so each gradient is read once; the
packed upper triangle is stored per chunk and :func:`_sum_partials_k_kernel` adds the
slots in a fixed order.  Two players keep the kernels above (the same bits as before).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_tables
from .base import is_dense

#: Stage-1 tile: 2048 elements x 2 gradients per iteration with 8 warps keeps enough bytes
#: in flight per SM to saturate HBM3; the interpreter uses the same tile (capped at CHUNK).
_BLOCK = 2048
_NUM_WARPS = 8
_SUM_BLOCK = 1024


@triton.jit
def _gram_partials_kernel(
    tensors,  # int64 [n, 3]: g_f address (0 = missing), g_r address (0 = missing), numel
    chunks,  # int64 [n_chunks, 2]: tensor index, first element
    partials,  # float64 [total_chunks, 3]
    first_slot,  # this launch's first row of ``partials``
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK == 0)
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    f_addr = tl.load(tensors + 3 * t)
    r_addr = tl.load(tensors + 3 * t + 1)
    numel = tl.load(tensors + 3 * t + 2)
    f_ptr = f_addr.to(tl.pointer_type(DTYPE))
    r_ptr = r_addr.to(tl.pointer_type(DTYPE))
    acc_ff = tl.zeros([BLOCK], dtype=tl.float64)
    acc_fr = tl.zeros([BLOCK], dtype=tl.float64)
    acc_rr = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # no idle iterations
        offs = start + i + tl.arange(0, BLOCK)  # int64, because start is
        in_range = offs < numel
        # A missing gradient is never read (its lanes are masked off): it costs no bandwidth.
        f = tl.load(f_ptr + offs, mask=in_range & (f_addr != 0), other=0.0).to(tl.float64)
        r = tl.load(r_ptr + offs, mask=in_range & (r_addr != 0), other=0.0).to(tl.float64)
        acc_ff += f * f
        acc_fr += f * r
        acc_rr += r * r
    out = partials + 3 * (first_slot + pid)
    tl.store(out, tl.sum(acc_ff, axis=0))
    tl.store(out + 1, tl.sum(acc_fr, axis=0))
    tl.store(out + 2, tl.sum(acc_rr, axis=0))


@triton.jit
def _sum_partials_kernel(partials, out, n_slots, BLOCK: tl.constexpr):
    acc_ff = tl.zeros([BLOCK], dtype=tl.float64)
    acc_fr = tl.zeros([BLOCK], dtype=tl.float64)
    acc_rr = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, n_slots, BLOCK):
        rows = i + tl.arange(0, BLOCK)
        mask = rows < n_slots
        acc_ff += tl.load(partials + 3 * rows, mask=mask, other=0.0)
        acc_fr += tl.load(partials + 3 * rows + 1, mask=mask, other=0.0)
        acc_rr += tl.load(partials + 3 * rows + 2, mask=mask, other=0.0)
    tl.store(out, tl.sum(acc_ff, axis=0))
    tl.store(out + 1, tl.sum(acc_fr, axis=0))
    tl.store(out + 2, tl.sum(acc_rr, axis=0))


@triton.jit
def _gram_partials_k_kernel(
    tensors,  # int64 [n, KP + 1]: K gradient addresses (0 = missing, padded to KP), numel
    chunks,  # int64 [n_chunks, 2]: tensor index, first element
    partials,  # float64 [total_chunks, K(K+1)/2]
    first_slot,
    PLAYERS: tl.constexpr,
    KP: tl.constexpr,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK == 0)
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    players = tl.arange(0, KP)
    addrs = tl.load(tensors + (KP + 1) * t + players)
    numel = tl.load(tensors + (KP + 1) * t + KP)
    ptrs = addrs.to(tl.pointer_type(DTYPE))
    acc = tl.zeros([KP, KP, BLOCK], dtype=tl.float64)
    for i in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = (addrs != 0)[:, None] & (offs < numel)[None, :]
        g = tl.load(ptrs[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += g[:, None, :] * g[None, :, :]
    sums = tl.sum(acc, axis=2)
    row = players[:, None]
    col = players[None, :]
    packed = row * PLAYERS - (row * (row - 1)) // 2 + (col - row)  # upper triangle, row by row
    width = PLAYERS * (PLAYERS + 1) // 2
    tl.store(partials + width * (first_slot + pid) + packed, sums, mask=(row <= col) & (col < PLAYERS))


@triton.jit
def _sum_partials_k_kernel(partials, out, n_slots, WIDTH: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, WP)
    acc = tl.zeros([BLOCK, WP], dtype=tl.float64)
    for i in range(0, n_slots, BLOCK):
        rows = i + tl.arange(0, BLOCK)
        mask = (rows < n_slots)[:, None] & (cols < WIDTH)[None, :]
        acc += tl.load(partials + WIDTH * rows[:, None] + cols[None, :], mask=mask, other=0.0)
    tl.store(out + cols, tl.sum(acc, axis=0), mask=cols < WIDTH)


def gram(grads: Sequence[Sequence[Tensor | None]], device) -> Tensor:
    """The packed float64 Gram of ``grads[player][tensor]`` (``None`` = zero gradient), on ``device``."""
    players = len(grads)
    kp = triton.next_power_of_2(players)
    groups: dict[torch.dtype, tuple[list[list[int]], list[int], list[Tensor]]] = {}
    for tensor in zip(*grads):
        ref = next((g for g in tensor if g is not None), None)
        if ref is None or ref.numel() == 0:
            continue
        # Every player's element k must be the same element: give all the same dense layout.
        if not is_dense(ref):
            ref = ref.contiguous()
        laid = [None if g is None else triton_tables.laid_out_like(g, ref) for g in tensor]
        rows, numels, keep_alive = groups.setdefault(ref.dtype, ([], [], []))
        addresses = [0 if g is None else g.data_ptr() for g in laid]
        rows.append(addresses if players == 2 else addresses + [0] * (kp - players))
        numels.append(ref.numel())
        # Copies made above must outlive the launch, or their memory (and address) could
        # be handed to the next copy before the kernel reads it.
        keep_alive.extend(g for g in laid if g is not None)

    width = players * (players + 1) // 2
    out = torch.zeros(width, dtype=torch.float64, device=device)
    launches = []
    for dtype, (rows, numels, _) in groups.items():
        if dtype not in triton_tables.TL_DTYPES:
            raise TypeError(f"the triton backend does not support {dtype} gradients")
        launches.append((dtype, triton_tables.build(rows, numels, device)))
    total = sum(tables.n_chunks for _, tables in launches)
    if total == 0:
        return out
    partials = torch.empty(total, width, dtype=torch.float64, device=device)
    slot = 0
    for dtype, tables in launches:
        if players == 2:
            _gram_partials_kernel[(tables.n_chunks,)](
                tables.tensors,
                tables.chunks,
                partials,
                slot,
                DTYPE=triton_tables.TL_DTYPES[dtype],
                CHUNK=triton_tables.CHUNK,
                BLOCK=min(_BLOCK, triton_tables.CHUNK),
                num_warps=_NUM_WARPS,
            )
        else:  # a [KP, KP, BLOCK] float64 accumulator: the tile shrinks as K grows
            _gram_partials_k_kernel[(tables.n_chunks,)](
                tables.tensors,
                tables.chunks,
                partials,
                slot,
                PLAYERS=players,
                KP=kp,
                DTYPE=triton_tables.TL_DTYPES[dtype],
                CHUNK=triton_tables.CHUNK,
                BLOCK=min(max(_BLOCK // (kp * kp), 16), triton_tables.CHUNK),
                num_warps=_NUM_WARPS,
            )
        slot += tables.n_chunks
    if players == 2:
        _sum_partials_kernel[(1,)](partials, out, total, BLOCK=_SUM_BLOCK, num_warps=4)
    else:
        wp = triton.next_power_of_2(width)
        _sum_partials_k_kernel[(1,)](partials, out, total, WIDTH=width, WP=wp, BLOCK=max(_SUM_BLOCK // wp, 16), num_warps=4)
    return out
