"""Plain-torch backend: the oracle every fused kernel is tested against.

Pass 1 (:meth:`gram`) accumulates ``(ff, fr, rr)`` in float64 so that every non-zero
gradient of any floating dtype has a non-zero square and 1e±20-scale gradients neither
overflow nor underflow.  Per-tensor partial sums are added in a fixed order, so the
result is deterministic.

Pass 2 forms ``d = c_f·(s_f·g_f) + c_r·(s_r·g_r)`` in fp32 (fp64 for fp64 gradients;
``s`` are the powers of two of :func:`.base.kernel_coefficients`), rounds it once to the
gradient dtype and hands it to torch's own fused AdamW / SGD kernels.  Those kernels *define*
"the same semantics as torch.optim.AdamW/SGD", and their ``found_inf`` argument skips a
step on the device, leaving every parameter and state untouched.

Both passes run as ``torch.library`` custom ops (:mod:`.ops`), like the fused backends':
traced by ``torch.compile``, torch's ``_fused_adamw_`` with a ``found_inf`` computed in the
graph fails functionalization (torch 2.14), so the passes stay opaque nodes here too.

fp32 states for bf16/fp16 params: torch's fused kernels need one dtype for a parameter and
its states, so the rule runs on fp32 copies of the parameters (exact widenings) with d
widened likewise, and each parameter is rounded back once: math in fp32, states stored in
fp32, the parameter rounded once, which is what the fused backends do in registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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


def _gram(forget: Sequence[Tensor | None], preserve: Sequence[Tensor | None], device) -> Tensor:
    """Return float64 ``[ff, fr, rr]`` over all pairs; ``None`` counts as a zero gradient.

    The summation order is spelled out, the C++ kernel's exactly (``csrc/munba_cpu.cpp``):
    each tensor in memory order, in chunks of ``GRAM_CHUNK`` elements; in a chunk, lane ``k``
    adds the products of elements ``i ≡ k (mod 8)`` one after another (a ``cumsum``, which
    torch evaluates sequentially), the 8 lanes fold pairwise, and the chunk sums are added
    in chunk order.  So the result depends on the tensor sizes alone, never on the thread
    count (``torch.dot`` splits its reduction over threads), and on the CPU it is bitwise
    the C++ backend's.  Slabs of a few chunks bound the float64 temporaries.
    """
    partials = [torch.zeros(1, 3, dtype=torch.float64, device=device)]  # C++ starts from 0.0 too
    for gf, gr in zip(forget, preserve):
        like = gf if gf is not None else gr
        if like is None or like.numel() == 0:
            continue
        if not base.is_dense(like):
            like = like.contiguous()
        f, r = (None if g is None else _in_memory_order(g, like) for g in (gf, gr))
        slab = GRAM_CHUNK * _SLAB_CHUNKS
        for start in range(0, like.numel(), slab):
            fs, rs = (None if g is None else g[start : start + slab].to(torch.float64) for g in (f, r))
            partials.append(_chunk_sums(fs, rs))
    return torch.cat(partials).cumsum(0)[-1].clone()  # its own storage, as the fake result


def _in_memory_order(g: Tensor, like: Tensor) -> Tensor:
    """``g``'s elements as a flat tensor, in the memory order of the dense tensor ``like``."""
    if not (base.is_dense(g) and g.stride() == like.stride()):
        g = torch.empty_like(like, dtype=g.dtype).copy_(g)
    return g.as_strided((g.numel(),), (1,))


def _chunk_sums(f: Tensor | None, r: Tensor | None) -> Tensor:
    """``[n_chunks, 3]`` chunk sums of f·f, f·r, r·r (``None`` = zeros) in the C++ order."""
    present = f if f is not None else r
    n = present.numel()
    chunks = -(-n // GRAM_CHUNK)
    pad = chunks * GRAM_CHUNK - n  # zeros added to a lane change no sum

    def lanes(x: Tensor | None, y: Tensor | None) -> Tensor:
        if x is None or y is None:
            return torch.zeros(chunks, GRAM_LANES, dtype=torch.float64, device=present.device)
        products = torch.nn.functional.pad(x * y, (0, pad)).view(chunks, -1, GRAM_LANES)
        return products.cumsum(1)[:, -1]

    sums = []
    for x in (lanes(f, f), lanes(f, r), lanes(r, r)):
        sums.append(((x[:, 0] + x[:, 1]) + (x[:, 2] + x[:, 3])) + ((x[:, 4] + x[:, 5]) + (x[:, 6] + x[:, 7])))
    return torch.stack(sums, dim=1)


def _fused_step(bucket: TensorBucket, coefficients: Tensor, state_keys: tuple[str, ...], kernel) -> None:
    """Form d and run ``kernel(params, directions, *state_lists)`` (one of torch's fused ops).

    torch's fused kernels pair the elements of p, d and the states in *memory order*: d is
    allocated in the parameter's layout, and odd layouts are staged (see
    :func:`.base.stage_for_linear_walk`).
    """
    params, states, staged = stage_for_linear_walk(bucket, state_keys)
    directions = combine(bucket, coefficients, layouts=params)
    if bucket.state_dtype != bucket.dtype:
        wide = [p.to(bucket.state_dtype) for p in params]
        kernel(wide, [d.to(bucket.state_dtype) for d in directions], *states)
        torch._foreach_copy_(params, wide)
    else:
        kernel(params, directions, *states)
    copy_back(staged)


def combine(bucket: TensorBucket, coefficients: Tensor, layouts: list[Tensor]) -> list[Tensor]:
    """The bargained direction per tensor, ``d = c_f (s_f g_f) + c_r (s_r g_r)``, in the gradient dtype.

    Allocates the directions (one gradient's worth, freed after the step) rather than
    writing into any gradient: callers may still hold references to them.  Each direction
    is laid out like the corresponding tensor of ``layouts``.
    """
    opm = compute_dtype(bucket.dtype)
    c_f, c_r, s_f, s_r = coefficients.to(opm).unbind()
    out = []
    for i, (gf, gr) in enumerate(zip(bucket.forget, bucket.preserve)):
        terms = [(g.to(opm) * s) * c for g, c, s in ((gf, c_f, s_f), (gr, c_r, s_r)) if g is not None]
        d = terms[0] if len(terms) == 1 else terms[0].add_(terms[1])
        if d.stride() != layouts[i].stride():
            d = torch.empty_like(layouts[i], dtype=bucket.dtype).copy_(d)
        out.append(d.to(bucket.dtype))
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
