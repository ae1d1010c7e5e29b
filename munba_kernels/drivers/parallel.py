"""Data-parallel and sharded unlearning for the drivers, launched with torchrun.

Every rank builds the same seeded batch plan and keeps its slice of each batch, so the
averaged gradients equal the full-batch ones; the model is wrapped with DDP or sharded with
FSDP2 (``fully_shard``).  Rank 0 holds the trained original model: its weights are
broadcast before wrapping, so the other ranks never train or read a cache.  The optimizer
needs nothing from here — :mod:`munba_kernels.distributed` finds the shards on its own.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    mode: str | None = None

    @property
    def lead(self) -> bool:
        """Rank 0 evaluates, prints and writes the outputs."""
        return self.rank == 0

    def local(self, batch):
        """This rank's share of a batch (``Subset``-like: ``x`` and ``y`` sliced alike)."""
        if self.world == 1 or batch is None:
            return batch
        return type(batch)(batch.x[self.rank :: self.world], batch.y[self.rank :: self.world])


SINGLE_PROCESS = Ranks()


def init(mode: str, device: str) -> tuple[Ranks, str]:
    """Join the torchrun job; returns the ranks and this process's device (one GPU per rank)."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if "RANK" not in os.environ:
        raise RuntimeError(
            f"--distributed {mode} needs to be launched by torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m munba_kernels.drivers.classify --distributed " + mode
        )
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), mode), device


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """Copy rank 0's weights to every rank, then wrap for data-parallel or sharded training.

    FSDP2 shards a copy, so ``model`` stays a plain module for :func:`unwrap` to fill.
    """
    if ranks.mode is None:
        return model
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    if ranks.mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    return fully_shard(copy.deepcopy(model))


def unwrap(wrapped: nn.Module, model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` (the module given to :func:`wrap`) holding the trained weights on every rank.

    For FSDP2 this gathers the shards: a collective every rank must call.
    """
    if ranks.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model.load_state_dict(get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True)))
    return model


def broadcast_mask(mask: torch.Tensor | None, n: int, ranks: Ranks) -> torch.Tensor | None:
    """Rank 0's boolean mask of length ``n`` on every rank (a forget set only rank 0 can pick)."""
    if ranks.mode is None:
        return mask
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    buf = (mask if ranks.lead else torch.zeros(n, dtype=torch.bool)).to(device, torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.bool().cpu()


def shutdown(ranks: Ranks) -> None:
    if ranks.mode is not None:
        dist.destroy_process_group()
