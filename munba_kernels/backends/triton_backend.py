"""Triton backend: the two passes as multi-tensor Triton kernels.

* :mod:`.triton_gram`: Gram entries in float64, one launch per dtype plus one tiny
  deterministic reduction, no atomics.
* :mod:`.triton_update`: bargained direction + AdamW / SGD fused, one launch per bucket.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how the tests check it
on machines without a GPU.  Importing this module never fails: without triton the
backend reports itself unavailable.

Non-contiguous gradients are copied to their parameter's layout (one extra read and write
of that gradient); a parameter that is a gapped view, or whose states are laid out
differently, is updated through contiguous copies written back after the launch.
"""

from __future__ import annotations

import os

import torch

from . import ops

name = "triton"

try:
    from . import triton_gram, triton_update

    # Both passes as torch.library custom ops (see .ops), opaque to torch.compile.
    _OPS = ops.register(name, triton_gram.gram, triton_update.adamw, triton_update.sgd)
    _IMPORT_ERROR = ""
except ImportError as err:  # triton missing (or broken): report, never raise on import
    _IMPORT_ERROR = f"triton cannot be imported: {err}"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> str:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not (torch.cuda.is_available() or _interpreted()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels interpreted on the CPU)"
    return ""


def is_available() -> bool:
    return not unavailable_reason()


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreted())


def gram(grads, device):
    return _OPS.gram(grads, device)


def adamw(bucket, coefficients, skip, hp):
    _OPS.adamw(bucket, coefficients, skip, hp)


def sgd(bucket, coefficients, skip, hp):
    _OPS.sgd(bucket, coefficients, skip, hp)
