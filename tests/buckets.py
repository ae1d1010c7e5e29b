"""Test helpers shared by the backend tests (also imported by ``triton_interpreted/``)."""

import torch

from munba_kernels.backends.base import TensorBucket, compute_dtype, kernel_coefficients


def coefficients_for(c, dtype, device="cpu"):
    """The update pass's ``[c_f, c_r, s_f, s_r]`` for bargain coefficients ``c`` and ``dtype`` params."""
    return kernel_coefficients(torch.as_tensor(c, dtype=torch.float64, device=device), compute_dtype(dtype))


def sgd_state(buffer, first_step):
    """An SGD-with-momentum state: the buffer and its step count (0 before the first step)."""
    count = 0.0 if first_step else 3.0
    return {"momentum_buffer": buffer, "step": torch.tensor(count, device=buffer.device)}


def clone_bucket(bucket, dtype=None):
    """A deep copy (optionally cast to ``dtype``): params and states cloned, gradients cast."""

    def cast(t):
        return None if t is None else t.clone() if dtype is None else t.to(dtype, copy=True)

    return TensorBucket(
        params=[cast(p) for p in bucket.params],
        forget=[cast(g) for g in bucket.forget],
        preserve=[cast(g) for g in bucket.preserve],
        states=[{k: (v.clone() if k == "step" else cast(v)) for k, v in s.items()} for s in bucket.states],
        first_step=bucket.first_step,
    )
