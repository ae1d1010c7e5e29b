"""Options of the pytest-benchmark step sweep (benchmarks/test_bench_step.py).

Never collected by the default test suite (its testpaths is ``tests``); run it through
``python benchmarks/sweep.py``, which adds the JSON, Markdown and plot, or directly with
``pytest benchmarks/test_bench_step.py --benchmark-json out.json --step-sizes 1000000``.
"""

import torch
from bench_optimizer_step import VARIANTS


def pytest_addoption(parser):
    group = parser.getgroup("munba step sweep")
    group.addoption("--step-sizes", default="1000000,10000000,100000000", help="parameter counts, comma-separated")
    group.addoption("--step-tensors", default="10,200", help="tensor counts, comma-separated")
    group.addoption("--step-dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    group.addoption("--step-variants", default=",".join(VARIANTS), help="variants, comma-separated")
    group.addoption("--step-rounds", type=int, default=10, help="timed rounds per variant")
    group.addoption(
        "--step-compile-max-tensors",
        type=int,
        default=10,
        help="compile plain-ops only up to this many tensors (200 took over 10 min on 2 cores)",
    )
    group.addoption("--step-device", default="cuda" if torch.cuda.is_available() else "cpu")
