"""The "never corrupt a model" scenarios (``tests/integrity_cases.py``) on the Triton backend.

Under TRITON_INTERPRET=1 on CPU tensors (``tests/test_backend_triton.py`` runs this directory
in a subprocess), or compiled on CUDA tensors where a GPU is visible.  Few hypothesis
examples and small tensors, because the interpreter is slow.
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip(
        "needs TRITON_INTERPRET=1 (tests/test_backend_triton.py runs this in a subprocess) or CUDA",
        allow_module_level=True,
    )
pytest.importorskip("hypothesis", reason="the scenarios draw with hypothesis (pip install hypothesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared scenarios
from integrity_cases import (  # noqa: E402
    FINITE,
    SGD_KW,
    corruption_case,
    direction_case,
    make,
    pair,
    probe,
    step,
)

from munba_kernels import BargainStatus  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# Triton's interpreter decodes bf16 subnormals as if they were normal (2**-126 too large:
# seen with triton 3.8; a GPU converts them exactly), so interpreted bf16 inputs stay normal.
INTERPRETABLE = {**FINITE, torch.bfloat16: (-110, FINITE[torch.bfloat16][1])}
RANGES = INTERPRETABLE if INTERPRETED else FINITE
QUICK = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@QUICK
@given(dtype=st.sampled_from(list(FINITE)), exp_f=st.floats(0, 1), exp_r=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_the_direction_is_finite_and_exact_over_each_dtypes_whole_finite_range(dtype, exp_f, exp_r, seed):
    direction_case("triton", dtype, exp_f, exp_r, seed, n=9, ranges=RANGES, device=DEVICE)


@QUICK
@given(data=st.data())
def test_random_corruptions_either_raise_untouched_or_leave_finite_consistent_parameters(data):
    corruption_case("triton", data.draw, device=DEVICE)


def test_fp32_gradients_below_the_normal_range_give_a_finite_exact_direction():
    gf, gr = pair(n=40)
    tiny_f, tiny_r = (gf * 1e-42).float(), (gr * 1e-40).float()
    d, status = probe(tiny_f, tiny_r, backend="triton", device=DEVICE)
    d_exact, _ = probe(tiny_f.double() / 1e-42, tiny_r.double() / 1e-40, dtype=torch.float64)
    assert status == BargainStatus.OK
    torch.testing.assert_close(d, d_exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [SGD_KW, dict(base="adamw")])
def test_a_skipped_first_step_leaves_no_trace(kwargs):
    params, opt = make("triton", shapes=((9, 4), (5,)), device=DEVICE, **kwargs)
    twins, clean = make("triton", shapes=((9, 4), (5,)), device=DEVICE, **kwargs)
    step(params, opt, seed=1, forget_poison=math.nan)
    assert opt.last_bargain.status.item() == BargainStatus.NONFINITE
    for s in (2, 3):
        step(params, opt, seed=s)
        step(twins, clean, seed=s)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
        for key, value in clean.state[b].items():
            assert torch.equal(opt.state[a][key], value), key
