"""Gram partials during backward: the Gram pass folded into the live player's backward.

Without it a step reads every gradient twice: once for the Gram (pass 1), once for the
update (pass 2).  The live (last) player's gradient of a parameter is produced by autograd one
tensor at a time and is hot in cache at that moment, so a ``post_accumulate_grad`` hook
computes that tensor's Gram chunk partials then (the earlier players are captured by now).
``step()`` adds the per-tensor partials in tensor order, which is exactly the order and the
bits of the backend's own pass 1 (its chunks never span tensors; both add chunk sums in order
from 0.0), so the result is bit-identical to the two-pass step.

Only gradients exactly as the hook saw them are used: an entry holds the (local) gradients, so
their memory cannot be reused, and their storage, layout and version counters; a gradient
that was replaced or changed in place since (gradient accumulation's next micro-batch, a loss
scaler's unscale, a clip) is recomputed by the step.  So the hooks can only save work, never
change a result.

Where hooks would see the wrong gradients, they are refused: DDP (and FSDP1) reduce gradients
*after* autograd accumulates them, so a hook would see this rank's unreduced gradient;
:func:`check_supported` raises for plain parameters in a multi-process job.  FSDP2's DTensor
gradients are the reduced shards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import backends
from .distributed import local_tensor

#: Backends whose pass 1 can be split into per-tensor partials (eager, CPU).
SUPPORTED_BACKENDS = ("torch", "cpp")


def check_supported(params: Sequence[Tensor], gram_process_group) -> None:
    """Refuse a job where the hooks would see unreduced gradients (DDP, FSDP1)."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    plain = [p for p in params if not isinstance(p, DTensor)]
    if multi and (plain or gram_process_group is not None):
        raise ValueError(
            "gram_in_backward=True in a multi-process job needs FSDP2/HSDP (DTensor) parameters: "
            "DDP and FSDP1 reduce gradients after autograd accumulates them, so the hooks would see "
            "this rank's unreduced gradients; use gram_in_backward=False under DDP/FSDP1"
        )


class BackwardGram:
    """The hooks and the per-tensor partials they computed in the current step."""

    def __init__(self, optimizer, params: Sequence[Tensor]):
        self._optimizer = weakref.ref(optimizer)  # the hooks must not keep the optimizer alive
        self._entries: dict[Tensor, tuple[list, tuple, Tensor]] = {}
        self.hits = 0  # tensors of the last step whose partials came from the hooks (tests, benchmarks)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_accumulated) for p in params if p.requires_grad]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._entries = [], {}

    def clear(self) -> None:
        self._entries = {}

    def _on_accumulated(self, p: Tensor) -> None:
        opt = self._optimizer()
        if opt is None or torch.compiler.is_compiling():
            return
        captured = opt._step_data["captured"] or {}
        names = opt.players[:-1]
        if any(name not in captured for name in names) or p.grad is None:
            self._entries.pop(p, None)  # not the live player's backward: nothing to fold in yet
            return
        grads = (*(captured[name].get(p) for name in names), p.grad)
        local = [local_tensor(g) for g in grads]
        try:
            partials = self._partials(opt, local)
        except Exception:  # a bad gradient: the step's validation names it; nothing is cached
            self._entries.pop(p, None)
            return
        if partials is None:
            self._entries.pop(p, None)
            return
        self._entries[p] = (local, _fingerprints(local), partials)

    @staticmethod
    def _partials(opt, local: list[Tensor | None]) -> Tensor | None:
        like = local[-1]
        if like.dtype == torch.float64:
            return None  # float64 gradients take the step's flagged path
        backend = backends.resolve(opt.backend, like.device)
        if backend.name not in SUPPORTED_BACKENDS:  # (the constructor refuses others; "auto" resolves here)
            return None
        if any(g is not None and (g.shape != like.shape or g.dtype != like.dtype) for g in local):
            return None
        with torch.no_grad():
            return backend.gram_partials([[g] for g in local], like.device)

    def gram_function(self, backend, device, players: int) -> Callable | None:
        """A pass 1 for :func:`~munba_kernels.distributed.global_gram` that uses the hooks'
        partials where they are still valid and computes the rest; None if ``backend``
        cannot add partials (then the step runs its own pass 1)."""
        if backend.name not in SUPPORTED_BACKENDS:
            return None
        self.hits = 0

        def gram(entries: list[tuple[Tensor, tuple]]) -> Tensor:
            # global_gram's entries hold the local shards already
            cached = [self._entries.get(p) for p, _ in entries]
            valid = [e is not None and e[1] == _fingerprints(local) for e, (_, local) in zip(cached, entries)]
            if not any(valid):  # nothing to reuse: the backend's own pass 1, over all tensors at once
                return backend.gram([[grads[k] for _, grads in entries] for k in range(players)], device)
            parts = []
            for entry, ok, (_, local) in zip(cached, valid, entries):
                if ok:
                    parts.append(entry[2])
                    self.hits += 1
                elif any(g is not None and g.numel() for g in local):
                    parts.append(backend.gram_partials([[g] for g in local], device))
            return backend.sum_partials(torch.cat(parts))

        return gram


def _fingerprints(tensors: Sequence[Tensor | None]) -> tuple:
    """Where each tensor's data lives, its layout and its version counter: equal fingerprints of
    a tensor that an entry keeps alive mean the very same values."""
    return tuple(
        None
        if t is None
        else (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
        for t in tensors
    )
