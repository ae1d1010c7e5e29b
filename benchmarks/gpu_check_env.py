"""The env section of ``benchmarks/gpu_check.sh``: what machine this is, and whether the package
imports as a CUDA machine without a C++ build will import it.

Writes ``OUTDIR/env.json`` and prints ``HAS_CUDA=1`` or ``HAS_CUDA=0`` last (the script reads
it to decide which sections to run).  The C++ extension is blocked before ``munba_kernels`` is
imported, so the check holds whether or not a build left ``_C_cpu*.so`` in the checkout:
``import munba_kernels`` and ``backends.available()`` must work, and ``cpp`` must not be listed.

    python benchmarks/gpu_check_env.py OUTDIR
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("triton", "hypothesis", "torchvision", "diffusers", "transformers")


def main(out: Path) -> int:
    sys.modules["munba_kernels._C_cpu"] = None  # as on a machine where it was never built
    import torch

    import munba_kernels
    from munba_kernels import backends
    from munba_kernels.backends import cpp

    available = backends.available()
    assert "cpp" not in available and not cpp.is_available(), available
    has_cuda = torch.cuda.is_available()
    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda or "none (CPU build)",
        device=torch.cuda.get_device_name(0) if has_cuda else "no CUDA device",
        package=str(Path(munba_kernels.__file__).parent),
        cpp_extension="built in the checkout (blocked for this check)"
        if list((ROOT / "munba_kernels").glob("_C_cpu*.so"))
        else "not built",
        import_without_cpp=f"yes (cpp: {cpp.unavailable_reason()})",
        backends=", ".join(available),
        optional=", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'MISSING'}" for m in OPTIONAL),
        has_cuda=has_cuda,
    )
    if importlib.util.find_spec("triton"):
        import triton

        env["triton"] = triton.__version__
    if has_cuda:
        props = torch.cuda.get_device_properties(0)
        env["device"] += f" ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        from munba_kernels.backends import triton_backend

        env["triton_backend"] = triton_backend.unavailable_reason() or "available"
    (out / "env.json").write_text(json.dumps(env, indent=2))
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"HAS_CUDA={int(has_cuda)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_check_env.py OUTDIR")
    sys.exit(main(Path(sys.argv[1])))
