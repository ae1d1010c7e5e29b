"""MUNBaOptimizer under DDP, FSDP2, HSDP and FSDP1 equals a single-process run.

Two gloo processes (torchrun, once per session) run ``tests/distributed_worker.py``; this
module recomputes every run in one process and compares.  A missing all-reduce of the Gram
partials moves the FSDP2 parameters by ~2e-2, summing over HSDP's replicas moves the SGD ones
by ~3e-2; the tolerance below is 1e-6 (the runs agree to ~3e-8, the order in which ranks
average gradients).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from munba_kernels import MUNBaOptimizer

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WRAPPERS = ("ddp", "fsdp2", "hsdp", "fsdp1", "fsdp2-resumed")
RUNS = [(w, b, k) for w in WRAPPERS for b in worker.BASES for k in worker.BACKENDS]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch was built without torch.distributed")
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(worker.__file__)), str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "results.pt")


@pytest.fixture(scope="module")
def single_process():
    cache = {}

    def run(base, backend):
        if (base, backend) not in cache:
            cache[base, backend] = worker.run_single(base, backend)
        return cache[base, backend]

    return run


@pytest.mark.parametrize("wrapper,base,backend", RUNS, ids=["-".join(r) for r in RUNS])
def test_two_ranks_match_one_process(distributed_results, single_process, wrapper, base, backend):
    expected = single_process(base, backend)
    got = dict(distributed_results[f"{wrapper}-{base}-{backend}"])
    collectives = got.pop("all-reduces per step", None)
    got.pop("hook hits", None)
    if collectives is not None:  # DDP has averaged the gradients: the Gram needs no collective
        assert collectives.tolist() == [0 if wrapper == "ddp" else 1] * worker.STEPS
    assert sorted(got) == sorted(expected)
    initial = worker.full_params(worker.make_model())
    for name in expected:
        assert not torch.equal(expected[name], initial[name])  # the run moved every tensor
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("base", list(worker.BASES))
@pytest.mark.parametrize("backend", worker.BACKENDS)
def test_fsdp2_gram_in_backward_gives_the_two_pass_bits(distributed_results, base, backend):
    """gram_in_backward=True under FSDP2: the hooks see the reduced DTensor shards, and the run
    is bitwise the two-pass FSDP2 run."""
    hooked = dict(distributed_results[f"fsdp2-hooks-{base}-{backend}"])
    two_pass = dict(distributed_results[f"fsdp2-{base}-{backend}"])
    hits = hooked.pop("hook hits")
    two_pass.pop("hook hits")
    for name, value in two_pass.items():
        assert torch.equal(hooked[name], value), name
    assert (hits == 6).all(), hits  # every sharded tensor's partials came from its hook


def test_ddp_refuses_gram_in_backward(distributed_results):
    assert "DDP and FSDP1 reduce gradients after" in distributed_results["ddp refuses gram_in_backward"]


@pytest.mark.parametrize("base", list(worker.BASES))
@pytest.mark.parametrize("backend", worker.BACKENDS)
def test_checkpoint_resume_continues_identically(distributed_results, base, backend):
    uninterrupted = distributed_results[f"fsdp2-{base}-{backend}"]
    resumed = distributed_results[f"fsdp2-resumed-{base}-{backend}"]
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


# ---------------------------------------------------------------- one process


def test_fsdp1_parameters_need_the_process_group():
    p = nn.Parameter(torch.zeros(3))
    p._fsdp_flattened = True  # what FullyShardedDataParallel marks its parameters with
    with pytest.raises(ValueError, match="gram_process_group"):
        MUNBaOptimizer([p])


@pytest.mark.parametrize("base", list(worker.BASES))
def test_dcp_state_dict_round_trip_into_a_fresh_optimizer(base):
    """torch.distributed.checkpoint initialises a fresh optimizer with a zero-lr step on
    zero gradients and no capture_forget(); the restored run must continue exactly."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = worker.make_model()
    opt = MUNBaOptimizer(model.parameters(), **worker.BASES[base])
    for step in range(2):
        worker.unlearning_step(model, opt, step, 0, 1)
    twin = copy.deepcopy(model)
    fresh = MUNBaOptimizer(twin.parameters(), **worker.BASES[base])
    set_optimizer_state_dict(twin, fresh, copy.deepcopy(get_optimizer_state_dict(model, opt)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    for step in range(2, worker.STEPS):
        worker.unlearning_step(model, opt, step, 0, 1)
        worker.unlearning_step(twin, fresh, step, 0, 1)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_step_without_forget_gradient_still_raises_on_a_fresh_optimizer():
    model = worker.make_model()
    opt = MUNBaOptimizer(model.parameters(), lr=1e-3)
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="capture_forget"):
        opt.step()


def test_preserve_gradients_written_into_forget_memory_are_refused():
    """DDP's gradient_as_bucket_view=True reuses one buffer for both backward passes."""
    p = nn.Parameter(torch.ones(4))
    opt = MUNBaOptimizer([p], lr=0.1)
    buffer = torch.zeros(8)
    p.grad = buffer[:4].fill_(1.0)
    opt.capture_forget()
    p.grad = buffer[4:].fill_(2.0)  # a different slice of the same persistent buffer
    with pytest.raises(RuntimeError, match="gradient_as_bucket_view"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4))


def test_distributed_step_benchmark_quick(tmp_path):
    """benchmarks/bench_distributed_step.py --quick: two spawned gloo ranks, FSDP2."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_distributed_step.py"
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--worlds", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    (row,) = json.loads(out.read_text())
    assert row["world"] == 2 and row["params"] > 0
    assert row["munba_ms"] > 0 and row["adamw_ms"] > 0
    assert "| 2 |" in proc.stdout
