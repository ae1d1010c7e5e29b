"""Chunk tables for the multi-tensor Triton kernels (the idea of apex's ``multi_tensor_apply``).

One launch covers every tensor of a (device, dtype) group, however many there are:

* a *tensor table*, int64 ``[n_tensors, n_cols]``: per tensor the ``data_ptr()`` of each
  operand (0 marks a missing one, e.g. an absent gradient) and, in the last column, the
  element count;
* a *chunk table*, int64 ``[n_chunks, 2]``: ``(tensor index, first element)`` of each
  chunk of at most :data:`CHUNK` elements.  Program ``i`` of the grid handles chunk ``i``.

Offsets are int64 all the way, so tensors with more than 2**31 elements are addressable.
Both tables travel in one host→device copy from pinned memory (``non_blocking``: the
host never waits for the device).  They are rebuilt on every call: building them costs
O(n_tensors) Python work and can never go stale when tensors are reallocated.

CUDA graphs: a copy issued while a stream is being captured is replayed from the same
pinned host buffer on every replay, so those buffers are kept alive for the life of the
process (:data:`_CAPTURED_HOST_BUFFERS`, a few hundred bytes per captured launch).  The
addresses in them are the captured tensors', which a graph keeps fixed by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Elements per program.  Big enough that per-program set-up (table loads, scalar math)
#: is negligible against 64K elements of streaming, small enough that a 1e8-element model
#: gives ~1500 programs to spread over 132 SMs.  Tests lower it to exercise chunking.
CHUNK = 1 << 16

try:
    import triton.language as tl

    TL_DTYPES = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }
except ImportError:  # the backend reports itself unavailable; nothing here is called
    TL_DTYPES = {}


#: Pinned host tables read by captured CUDA graphs (see the module docstring).
_CAPTURED_HOST_BUFFERS: list[Tensor] = []


@dataclass(frozen=True)
class Tables:
    tensors: Tensor  # int64 [n_tensors, n_cols] on the device
    chunks: Tensor  # int64 [n_chunks, 2] on the device
    n_chunks: int


def build(rows: list[list[int]], numels: list[int], device: torch.device) -> Tables:
    """Tables for tensors whose operand addresses are ``rows[i]`` and sizes ``numels[i]``."""
    numel = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (numel + CHUNK - 1) // CHUNK
    owner = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(len(owner)) - first_chunk[owner]) * CHUNK
    table = torch.tensor([[*r, n] for r, n in zip(rows, numels)], dtype=torch.int64)
    host = torch.cat([table.reshape(-1), torch.stack([owner, start], 1).reshape(-1)])
    if device.type == "cuda":
        # Pinned + non_blocking: an asynchronous copy; torch's caching host allocator keeps
        # the pinned block alive until the copy has run.
        host = host.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED_HOST_BUFFERS.append(host)  # every replay copies from it again
    flat = host.to(device, non_blocking=True)
    split = table.numel()
    return Tables(flat[:split].view(table.shape), flat[split:].view(-1, 2), len(owner))


def laid_out_like(g: Tensor, ref: Tensor) -> Tensor:
    """``g`` itself when it shares ``ref``'s memory layout, else a copy with that layout.

    Elementwise kernels walk operands in memory order, so every operand of one tensor must
    use the same strides for element ``k`` to mean the same index everywhere.  A copy (one
    extra read and write of ``g``) is the price for an unusual gradient layout.
    ``ref`` must be dense (:func:`.base.is_dense`).
    """
    if g.stride() == ref.stride():
        return g
    return torch.empty_like(ref, dtype=g.dtype).copy_(g)
