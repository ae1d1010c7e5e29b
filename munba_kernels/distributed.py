"""Sharded training: kernels see local shards, the Gram partials cross ranks in one all-reduce.

The bargaining weights need the *global* Gram matrix of the players' gradients.  Its entries
are sums over elements, so each rank computes them over the shards it holds and one
all-reduce of K(K+1)/2 float64 scalars (three for two players) completes them — per step, that is all the communication MUNBa
adds.  Everything else (the update pass, the optimizer states) stays local to the shard.

Which tensors are sharded, and over which ranks, is read from the parameters:

* **FSDP2** (``fully_shard``): parameters, gradients and states are DTensors.  Their mesh
  dimensions with a ``Shard`` placement name the process groups whose partials must be
  summed; ``Replicate`` dimensions (the replicas of HSDP) already hold identical sums and
  are not reduced.  States are created as DTensors like their parameters, so
  ``torch.distributed.checkpoint`` saves and reshards them.
* **DDP** and plain single-process training: gradients are whole (DDP has already averaged
  them), so no collective runs at all.
* **FSDP1** (``FullyShardedDataParallel``): parameters are flat local slices that carry no
  placement, so the process group must be given explicitly (``gram_process_group=``);
  without it the optimizer refuses FSDP1 parameters instead of bargaining on local sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["local_tensor", "global_gram", "check_fsdp1"]



def local_tensor(t: Tensor | None) -> Tensor | None:
    """The shard this rank holds (an alias, so in-place updates reach the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_state(state: dict) -> dict:
    """A view of a parameter's state dict with DTensor entries replaced by their local shards."""
    if not any(isinstance(v, DTensor) for v in state.values()):
        return state
    return {k: local_tensor(v) for k, v in state.items()}


def _shard_groups(p: Tensor) -> tuple:
    """The process groups over which the local shards of DTensor ``p`` differ."""
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"a parameter has placements {p.placements}: Partial (pending-reduction) parameters "
            "cannot be bargained over; redistribute them to Shard or Replicate"
        )
    mesh = p.device_mesh
    return tuple(mesh.get_group(dim) for dim, pl in enumerate(p.placements) if pl.is_shard())


def check_fsdp1(params: Sequence[Tensor], process_group) -> None:
    """Refuse FSDP1's flattened parameters unless the group to reduce over was given."""
    if process_group is None and any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(
            "these parameters are managed by FullyShardedDataParallel (FSDP1): each rank holds a "
            "flat slice, so the bargaining Gram must be summed across ranks. Pass "
            "gram_process_group=fsdp_model.process_group to MUNBaOptimizer, or use FSDP2 "
            "(torch.distributed.fsdp.fully_shard), whose DTensor parameters need no argument"
        )


def by_player(entries: Sequence[tuple[Tensor, tuple]], players: int) -> list[list]:
    """``grads[player][tensor]`` of ``[(param, (g_1, ..., g_K)), ...]``."""
    return [[grads[k] for _, grads in entries] for k in range(players)]


def global_gram(
    gram: Callable[[list[tuple[Tensor, tuple]]], Tensor],
    present: Sequence[tuple[Tensor, tuple[Tensor | None, ...]]],
    players: int,
    process_group=None,
) -> Tensor:
    """The packed Gram over the whole model from ``(param, (g_1, ..., g_K))`` of local shards.

    ``gram(entries)`` is the backend's pass 1 over ``[(param, (local g_1, ..., g_K)), ...]``
    (:func:`by_player` turns the entries into the backends' ``grads[player][tensor]``).  Sharded tensors
    (DTensors with a ``Shard`` placement, or every tensor when ``process_group`` is given)
    go through one pass whose result is all-reduced — K(K+1)/2 float64 scalars, whatever K —
    whole tensors through another, added afterwards, so replicated gradients are never
    counted once per rank.
    """
    sharded: list[tuple] = []
    whole: list[tuple] = []
    groups: set[tuple] = set()
    for p, grads in present:
        shard_groups = (process_group,) if process_group is not None else ()
        if isinstance(p, DTensor):
            shard_groups = _shard_groups(p)
        (sharded if shard_groups else whole).append((p, tuple(local_tensor(g) for g in grads)))
        if shard_groups:
            groups.add(shard_groups)
    if len(groups) > 1:
        raise ValueError(
            "parameters are sharded over different device meshes or mesh dimensions; one "
            "MUNBaOptimizer needs all sharded parameters on one mesh (create one per mesh)"
        )

    if not sharded:
        return gram(whole)
    total = gram(sharded)
    for group in next(iter(groups)):  # one all-reduce per sharded mesh dimension: one for FSDP2/HSDP
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if whole:
        total = total + gram(whole)
    return total
