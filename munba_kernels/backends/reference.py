"""Plain-torch backend: the oracle every fused kernel is tested against.

Pass 1 (:meth:`gram`) accumulates ``(ff, fr, rr)`` in float64 so that every non-zero
gradient of any floating dtype has a non-zero square and 1e±20-scale gradients neither
overflow nor underflow.  Per-tensor partial sums are added in a fixed order, so the
result is deterministic.

Pass 2 forms ``d = Σ_k c_k·(s_k·g_k)`` in fp32 (fp64 for fp64 gradients; ``s`` are the
powers of two of :func:`.base.kernel_coefficients`) and hands it, never rounded, to torch's
own fused AdamW / SGD kernels.  Those kernels *define*
"the same semantics as torch.optim.AdamW/SGD", and their ``found_inf`` argument skips a
step on the device, leaving every parameter and state untouched.

Both passes run as ``torch.library`` custom ops (:mod:`.ops`), like the fused backends':
traced by ``torch.compile``, torch's ``_fused_adamw_`` with a ``found_inf`` computed in the
graph fails functionalization (torch 2.14), so the passes stay opaque nodes here too.

bf16/fp16 params: torch's fused kernels need one dtype for a parameter, its gradient and its
states, so the rule runs on fp32 copies of the parameters and of 16-bit states (exact
widenings) with d in fp32, and each is rounded back once: math in fp32, one rounding on
store, which is what the fused backends do in registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import bargaining_k
from . import base, ops
from .base import AdamWHyper, SGDHyper, TensorBucket, compute_dtype, copy_back, stage_for_linear_walk

name = "torch"


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def supports(device: torch.device) -> bool:
    return True


#: The C++ kernels' Gram chunk, lanes per chunk and the chunks handled per slab here.
GRAM_CHUNK, GRAM_LANES, _SLAB_CHUNKS = 1 << 15, 8, 32


def _gram(grads: Sequence[Sequence[Tensor | None]], device) -> Tensor:
    """Return the packed float64 Gram ``[K(K+1)/2]`` (``[ff, fr, rr]`` for two players) of
    ``grads[k][i]``, player k's gradient of tensor i; ``None`` counts as a zero gradient.

    The summation order is spelled out, the C++ kernel's exactly (``csrc/munba_cpu.cpp``):
    each tensor in memory order, in chunks of ``GRAM_CHUNK`` elements; in a chunk, lane ``k``
    adds the products of elements ``i ≡ k (mod 8)`` one after another (a ``cumsum``, which
    torch evaluates sequentially), the 8 lanes fold pairwise, and the chunk sums are added
    in chunk order.  So the result depends on the tensor sizes alone, never on the thread
    count (``torch.dot`` splits its reduction over threads), and on the CPU it is bitwise
    the C++ backend's.  Every entry is its own pair's sum (``i·j`` for each ``i ≤ j``), which
    is also how the C++ kernel sums K ≥ 3 players.  Slabs of a few chunks bound the float64
    temporaries.
    """
    return sum_partials(gram_partials(grads, device))


def sum_partials(partials: Tensor) -> Tensor:
    """The rows of ``[n, width]`` float64 partials added in row order from 0.0, as the C++
    kernel adds its chunk sums (a ``cumsum``, which torch evaluates sequentially)."""
    zero = torch.zeros(1, partials.shape[1], dtype=torch.float64, device=partials.device)
    return torch.cat([zero, partials]).cumsum(0)[-1].clone()  # its own storage, as the fake result


def gram_partials(grads: Sequence[Sequence[Tensor | None]], device) -> Tensor:
    """``[n_chunks, K(K+1)/2]``: the chunk sums :func:`_gram` adds, chunks in tensor then memory
    order.  Partials of single tensors, concatenated in tensor order, sum to the same bits."""
    players = len(grads)
    pairs = bargaining_k.pairs(players)
    partials = [torch.zeros(0, len(pairs), dtype=torch.float64, device=device)]
    for tensor in zip(*grads):
        like = next((g for g in tensor if g is not None), None)
        if like is None or like.numel() == 0:
            continue
        if not base.is_dense(like):
            like = like.contiguous()
        flat = [None if g is None else _in_memory_order(g, like) for g in tensor]
        slab = GRAM_CHUNK * _SLAB_CHUNKS
        for start in range(0, like.numel(), slab):
            pieces = [None if g is None else g[start : start + slab].to(torch.float64) for g in flat]
            partials.append(_chunk_sums(pieces, pairs))
    return torch.cat(partials)


def _in_memory_order(g: Tensor, like: Tensor) -> Tensor:
    """``g``'s elements as a flat tensor, in the memory order of the dense tensor ``like``."""
    if not (base.is_dense(g) and g.stride() == like.stride()):
        g = torch.empty_like(like, dtype=g.dtype).copy_(g)
    return g.as_strided((g.numel(),), (1,))


def _chunk_sums(pieces: list[Tensor | None], pairs) -> Tensor:
    """``[n_chunks, len(pairs)]`` chunk sums of ``pieces[i]·pieces[j]`` (``None`` = zeros) in the C++ order."""
    present = next(g for g in pieces if g is not None)
    n = present.numel()
    chunks = -(-n // GRAM_CHUNK)
    pad = chunks * GRAM_CHUNK - n  # zeros added to a lane change no sum
    zeros = torch.zeros(chunks, dtype=torch.float64, device=present.device)
    sums = []
    for i, j in pairs:
        x, y = pieces[i], pieces[j]
        if x is None or y is None:
            sums.append(zeros)
            continue
        lanes = torch.nn.functional.pad(x * y, (0, pad)).view(chunks, -1, GRAM_LANES).cumsum(1)[:, -1]
        sums.append(((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + ((lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])))
    return torch.stack(sums, dim=1)


def _fused_step(bucket: TensorBucket, coefficients: Tensor, state_keys: tuple[str, ...], kernel) -> None:
    """Form d and run ``kernel(params, directions, *state_lists)`` (one of torch's fused ops).

    torch's fused kernels pair the elements of p, d and the states in *memory order*: d is
    allocated in the parameter's layout, and odd layouts are staged (see
    :func:`.base.stage_for_linear_walk`).
    """
    params, states, staged = stage_for_linear_walk(bucket, state_keys)  # state_keys: elementwise ones
    directions = combine(bucket, coefficients, layouts=params)
    math = compute_dtype(bucket.dtype)
    if bucket.dtype != math:
        wide = [p.to(math) for p in params]
        wide_states = [[t.to(math) for t in ts] if bucket.state_dtype != math else ts for ts in states]
        kernel(wide, directions, *wide_states)
        torch._foreach_copy_(params, wide)
        for ts, wide_ts in zip(states, wide_states):
            if wide_ts is not ts:
                torch._foreach_copy_(ts, wide_ts)
    else:
        kernel(params, directions, *states)
    copy_back(staged)


def combine(bucket: TensorBucket, coefficients: Tensor, layouts: list[Tensor]) -> list[Tensor]:
    """The bargained direction per tensor, ``d = Σ_k c_k (s_k g_k)`` in player order, in the compute dtype.

    Allocates the directions (one gradient's worth, freed after the step) rather than
    writing into any gradient: callers may still hold references to them.  Each direction
    is laid out like the corresponding tensor of ``layouts``.
    """
    opm = compute_dtype(bucket.dtype)
    k = bucket.players
    c = coefficients.to(opm).unbind()
    scale, coefficient = c[k:], c[:k]
    out = []
    for i, tensor in enumerate(zip(*bucket.grads)):
        d = None
        for g, ck, sk in zip(tensor, coefficient, scale):
            if g is not None:
                term = (g.to(opm) * sk) * ck
                d = term if d is None else d.add_(term)
        if d.stride() != layouts[i].stride():
            d = torch.empty_like(layouts[i], dtype=opm).copy_(d)
        out.append(d)
    return out


def _adamw(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: AdamWHyper) -> None:
    steps = bucket.state("step")
    torch._foreach_add_(steps, 1)

    def kernel(params, directions, exp_avgs, exp_avg_sqs):
        torch._fused_adamw_(
            params,
            directions,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=hp.lr,
            beta1=hp.beta1,
            beta2=hp.beta2,
            weight_decay=hp.weight_decay,
            eps=hp.eps,
            amsgrad=False,
            maximize=hp.maximize,
            grad_scale=None,
            found_inf=skip,
        )

    _fused_step(bucket, coefficients, ("exp_avg", "exp_avg_sq"), kernel)
    torch._foreach_sub_(steps, [skip] * len(steps))


def _sgd(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: SGDHyper) -> None:
    has_momentum = hp.momentum != 0
    steps = bucket.state("step") if has_momentum else []
    if steps:
        torch._foreach_add_(steps, 1)

    def fused(params, directions, buffers, first):
        torch._fused_sgd_(
            params,
            directions,
            buffers,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
            lr=hp.lr,
            dampening=hp.dampening,
            nesterov=hp.nesterov,
            maximize=hp.maximize,
            is_first_step=first,
            grad_scale=None,
            found_inf=skip,
        )

    def kernel(params, directions, *buffers):
        buffers = buffers[0] if buffers else []
        if bucket.first_step or not has_momentum or hp.dampening == 0:
            # A count of 0 with a zero buffer needs no first-step branch when nothing is
            # dampened: momentum·0 + d is exactly d.
            fused(params, directions, buffers, bucket.first_step)
            return
        # Dampening, and whether a tensor is on its first step is a device fact: run both
        # rules and select per tensor (the oracle may be slow; the fused backends branch
        # in the kernel).
        first = [s == 1 for s in steps]
        p_first, b_first = [p.clone() for p in params], [b.clone() for b in buffers]
        fused(p_first, directions, b_first, True)
        fused(params, directions, buffers, False)
        for tensors, firsts in ((params, p_first), (buffers, b_first)):
            for t, t_first, f in zip(tensors, firsts, first):
                t.copy_(torch.where(f, t_first, t))

    _fused_step(bucket, coefficients, ("momentum_buffer",) if has_momentum else (), kernel)
    if steps:
        torch._foreach_sub_(steps, [skip] * len(steps))


_OPS = ops.register(name, _gram, _adamw, _sgd)
gram, adamw, sgd = _OPS.gram, _OPS.adamw, _OPS.sgd
