"""pytest-benchmark sweep of one optimizer step over sizes × tensor counts × dtypes × variants.

pytest-benchmark times one callable to completion before the next, so true round-robin
interleaving (bench_optimizer_step.py's) is not possible here.  What it allows is done: every
variant of one configuration steps on the same tensors in the same process, the variants run
back to back (the variant is the innermost parameter, the configuration a module-scoped
fixture), and each variant takes one untimed warm-up round right before its timed rounds.
Compare ratios within one configuration, not absolute times across runs.
"""

import pytest
import torch
from bench_optimizer_step import StepInputs, build_steps, parse_variants, synchronizer


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def pytest_generate_tests(metafunc):
    option = metafunc.config.getoption
    configs = [
        (numel, tensors, dtype)
        for dtype in option("--step-dtypes").split(",")
        for tensors in _ints(option("--step-tensors"))
        for numel in _ints(option("--step-sizes"))
    ]
    ids = [f"{numel}-{tensors}t-{dtype}" for numel, tensors, dtype in configs]
    metafunc.parametrize("config", configs, ids=ids, indirect=True, scope="module")
    metafunc.parametrize("variant", parse_variants(option("--step-variants")))


@pytest.fixture(scope="module")
def config(request):
    numel, tensors, dtype = request.param
    option = request.config.getoption
    device = option("--step-device")
    print(f"\n[sweep] building {numel:,} {dtype} params in {tensors} tensors on {device}", flush=True)
    inputs = StepInputs(numel, tensors, getattr(torch, dtype), device)
    variants = parse_variants(option("--step-variants"))
    unavailable = {}
    if "plain-ops-compiled" in variants and tensors > option("--step-compile-max-tensors"):
        variants.remove("plain-ops-compiled")
        unavailable["plain-ops-compiled"] = f"not compiled: {tensors} tensors > --compile-max-tensors"
    steps, failed = build_steps(inputs, variants)
    unavailable.update(failed)
    info = dict(numel=numel, tensors=tensors, dtype=dtype, device=device, threads=torch.get_num_threads())
    yield dict(info=info, steps=steps, unavailable=unavailable, sync=synchronizer(device))
    del inputs, steps
    torch._dynamo.reset()  # this configuration's graphs never count against the next one's cache limit


def test_step(benchmark, request, config, variant):
    info = dict(config["info"], variant=variant)
    request.node.user_properties.append(("step", info))
    if variant in config["unavailable"]:
        pytest.skip(config["unavailable"][variant])
    step, sync = config["steps"][variant], config["sync"]

    def timed():
        step()
        sync()

    benchmark.group = f"{info['numel']} params, {info['tensors']} tensors, {info['dtype']}"
    benchmark.extra_info.update(info)
    rounds = request.config.getoption("--step-rounds")
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
