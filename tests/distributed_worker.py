"""Multi-process runs for tests/test_distributed.py (launched by torchrun, not collected by pytest).

Every run unlearns the same small model on the same data: a forget batch and a retain batch
per step, split evenly over the ranks.  The losses are means over the local batch and
DDP/FSDP2 average gradients across ranks, so each rank sees the single-process full-batch
gradient and every wrapping must reproduce :func:`run_single` within float tolerance.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT_DIR

writes ``OUT_DIR/results.pt`` (rank 0): ``{run name: {param name: full tensor}}``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from munba_kernels import MUNBaOptimizer

STEPS = 4
BATCH = 8  # per step, split over the ranks
# (base, optimizer keyword arguments): SGD with momentum and a clip exercises the momentum
# buffer's first step and the clip; AdamW the step counters.
BASES = {
    "adamw": dict(base="adamw", lr=1e-2, weight_decay=1e-2),
    "sgd": dict(base="sgd", lr=5e-2, momentum=0.9, weight_decay=5e-4, max_grad_norm=1.0),
    # three players (the K-general Gram: six partials in the one all-reduce, Newton's α)
    "adamw-3players": dict(
        base="adamw", lr=1e-2, players=("forget", "neighbour", "preserve"), bargaining_power=(1.0, 0.5, 2.0)
    ),
}
BACKENDS = ("cpp", "torch")


def make_model() -> nn.Module:
    """Uneven shard sizes on 2 ranks (7 → 4 + 3 rows) and an empty shard (1 row → 1 + 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def batches(step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    xf, xr = torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 6, generator=gen)
    return (xf, torch.randn(BATCH, 1, generator=gen)), (xr, torch.randn(BATCH, 1, generator=gen))


def unlearning_step(model: nn.Module, opt: MUNBaOptimizer, step: int, rank: int, world: int) -> int:
    """One forget + preserve step on this rank's half of the batches; returns the all-reduces
    ``opt.step()`` issued."""
    (xf, yf), (xr, yr) = batches(step)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss_f = -nn.functional.mse_loss(model(xf[part]), yf[part])  # ascend on the forget batch
    loss_f.backward()
    opt.capture(opt.players[0])
    if len(opt.players) == 3:  # a third objective: an L1 fit of the preserve batch to 0.5·y
        nn.functional.l1_loss(model(xr[part]), 0.5 * yr[part]).backward()
        opt.capture(opt.players[1])
    nn.functional.mse_loss(model(xr[part]), yr[part]).backward()
    with CountCollectives() as collectives:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return collectives.calls


class CountCollectives:
    """Counts the all-reduces issued through torch.distributed while active."""

    def __enter__(self):
        self.calls, self._original = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    if isinstance(model, FSDP1):
        with FSDP1.summon_full_params(model):
            return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in full_params(model.module).items()}
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "")] = full.detach().clone()
    return out


def run_single(base: str, backend: str) -> dict[str, torch.Tensor]:
    """The reference: one process, full batches."""
    model = make_model()
    opt = MUNBaOptimizer(model.parameters(), backend=backend, **BASES[base])
    for step in range(STEPS):
        unlearning_step(model, opt, step, 0, 1)
    return full_params(model)


def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        return FSDP1(model, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # HSDP: the ranks are two replicas of a one-way shard, so the Gram must not be summed
    # over them (that would double it).
    shape = (dist.get_world_size(), 1) if wrapper == "hsdp" else (1, dist.get_world_size())
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    if wrapper == "fsdp2":
        mesh = mesh["shard"]
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run_wrapped(
    wrapper: str, base: str, backend: str, rank: int, world: int, gram_in_backward: bool = False
) -> dict[str, torch.Tensor]:
    model = _wrap(make_model(), wrapper)
    group = dict(gram_process_group=model.process_group) if wrapper == "fsdp1" else {}
    opt = MUNBaOptimizer(
        model.parameters(), backend=backend, gram_in_backward=gram_in_backward, **BASES[base], **group
    )
    calls, hits = [], []
    for step in range(STEPS):
        calls.append(unlearning_step(model, opt, step, rank, world))
        hits.append(opt._backward_gram.hits if gram_in_backward else 0)
    return {**full_params(model), "all-reduces per step": torch.tensor(calls), "hook hits": torch.tensor(hits)}


def ddp_refuses_gram_in_backward() -> str:
    """Under DDP the hooks would see unreduced gradients: the constructor must refuse."""
    model = _wrap(make_model(), "ddp")
    try:
        MUNBaOptimizer(model.parameters(), gram_in_backward=True)
    except ValueError as err:
        return str(err)
    return ""


def run_resumed(base: str, backend: str, rank: int, world: int, split: int = 2) -> dict[str, torch.Tensor]:
    """FSDP2: checkpoint after ``split`` steps with torch.distributed.checkpoint, restore into
    a fresh model and optimizer, finish the run.  Must equal the uninterrupted run exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _wrap(make_model(), "fsdp2")
    opt = MUNBaOptimizer(model.parameters(), backend=backend, **BASES[base])
    for step in range(split):
        unlearning_step(model, opt, step, rank, world)
    path = [tempfile.mkdtemp(prefix="munba-dcp-")] if rank == 0 else [None]
    dist.broadcast_object_list(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path[0])

    model = _wrap(make_model(), "fsdp2")  # fresh weights: everything must come from the checkpoint
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    opt = MUNBaOptimizer(model.parameters(), backend=backend, **BASES[base])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path[0])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    for step in range(split, STEPS):
        unlearning_step(model, opt, step, rank, world)
    return full_params(model)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for base in BASES:
        for backend in BACKENDS:
            for wrapper in ("ddp", "fsdp2", "hsdp", "fsdp1"):
                results[f"{wrapper}-{base}-{backend}"] = run_wrapped(wrapper, base, backend, rank, world)
            results[f"fsdp2-resumed-{base}-{backend}"] = run_resumed(base, backend, rank, world)
            results[f"fsdp2-hooks-{base}-{backend}"] = run_wrapped("fsdp2", base, backend, rank, world, True)
    results["ddp refuses gram_in_backward"] = ddp_refuses_gram_in_backward()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
