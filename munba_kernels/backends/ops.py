"""A backend's two passes as ``torch.library`` custom ops, so ``torch.compile`` can trace
code that runs them: each pass is one opaque node in the graph (dynamo never looks inside
the C++ or Triton launchers, nor into the reference's fused torch calls, which fail
functionalization), with a fake implementation that gives the Gram's shape and declares
which arguments the update mutates.  Fake implementations also let a step run under
``FakeTensorMode`` (no data, so any host read of a device value would raise).

The Triton passes are custom ops too, not ``triton_op`` + ``wrap_triton``: their kernels
read operand addresses from a pointer table (``data_ptr()``), which fake tensors do not
have, so the launcher cannot be traced, only called.

:func:`register` turns a backend's plain ``gram`` / ``adamw`` / ``sgd`` (the contract of
:mod:`.base`) into functions with the same signatures that call the ops.  Inside an op,
a tensor ``lr`` reaches the backend as it was given, so reading a CPU tensor lr is no graph
break, and a device lr is read by the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from .base import AdamWHyper, SGDHyper, TensorBucket

_GRAM = "(Tensor?[] forget, Tensor?[] preserve, Device device) -> Tensor"
_ADAMW = (
    "(Tensor(a!)[] params, Tensor?[] forget, Tensor?[] preserve, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor coefficients, Tensor skip, Tensor? lr_tensor, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()"
)
_SGD = (
    "(Tensor(a!)[] params, Tensor?[] forget, Tensor?[] preserve, Tensor(b!)[] momentum_buffers, "
    "Tensor(c!)[] steps, Tensor coefficients, Tensor skip, Tensor? lr_tensor, float lr, float momentum, float dampening, "
    "bool nesterov, float weight_decay, bool maximize, bool first_step) -> ()"
)


def _split_lr(lr: float | Tensor) -> tuple[Tensor | None, float]:
    return (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))


def register(name: str, gram: Callable, adamw: Callable, sgd: Callable) -> SimpleNamespace:
    """Define ``munba::{name}_gram``, ``munba::{name}_adamw`` and ``munba::{name}_sgd``.

    Returns a namespace with ``gram``, ``adamw`` and ``sgd`` that keep the backend contract's
    signatures and run through the ops.
    """

    @torch.library.custom_op(f"munba::{name}_gram", mutates_args=(), schema=_GRAM)
    def gram_op(forget, preserve, device):
        return gram(forget, preserve, device)

    @gram_op.register_fake
    def _(forget, preserve, device):
        return torch.empty(3, dtype=torch.float64, device=device)

    @torch.library.custom_op(
        f"munba::{name}_adamw", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"), schema=_ADAMW
    )
    def adamw_op(
        params, forget, preserve, exp_avgs, exp_avg_sqs, steps, coefficients, skip, lr_tensor, lr, *hp
    ):
        states = [dict(step=s, exp_avg=m, exp_avg_sq=v) for s, m, v in zip(steps, exp_avgs, exp_avg_sqs)]
        bucket = TensorBucket(params, forget, preserve, states)
        adamw(bucket, coefficients, skip, AdamWHyper(lr if lr_tensor is None else lr_tensor, *hp))

    @adamw_op.register_fake
    def _(*args):
        return None

    @torch.library.custom_op(
        f"munba::{name}_sgd", mutates_args=("params", "momentum_buffers", "steps"), schema=_SGD
    )
    def sgd_op(params, forget, preserve, momentum_buffers, steps, coefficients, skip, lr_tensor, lr, *hp_and_first):
        *hp, first_step = hp_and_first
        states = (
            [dict(momentum_buffer=b, step=s) for b, s in zip(momentum_buffers, steps)]
            if momentum_buffers
            else [{} for _ in params]
        )
        bucket = TensorBucket(params, forget, preserve, states, first_step)
        sgd(bucket, coefficients, skip, SGDHyper(lr if lr_tensor is None else lr_tensor, *hp))

    @sgd_op.register_fake
    def _(*args):
        return None

    def gram_via_op(forget, preserve, device) -> Tensor:
        return gram_op(list(forget), list(preserve), torch.device(device))

    def adamw_via_op(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: AdamWHyper) -> None:
        lr_tensor, lr = _split_lr(hp.lr)
        adamw_op(
            bucket.params,
            bucket.forget,
            bucket.preserve,
            bucket.state("exp_avg"),
            bucket.state("exp_avg_sq"),
            bucket.state("step"),
            coefficients,
            skip,
            lr_tensor,
            lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            hp.maximize,
        )

    def sgd_via_op(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp: SGDHyper) -> None:
        lr_tensor, lr = _split_lr(hp.lr)
        sgd_op(
            bucket.params,
            bucket.forget,
            bucket.preserve,
            bucket.state("momentum_buffer") if hp.momentum != 0 else [],
            bucket.state("step") if hp.momentum != 0 else [],
            coefficients,
            skip,
            lr_tensor,
            lr,
            hp.momentum,
            hp.dampening,
            hp.nesterov,
            hp.weight_decay,
            hp.maximize,
            bucket.first_step,
        )

    return SimpleNamespace(gram=gram_via_op, adamw=adamw_via_op, sgd=sgd_via_op)
