"""Test helper shared by the backend tests (also imported by ``triton_interpreted/``)."""

from munba_kernels.backends.base import TensorBucket


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
