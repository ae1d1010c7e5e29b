"""A plain training-loop helper for two-player unlearning (no ``transformers.Trainer`` needed).

:func:`two_player_step` is one optimizer step over any number of micro-batches: each micro-batch's
forget loss is back-propagated inside ``opt.forget_gradients()`` and its preserve loss outside, so
the two gradients accumulate separately; then ``opt.step()`` (through a loss scaler when given) and
``opt.zero_grad()``.  :func:`lm_unlearning_step` does the same for causal-LM batches with the
losses of :mod:`munba_kernels.integrations.lm` normalised over the whole window::

    opt = MUNBaOptimizer(model.parameters(), lr=1e-5, max_grad_norm=1.0)
    for window in windows:                       # lists of {"forget": batch, "retain": batch}
        losses = lm_unlearning_step(opt, model, window, forget_loss="npo", ref_model=ref)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import amp
from . import lm


def two_player_step(
    optimizer,
    micro_batches: Sequence,
    forget_fn: Callable[[object], Tensor],
    preserve_fn: Callable[[object], Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """One bargained step over ``micro_batches``; returns the window's summed losses.

    ``forget_fn(mb)`` / ``preserve_fn(mb)`` return this micro-batch's share of each player's loss
    (divide by the number of micro-batches, or by the window's token count, yourself).  ``scaler``
    should be a :class:`munba_kernels.amp.GradScaler` (a stock torch scaler gets a warning: it
    cannot see the forget gradient).  ``autocast``: a context factory for the forward passes, e.g.
    ``lambda: torch.autocast("cpu", torch.bfloat16)``.  The step is skipped when the scaler finds an
    Inf/NaN in either gradient; ``zero_grad()`` then drops the capture.
    """
    if not micro_batches:
        raise ValueError("two_player_step needs at least one micro-batch")
    if not hasattr(optimizer, "forget_gradients"):
        raise TypeError(f"two_player_step needs a MUNBaOptimizer, got {type(optimizer).__name__}")
    amp.warn_if_blind(scaler)
    ctx = autocast or contextlib.nullcontext
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    total_f = total_r = 0.0
    for mb in micro_batches:
        with optimizer.forget_gradients():
            with ctx():
                loss_f = forget_fn(mb)
            scale(loss_f).backward()
        with ctx():
            loss_r = preserve_fn(mb)
        scale(loss_r).backward()
        total_f, total_r = total_f + loss_f.detach(), total_r + loss_r.detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"forget_loss": float(total_f), "preserve_loss": float(total_r)}


def lm_unlearning_step(
    optimizer,
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Mapping[str, Tensor]]],
    *,
    forget_loss: str = "ga",
    preserve_loss: str = "nll",
    ref_model: nn.Module | None = None,
    npo_beta: float = 0.1,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    window: lm.Window | None = None,
) -> dict[str, float]:
    """:func:`two_player_step` for causal-LM micro-batches ``{"forget": batch, "retain": batch}``
    (tensors on the model's device), losses normalised over the window's scored tokens/sequences
    (``window``: other divisors, e.g. global ones when each data-parallel rank holds a share)."""
    lm.check_loss_names(forget_loss, preserve_loss)
    if lm.needs_reference(forget_loss, preserve_loss) and ref_model is None:
        raise ValueError(f"forget_loss={forget_loss!r} / preserve_loss={preserve_loss!r} need a ref_model")
    window = window or lm.Window.of(micro_batches)
    model.train()
    return two_player_step(
        optimizer,
        micro_batches,
        lambda mb: lm.forget_loss(
            forget_loss, model, mb["forget"], window, ref_model=ref_model, beta=npo_beta
        ),
        lambda mb: lm.preserve_loss(preserve_loss, model, mb["retain"], window, ref_model=ref_model),
        scaler=scaler,
        autocast=autocast,
    )
