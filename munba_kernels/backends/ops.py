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
:mod:`.base`) into functions with the same signatures that call the ops.  The update ops'
schemas are generated from :data:`.base.RULES` (each rule's state keys and hyperparameter
fields), so a hyperparameter is declared once.  Gradients travel as one flat list,
player-major, with the player count beside it.  Inside an op, a tensor ``lr`` reaches the
backend as it was given, so reading a CPU tensor lr is no graph break, and a device lr is
read by the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from .base import RULES, TensorBucket

_GRAM = "(Tensor?[] grads, int players, Device device) -> Tensor"


def _update_schema(rule: str) -> str:
    spec = RULES[rule]
    states = ", ".join(f"Tensor({chr(ord('b') + i)}!)[] {key}" for i, key in enumerate(spec.state_keys))
    scalars = ", ".join(f"{kind.__name__} {name}" for name, kind in spec.scalars)
    return (
        f"(Tensor(a!)[] params, Tensor?[] grads, int players, {states}, Tensor coefficients, Tensor skip, "
        f"bool first_step, Tensor? lr_tensor, float lr, {scalars}) -> ()"
    )


def _split_lr(lr: float | Tensor) -> tuple[Tensor | None, float]:
    return (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))


def _flatten(grads: list[list[Tensor | None]]) -> list[Tensor | None]:
    return [g for player in grads for g in player]


def _unflatten(flat: list[Tensor | None], players: int) -> list[list[Tensor | None]]:
    n = len(flat) // players
    return [list(flat[k * n : (k + 1) * n]) for k in range(players)]


def gram_size(players: int) -> int:
    return players * (players + 1) // 2


def register(name: str, gram: Callable, adamw: Callable, sgd: Callable) -> SimpleNamespace:
    """Define ``munba::{name}_gram``, ``munba::{name}_adamw`` and ``munba::{name}_sgd``.

    Returns a namespace with ``gram``, ``adamw`` and ``sgd`` that keep the backend contract's
    signatures and run through the ops.
    """

    @torch.library.custom_op(f"munba::{name}_gram", mutates_args=(), schema=_GRAM)
    def gram_op(grads, players, device):
        return gram(_unflatten(grads, players), device)

    @gram_op.register_fake
    def _(grads, players, device):
        return torch.empty(gram_size(players), dtype=torch.float64, device=device)

    def update_op(rule: str, update: Callable):
        spec = RULES[rule]

        @torch.library.custom_op(
            f"munba::{name}_{rule}",
            mutates_args=("params", *spec.state_keys),
            schema=_update_schema(rule),
        )
        def op(params, grads, players, *args):
            k = len(spec.state_keys)
            state_lists, (coefficients, skip, first_step, lr_tensor, lr, *scalars) = args[:k], args[k:]
            states = {key: list(values) for key, values in zip(spec.state_keys, state_lists) if values}
            bucket = TensorBucket(params, _unflatten(grads, players), states, first_step)
            update(bucket, coefficients, skip, spec.hyper(lr if lr_tensor is None else lr_tensor, *scalars))

        @op.register_fake
        def _(*args):
            return None

        def via_op(bucket: TensorBucket, coefficients: Tensor, skip: Tensor, hp) -> None:
            lr_tensor, lr = _split_lr(hp.lr)
            op(
                bucket.params,
                _flatten(bucket.grads),
                bucket.players,
                *(bucket.state(key) for key in spec.state_keys),
                coefficients,
                skip,
                bucket.first_step,
                lr_tensor,
                lr,
                *(getattr(hp, field) for field, _ in spec.scalars),
            )

        return via_op

    def gram_via_op(grads, device) -> Tensor:
        return gram_op(_flatten([list(g) for g in grads]), len(grads), torch.device(device))

    return SimpleNamespace(gram=gram_via_op, adamw=update_op("adamw", adamw), sgd=update_op("sgd", sgd))
