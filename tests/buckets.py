"""Test helpers shared by the backend tests (also imported by ``triton_interpreted/``)."""

import torch

from munba_kernels.backends.base import TensorBucket, compute_dtype, kernel_coefficients


def coefficients_for(c, dtype, device="cpu"):
    """The update pass's ``[c_1..c_K, s_1..s_K]`` for bargain coefficients ``c`` and ``dtype`` params."""
    return kernel_coefficients(torch.as_tensor(c, dtype=torch.float64, device=device), compute_dtype(dtype))


def sgd_state(buffer, first_step):
    """An SGD-with-momentum state: the buffer and its step count (0 before the first step)."""
    count = 0.0 if first_step else 3.0
    return {"momentum_buffer": buffer, "step": torch.tensor(count, device=buffer.device)}


def players_bucket(params, grads, states, first_step=False):
    """A bucket of ``len(grads)`` players (``grads[k][i]``: player k, tensor i) from
    per-parameter state dicts (the optimizer's layout)."""
    keys = list(states[0]) if states else []
    return TensorBucket(
        list(params), [list(g) for g in grads], {k: [s[k] for s in states] for k in keys}, first_step
    )


def bucket(params, forget, preserve, states, first_step=False):
    """A two-player bucket from per-parameter state dicts (the optimizer's layout)."""
    return players_bucket(params, [forget, preserve], states, first_step)


def float64_gram(grads):
    """The packed float64 Gram ``[g_i·g_j for i <= j]`` of ``grads[k][i]`` (None = zeros), row-major."""
    shapes = [next(g for g in tensor if g is not None).shape for tensor in zip(*grads)]
    flat = [
        torch.cat([(g.double().cpu() if g is not None else torch.zeros(s, dtype=torch.float64)).flatten() for g, s in zip(player, shapes)])
        for player in grads
    ]
    k = len(flat)
    return torch.stack([flat[i] @ flat[j] for i in range(k) for j in range(i, k)])


def per_param_states(b):
    """A bucket's states as one dict per parameter."""
    return [{k: values[i] for k, values in b.states.items()} for i in range(len(b.params))]


def clone_bucket(b, dtype=None):
    """A deep copy (optionally cast to ``dtype``): params and states cloned, gradients cast."""

    def cast(t):
        return None if t is None else t.clone() if dtype is None else t.to(dtype, copy=True)

    return TensorBucket(
        params=[cast(p) for p in b.params],
        grads=[[cast(g) for g in player] for player in b.grads],
        states={k: [(v.clone() if k == "step" else cast(v)) for v in values] for k, values in b.states.items()},
        first_step=b.first_step,
    )
