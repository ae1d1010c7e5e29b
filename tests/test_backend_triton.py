"""The Triton backend: registry behaviour here, kernel checks in a subprocess.

Triton reads TRITON_INTERPRET when it is imported, and other tests in this process may
import it first (torch does so lazily), so the kernel tests in ``tests/triton_interpreted/``
run in a fresh interpreter with TRITON_INTERPRET=1: Triton's interpreter executes the
kernels on CPU tensors.  On a CUDA machine those tests also run natively in this process.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from munba_kernels import backends

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_never_raises_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "from munba_kernels.backends import triton_backend as t\n"
        "assert not t.is_available() and 'triton' in t.unavailable_reason(), t.unavailable_reason()\n"
        "from munba_kernels import backends\n"
        "assert 'triton' not in backends.available()\n"
    )
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_availability_follows_the_device():
    from munba_kernels.backends import triton_backend

    assert triton_backend.name == "triton"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert triton_backend.is_available() == (torch.cuda.is_available() or interpreted)
    assert triton_backend.supports(torch.device("cuda"))
    assert triton_backend.supports(torch.device("cpu")) == interpreted
    if not triton_backend.is_available():
        assert "TRITON_INTERPRET" in triton_backend.unavailable_reason()
        with pytest.raises(RuntimeError, match="triton"):
            backends.resolve("triton", torch.device("cpu"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_interpreted")],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"interpreted Triton tests failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    )
