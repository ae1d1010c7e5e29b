"""What the optimizer checks before it trusts a setting, a param group or a state entry.

One home for every rule, so that constructor arguments, ``add_param_group``, a loaded
``state_dict`` and the groups and states as they stand at ``step()`` (both can be edited by
hand) are held to the same standard.  Every failure is a ``ValueError`` (``TypeError`` for
a wrong type) that names the setting, the group or the parameter, and what was wrong —
raised before any parameter, state or step counter changes.

The step-time checks (:func:`check_hyperparameters`, :func:`check_state`) look at host
metadata only (numbers, shapes, dtypes, devices), never at tensor values: they cost no
synchronisation.  Loading a state dict also checks values (finite moments, a non-negative
second moment), with one host read for the whole state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

BASES = ("adamw", "sgd")
ADAMW_DEFAULT_WEIGHT_DECAY = 1e-2  # as torch.optim.AdamW
#: The hyperparameters every group carries (the constructor's ``defaults``).
GROUP_KEYS = ("lr", "base", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "maximize")
#: State keys per base rule (SGD: only with momentum; ``step`` counts the steps taken).
STATE_KEYS = {"adamw": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("step", "momentum_buffer")}
#: Keys of torch.optim.AdamW / SGD groups that select an implementation, not a rule.
_TORCH_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _nonnegative_finite(x: Any) -> bool:
    return _number(x) and 0 <= x < math.inf


def check_lr(lr: Any, where: str, *, read_tensor: bool) -> None:
    """A non-negative finite lr.  A tensor lr's value is read only when ``read_tensor``
    (at construction or load, where one host read is acceptable; never at step time)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}lr as a tensor must have one element, got shape {tuple(lr.shape)}")
        if not (lr.is_floating_point() or lr.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{where}lr as a tensor must be real-valued, got dtype {lr.dtype}")
        if read_tensor and lr.device.type != "meta":
            value = float(lr)
            if not (0 <= value < math.inf):
                raise ValueError(f"{where}lr must be a non-negative finite number, got tensor({value})")
    elif not _nonnegative_finite(lr):
        raise ValueError(f"{where}lr must be a non-negative finite number, got {lr!r}")


def check_hyperparameters(group: dict[str, Any], where: str = "", *, read_tensor_lr: bool = False) -> None:
    """The rule's settings in one param group, as torch.optim.AdamW / SGD validate them."""
    missing = [key for key in GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"{where}param group lacks {missing}")
    base = group["base"]
    if base not in BASES:
        raise ValueError(f"{where}base must be one of {BASES}, got {base!r}")
    check_lr(group["lr"], where, read_tensor=read_tensor_lr)
    wd = group["weight_decay"]
    if not _nonnegative_finite(wd):
        raise ValueError(f"{where}weight_decay must be a non-negative finite number, got {wd!r}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"{where}maximize must be a bool, got {group['maximize']!r}")
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"{where}nesterov must be a bool, got {group['nesterov']!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_number, betas))):
        raise ValueError(f"{where}betas must be a pair of numbers (beta1, beta2), got {betas!r}")
    if not _nonnegative_finite(group["eps"]):
        raise ValueError(f"{where}eps must be a non-negative finite number, got {group['eps']!r}")
    mom, damp = group["momentum"], group["dampening"]
    if not _nonnegative_finite(mom):
        raise ValueError(f"{where}momentum must be a non-negative finite number, got {mom!r}")
    if not (_number(damp) and 0 <= damp <= 1):
        raise ValueError(f"{where}dampening must lie in [0, 1], got {damp!r}")
    if base == "adamw":
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"{where}betas must lie in [0, 1), got {tuple(betas)!r}")
        if mom or damp or group["nesterov"]:
            raise ValueError(
                f"{where}momentum, dampening and nesterov apply to base='sgd' only (AdamW's momentum is betas[0])"
            )
    elif group["nesterov"] and (mom <= 0 or damp != 0):
        raise ValueError(f"{where}nesterov requires momentum > 0 and dampening == 0 (as torch.optim.SGD)")


def check_params(params: list, where: str = "") -> None:
    """Real floating-point tensors, each at most once (it would count twice in the Gram)."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{where}params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(
                f"{where}params[{i}] has complex dtype {p.dtype}: MUNBaOptimizer supports real "
                "floating-point parameters only (view complex ones with torch.view_as_real)"
            )
        if not p.is_floating_point():
            raise TypeError(f"{where}params[{i}] has non-floating dtype {p.dtype}")
        if id(p) in seen:
            raise ValueError(
                f"{where}params[{i}] appears twice: its gradients would count twice in the bargaining "
                "Gram matrix; pass every parameter once (tied weights are one parameter)"
            )
        seen.add(id(p))


def step_norm_limit(dtype: torch.dtype) -> float:
    """The largest ‖d‖ a tensor of ``dtype`` (or its states) is trusted with: ``max**(1/4)``,
    so that ``d``, ``d²`` in AdamW's second moment and a momentum sum of ``d`` all stay
    far inside the range (float16: 16, bfloat16/float32: 4.3e9, float64: 1.2e77)."""
    return torch.finfo(dtype).max ** 0.25


def check_step_norm(
    power: tuple[float, float], max_grad_norm: float | None, dtypes: Iterable[torch.dtype]
) -> None:
    """‖d‖² = w_f + w_r (before the clip) must fit the narrowest dtype that holds d or a state."""
    norm = math.sqrt(power[0] + power[1])
    largest = norm if max_grad_norm is None else min(norm, max_grad_norm)
    for dtype in set(dtypes):
        limit = step_norm_limit(dtype)
        if largest > limit:
            knob = "bargaining_power" if max_grad_norm is None else "max_grad_norm (and bargaining_power)"
            raise ValueError(
                f"{knob}: the bargained step can reach ‖d‖ = {largest:.3g} (‖d‖² = w_f + w_r = "
                f"{power[0] + power[1]:.3g}{'' if max_grad_norm is None else f', clipped to {max_grad_norm:g}'}), "
                f"more than {dtype} parameters or states are trusted with ({limit:.3g}); lower the "
                "power (only the ratio w_f/w_r shapes the direction) or set max_grad_norm"
            )


def expected_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    if group["base"] == "sgd" and group["momentum"] == 0:
        return ()
    return STATE_KEYS[group["base"]]


def check_state(p: Tensor, state: dict, group: dict[str, Any], state_dtype: torch.dtype) -> None:
    """A parameter's state as the kernels need it: the right keys, the parameter's shape and
    device, ``state_dtype`` for the moments and a 0-dim float32 ``step`` (a [1, 1] count would broadcast a
    per-tensor first-step select into the wrong shape).  Metadata only,
    run for every parameter at every step: keep it cheap.  Messages name no location (the
    caller adds it)."""
    expected = expected_state_keys(group)
    if not (state and expected):  # SGD without momentum reads no state (a leftover buffer is ignored, as torch does)
        return
    if len(state) != len(expected) or any(key not in state for key in expected):
        raise ValueError(
            f"state has keys {sorted(state)}, but base={group['base']!r}"
            f"{' with momentum' if group['base'] == 'sgd' else ''} keeps {sorted(expected)}"
        )
    for key in expected:
        t = state[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"state[{key!r}] must be a tensor, got {type(t).__name__}")
        if t.device != p.device:
            raise ValueError(f"state[{key!r}] is on {t.device}, the parameter on {p.device}")
        if key == "step":
            if t.dim() != 0 or t.dtype != torch.float32:
                raise ValueError(
                    f"state['step'] must be a 0-dim float32 tensor, got {t.dtype} of shape {tuple(t.shape)}"
                )
        elif t.shape != p.shape or t.dtype != state_dtype:
            raise ValueError(
                f"state[{key!r}] has shape {tuple(t.shape)} and dtype {t.dtype}, but the parameter "
                f"needs shape {tuple(p.shape)} and dtype {state_dtype}"
            )


def normalise_loaded_group(group: dict[str, Any], previous: dict[str, Any], where: str) -> None:
    """Make a loaded group (ours, or torch.optim.AdamW / SGD's) a complete MUNBa group, in place.

    Keys it lacks take the values of the group it replaces; ``base`` is inferred from a torch
    group's keys (``betas``: AdamW, else ``momentum``: SGD) and must then agree with the
    replaced group's.  torch's implementation switches are dropped; settings this optimizer
    cannot honour (AMSGrad, Adam's coupled L2 decay) are refused.
    """
    if "base" not in group:
        inferred = "adamw" if "betas" in group else "sgd" if "momentum" in group else previous["base"]
        if inferred != previous["base"]:
            raise ValueError(
                f"{where}the loaded group is a torch.optim.{'AdamW' if inferred == 'adamw' else 'SGD'} "
                f"group, but this optimizer's group has base={previous['base']!r}"
            )
        group["base"] = inferred
    if group.pop("amsgrad", False):
        raise ValueError(f"{where}amsgrad=True is not supported by MUNBaOptimizer")
    decoupled = group.pop("decoupled_weight_decay", None)
    if decoupled is False and group["base"] == "adamw" and group.get("weight_decay", 0) != 0:
        raise ValueError(
            f"{where}the loaded group uses torch.optim.Adam's L2 weight decay; base='adamw' decays "
            "decoupled (as torch.optim.AdamW): set weight_decay=0 in the saved group or use AdamW's"
        )
    for key in _TORCH_IMPLEMENTATION_KEYS:
        group.pop(key, None)
    for key in GROUP_KEYS:
        group.setdefault(key, previous[key])
    if isinstance(group["betas"], list):
        group["betas"] = tuple(group["betas"])


def normalise_loaded_state(state: dict, group: dict[str, Any], p: Tensor, where: str) -> dict:
    """A loaded state in this optimizer's layout: torch SGD's ``momentum_buffer: None``
    dropped, a missing SGD ``step`` counted as 1 (a saved buffer means it has stepped), a
    Python-number ``step`` (older torch) made a tensor.  Keys are checked afterwards."""
    state = {k: v for k, v in state.items() if not (k == "momentum_buffer" and v is None)}
    if group["base"] == "sgd" and "momentum_buffer" in state and "step" not in state:
        state["step"] = torch.ones((), dtype=torch.float32, device=p.device)
    if "step" in state and _number(state["step"]):
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
    if state and "step" not in state and expected_state_keys(group):
        raise ValueError(f"{where}state lacks 'step'")
    return state


def state_values_are_sound(entries: list[tuple[str, Tensor]]) -> Tensor:
    """One boolean tensor: every moment finite, every second moment and step count >= 0."""
    flags = []
    for key, t in entries:
        ok = torch.isfinite(t).all()
        if key in ("exp_avg_sq", "step"):
            ok = ok & (t >= 0).all()
        flags.append(ok)
    return torch.stack(flags).all() if flags else torch.tensor(True)
