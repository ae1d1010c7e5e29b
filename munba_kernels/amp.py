"""A loss scaler for fp16 training that sees the captured forget gradient.

``torch.amp.GradScaler`` unscales and inf-checks only ``.grad``.  With MUNBa, ``.grad`` holds the
preserve gradient at ``scaler.step(opt)`` time; the forget gradient sits in the optimizer's capture.
With the stock scaler a forget overflow is caught by the optimizer itself (``NONFINITE``: the step is
skipped on the device), but the scaler never learns of it, so the scale never backs off and every
later step overflows and is skipped as well.  :class:`GradScaler` adds
``optimizer.captured_gradients()`` (the forget gradient; every captured player for K > 2) to the
unscale and inf check, so the stock flow works::

    scaler = munba_kernels.amp.GradScaler("cuda")
    with opt.forget_gradients():
        scaler.scale(loss_f).backward()
    scaler.scale(loss_r).backward()
    scaler.step(opt)       # skipped when either gradient holds Inf/NaN
    scaler.update()        # ... and then the scale backs off
    opt.zero_grad()        # also drops the capture of a skipped step

Unscaling the forget gradient is only needed for the inf check: MUNBa's direction does not depend on
either gradient's scale.  It is done anyway, so ``unscale_`` leaves true gradients behind as torch's
contract says.  For optimizers without a capture this scaler behaves exactly like torch's.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch

__all__ = ["GradScaler", "cooperating_scaler", "warn_if_blind"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose unscale/inf check also covers MUNBa's captured gradients
    (every player but the live one: the forget gradient for two players)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        captured = getattr(optimizer, "captured_gradients", None)
        grads = captured() if callable(captured) else []
        if not grads:
            return per_device
        grouped: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for g in grads:
            if not allow_fp16 and g.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")  # torch's message for .grad
            grouped[g.device][g.dtype].append(g)
        with torch.no_grad():
            for device, per_dtype in grouped.items():
                # The scaler sums found_inf over devices; a device it has not seen gets its own flag.
                flag = per_device.get(device)
                if flag is None:
                    flag = per_device[device] = found_inf.to(device, copy=True)
                inv = inv_scale.to(device)
                for tensors in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, inv)
        return per_device

    @classmethod
    def from_torch(cls, scaler: torch.amp.GradScaler) -> GradScaler:
        """This class with ``scaler``'s settings and current state (scale, growth tracker)."""
        new = cls(
            scaler._device,
            init_scale=scaler._init_scale,
            growth_factor=scaler._growth_factor,
            backoff_factor=scaler._backoff_factor,
            growth_interval=scaler._growth_interval,
            enabled=scaler._enabled,
        )
        if scaler._enabled and scaler._scale is not None:
            new.load_state_dict(scaler.state_dict())
        return new


def cooperating_scaler(scaler):
    """``scaler`` as a :class:`GradScaler` when it is a plain ``torch.amp.GradScaler`` (or ``None``);
    any other scaler class (e.g. FSDP1's ``ShardedGradScaler``) is returned as is, with a warning."""
    if scaler is None or isinstance(scaler, GradScaler):
        return scaler
    if type(scaler) in (torch.amp.GradScaler, getattr(torch.cuda.amp, "GradScaler", None)):
        return GradScaler.from_torch(scaler)
    warn_if_blind(scaler)
    return scaler


_WARNED = False


def warn_if_blind(scaler) -> None:
    """Warn once when ``scaler`` cannot see a captured forget gradient (a stock torch scaler)."""
    global _WARNED
    if scaler is None or isinstance(scaler, GradScaler) or not getattr(scaler, "is_enabled", lambda: True)():
        return
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"{type(scaler).__module__}.{type(scaler).__name__} checks only .grad for Inf/NaN, not the "
            "captured forget gradient: after a forget-loss overflow its scale never backs off and every "
            "later step is skipped. Use munba_kernels.amp.GradScaler (GradScaler.from_torch(scaler)).",
            stacklevel=3,
        )
