"""MUNBaOptimizer: a drop-in ``torch.optim.Optimizer`` that bargains between two losses.

One step, for the parameters of *all* groups:

    forget backward → capture_forget() moves .grad aside (no copy) → preserve backward
    → pass 1: Gram (ff, fr, rr) in float64 → α solved on the device (bargaining.py)
    → pass 2: d = α_f g_f + α_r g_r replaces the gradient in AdamW or SGD.

The optimizer owns the bookkeeping (groups, state, validation); the passes live in
``backends/``.  Nothing in ``step()`` reads a device value on the host unless
``nonfinite="raise"`` asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor  # data-less: no storage to compare
from torch.optim import Optimizer

from . import backends, distributed
from .backends.base import AdamWHyper, SGDHyper, TensorBucket
from .bargaining import DEFAULT_OPPOSITION_TOL, Bargain, solve_bargain, validate_power

__all__ = ["MUNBaOptimizer"]

_BASES = ("adamw", "sgd")
_ADAMW_DEFAULT_WEIGHT_DECAY = 1e-2  # as torch.optim.AdamW


class MUNBaOptimizer(Optimizer):
    """Nash-bargaining unlearning optimizer over a forget and a preserve objective.

    Usage::

        opt = MUNBaOptimizer(model.parameters(), lr=1e-4)        # AdamW base rule
        loss_f.backward(); opt.capture_forget()                  # forget gradient g_f
        loss_r.backward(); opt.step(); opt.zero_grad()           # preserve gradient g_r

    or ``opt.step(lambda: (forget_loss(), preserve_loss()))``, which runs both backward
    passes itself (the closure only computes the losses).

    The bargained direction ``d = α_f g_f + α_r g_r`` uses one Gram matrix over all
    parameters of all groups (a missing gradient counts as zero) and replaces the
    gradient in the base rule: ``base="adamw"`` has exactly torch.optim.AdamW's semantics
    (decoupled decay), ``base="sgd"`` torch.optim.SGD's (momentum, dampening, nesterov,
    L2 decay).  Per-group hyperparameters work as in torch.

    Args:
        lr, betas, eps, weight_decay, maximize: as in torch.optim.AdamW / SGD.
            ``weight_decay`` defaults to 1e-2 for AdamW and 0 for SGD.
        momentum, dampening, nesterov: SGD only, as in torch.optim.SGD.
        base: ``"adamw"`` or ``"sgd"`` (may differ per group).
        max_grad_norm: clip ``‖d‖`` to this value.  ``‖d‖`` is known from the Gram
            entries (``sqrt(w_f + w_r)`` when non-degenerate), so clipping costs no pass.
            The clip is exact (no ``+1e-6`` as in ``clip_grad_norm_``).
        bargaining_power: ``(w_f, w_r)``; α solves ``(GᵀG) α = w/α``.  Scaling either
            *loss* never changes d; changing the power does.
        opposition_tol: ``1 + cos φ`` at or below which the gradients count as opposed
            and d = 0 (see :mod:`munba_kernels.bargaining` for every degenerate case).
        nonfinite: ``"skip"`` (default) skips the step on the device when a gradient
            holds NaN/Inf, leaving every parameter and state untouched, and records
            ``BargainStatus.NONFINITE`` in :attr:`last_bargain`; ``"raise"`` raises
            ``FloatingPointError`` instead (this reads one flag on the host per step).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else plain torch),
            or ``"torch"``, ``"cpp"``, ``"triton"`` to force one.
        state_dtype: ``None`` (default) keeps ``exp_avg``/``exp_avg_sq``/``momentum_buffer``
            in the parameter dtype, as torch does; ``torch.float32`` keeps them in fp32 for
            bf16/fp16 parameters (fp32/fp64 parameters keep their own dtype), so small
            updates are not rounded away in bf16 moments.  Costs 2 B more per state element.
        capturable: as torch's: ``lr`` may be a 0-dim tensor on the parameters' device and
            ``step()`` never reads a device value on the host, so it can be captured in a
            CUDA graph.  ``step()`` already avoids host syncs unless ``nonfinite="raise"``,
            which is therefore rejected with ``capturable=True``.
        gram_process_group: the process group over which to sum the Gram partials of
            plain-tensor parameters that are shards of a larger whole (FSDP1:
            ``fsdp_model.process_group``).  Not needed for FSDP2 (DTensor parameters name
            their mesh), DDP or single-process training; see :mod:`munba_kernels.distributed`.

    Attributes:
        last_bargain: :class:`~munba_kernels.bargaining.Bargain` of the latest step
            (device tensors: alpha, cos, gram, status, direction_norm, clip_scale),
            or ``None`` before the first step.  Reading it does not synchronise.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        *,
        base: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        bargaining_power: tuple[float, float] = (1.0, 1.0),
        opposition_tol: float = DEFAULT_OPPOSITION_TOL,
        nonfinite: str = "skip",
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        gram_process_group: Any = None,
    ) -> None:
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        if not (isinstance(opposition_tol, (int, float)) and 0 <= opposition_tol < 2):
            raise ValueError(f"opposition_tol must be a number in [0, 2), got {opposition_tol!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"state_dtype must be None or torch.float32, got {state_dtype!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        if capturable and nonfinite == "raise":
            raise ValueError(
                "capturable=True cannot be combined with nonfinite='raise': raising reads the "
                "skip flag on the host every step; use nonfinite='skip' and read last_bargain.status"
            )
        self.state_dtype = state_dtype
        self.gram_process_group = gram_process_group
        self.capturable = capturable
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.bargaining_power = validate_power(bargaining_power)
        self.opposition_tol = float(opposition_tol)
        self.nonfinite = nonfinite
        self.backend = backends.validate_name(backend)
        # Per-step values live in a dict, not in attributes: torch.compile (2.14) drops
        # attribute writes made inside an Optimizer's step, but keeps dict mutations.
        self._step_data: dict[str, Any] = {"forget": None, "bargain": None}
        defaults = dict(
            lr=lr,
            base=base,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    @property
    def last_bargain(self) -> Bargain | None:
        return self._step_data["bargain"]

    @classmethod
    def paper_faithful(cls, params, lr: float = 0.01, **overrides) -> MUNBaOptimizer:
        """The published classification recipe: SGD, momentum 0.9, wd 5e-4, ‖d‖ clipped to 1.

        The official code clips the bargained gradient with ``clip_grad_norm_(…, 1.0)``;
        since ‖d‖ = √2 whenever the bargain is well defined, every step moves along the
        unit-norm bisector.  Unlike the official code, degenerate Gram matrices follow
        this package's policy instead of falling back to fixed weights (1, 0.1).
        """
        settings = dict(base="sgd", momentum=0.9, weight_decay=5e-4, max_grad_norm=1.0)
        settings.update(overrides)
        return cls(params, lr, **settings)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        base = group["base"]
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        if group["weight_decay"] is None:
            group["weight_decay"] = _ADAMW_DEFAULT_WEIGHT_DECAY if base == "adamw" else 0.0
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr as a tensor must have one element, got shape {tuple(lr.shape)}")
        elif not (isinstance(lr, (int, float)) and 0 <= lr < math.inf):
            raise ValueError(f"lr must be a non-negative finite number, got {lr!r}")
        wd = group["weight_decay"]
        if not (isinstance(wd, (int, float)) and 0 <= wd < math.inf):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {wd!r}")
        if base == "adamw":
            b1, b2 = group["betas"]
            if not (0 <= b1 < 1 and 0 <= b2 < 1):
                raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
            if not (0 <= group["eps"] < math.inf):
                raise ValueError(f"eps must be a non-negative finite number, got {group['eps']!r}")
            if group["momentum"] or group["dampening"] or group["nesterov"]:
                raise ValueError(
                    "momentum, dampening and nesterov apply to base='sgd' only (AdamW's momentum is betas[0])"
                )
        else:
            mom, damp = group["momentum"], group["dampening"]
            if not (0 <= mom < math.inf):
                raise ValueError(f"momentum must be a non-negative number, got {mom!r}")
            if not (0 <= damp <= 1):
                raise ValueError(f"dampening must lie in [0, 1], got {damp!r}")
            if group["nesterov"] and (mom <= 0 or damp != 0):
                raise ValueError("nesterov requires momentum > 0 and dampening == 0 (as torch.optim.SGD)")
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(
                    f"params[{i}] has complex dtype {p.dtype}: MUNBaOptimizer supports real "
                    "floating-point parameters only (view complex ones with torch.view_as_real)"
                )
            if not p.is_floating_point():
                raise TypeError(f"params[{i}] has non-floating dtype {p.dtype}")
        distributed.check_fsdp1(group["params"], self.gram_process_group)
        self._check_single_device()

    def _check_single_device(self) -> torch.device | None:
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(
                "parameters on mixed devices "
                f"({', '.join(sorted(map(str, devices)))}): the bargaining weights come from "
                "one Gram matrix over all parameters, so they must share one device"
            )
        return next(iter(devices), None)

    # ------------------------------------------------------------ forget grads
    def capture_forget(self) -> None:
        """Take every parameter's current ``.grad`` as the forget gradient.

        The tensors are moved, not copied: ``.grad`` is set to ``None`` so the next
        backward pass produces the preserve gradient.  Call exactly once per step.
        """
        if self._step_data["forget"] is not None:
            raise RuntimeError(
                "capture_forget() was already called for this step: call step() first, "
                "or discard_forget() to drop the captured forget gradient"
            )
        captured: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _check_grad(p, p.grad, "forget")
                    captured[p] = p.grad
                    p.grad = None
        self._step_data["forget"] = captured

    def discard_forget(self) -> None:
        """Drop a captured forget gradient without stepping."""
        self._step_data["forget"] = None

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[Tensor, Tensor]] | None = None):
        """One bargained step.  Returns ``(forget_loss, preserve_loss)`` when given a closure."""
        losses = None
        if closure is not None:
            losses = self._backward_from_closure(closure)
        forget = self._step_data["forget"]
        if forget is None and self._initialising_state():
            forget = {}  # torch.distributed.checkpoint's zero-lr step on zero gradients
        if forget is None:
            raise RuntimeError(
                "step() needs the forget gradient first: run loss_f.backward(); "
                "opt.capture_forget(); loss_r.backward(); opt.step(), or pass a closure "
                "returning (forget_loss, preserve_loss)"
            )
        self._step_data["forget"] = None
        device = self._check_single_device()
        if device is None:
            return losses

        per_group = []  # (group, [(param, g_f, g_r), ...]) for parameters with any gradient
        for group in self.param_groups:
            present = []
            for p in group["params"]:
                gf, gr = forget.get(p), p.grad
                if gr is not None:
                    _check_grad(p, gr, "preserve")
                if gf is not None or gr is not None:
                    present.append((p, gf, gr))
            if present:
                per_group.append((group, present))
        _check_not_aliased(forget.values(), [gr for _, present in per_group for _, _, gr in present])

        backend = backends.resolve(self.backend, device)
        gram = distributed.global_gram(
            lambda forget, preserve: backend.gram(forget, preserve, device),
            [triple for _, present in per_group for triple in present],
            self.gram_process_group,
        )
        bargain = solve_bargain(
            gram,
            self.bargaining_power,
            opposition_tol=self.opposition_tol,
            max_norm=self.max_grad_norm,
        )
        self._step_data["bargain"] = bargain
        if self.nonfinite == "raise" and bool(bargain.skipped):
            raise FloatingPointError(
                "a forget or preserve gradient holds NaN/Inf (Gram entries "
                f"{bargain.gram.tolist()}); no parameter was updated"
            )
        coefficients = bargain.coefficients
        skip = bargain.skipped.to(torch.float32)

        for group, present in per_group:
            if group["base"] == "adamw":
                b1, b2 = group["betas"]
                update = backend.adamw
                hp = AdamWHyper(group["lr"], b1, b2, group["eps"], group["weight_decay"], group["maximize"])
            else:
                update = backend.sgd
                hp = SGDHyper(
                    group["lr"],
                    group["momentum"],
                    group["dampening"],
                    group["nesterov"],
                    group["weight_decay"],
                    group["maximize"],
                )
            for bucket in self._buckets(group, present):
                update(bucket, coefficients, skip, hp)
        return losses

    def _backward_from_closure(self, closure) -> tuple[Tensor, Tensor]:
        if self._step_data["forget"] is not None:
            raise RuntimeError(
                "step(closure) runs both backward passes itself, but capture_forget() was "
                "already called: use one style or the other"
            )
        with torch.enable_grad():
            losses = closure()
            if not (isinstance(losses, (tuple, list)) and len(losses) == 2):
                raise TypeError(
                    f"the closure must return (forget_loss, preserve_loss), got {type(losses).__name__}"
                )
            forget_loss, preserve_loss = losses
            self.zero_grad(set_to_none=True)
            forget_loss.backward(retain_graph=True)  # the two losses may share a graph
            self.capture_forget()
            preserve_loss.backward()
        return forget_loss.detach(), preserve_loss.detach()

    def _initialising_state(self) -> bool:
        """Whether this is the zero-lr step ``torch.distributed.checkpoint`` takes on a fresh
        optimizer to create its states (before loading them): then the forget gradient is
        taken as zero, which makes the step change nothing but the step counters, as torch's
        optimizers do.  Any other step without ``capture_forget()`` is an error."""
        return not self.state and all(float(group["lr"]) == 0 for group in self.param_groups)

    def _buckets(self, group: dict[str, Any], present: list) -> list[TensorBucket]:
        """Initialise state lazily and split a group's tensors into fused-launch buckets."""
        buckets: dict[tuple, TensorBucket] = {}
        for p, gf, gr in present:
            state = self.state[p]
            first = not state
            if first:
                like = dict(memory_format=torch.preserve_format, dtype=self._state_dtype_for(p))
                if group["base"] == "adamw":
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, **like)
                    state["exp_avg_sq"] = torch.zeros_like(p, **like)
                elif group["momentum"] != 0:
                    # Zero buffer + is_first_step: the fused kernel sets it to d, as torch does.
                    state["momentum_buffer"] = torch.zeros_like(p, **like)
            moment = state.get("exp_avg", state.get("momentum_buffer"))
            key = (p.device, p.dtype, None if moment is None else moment.dtype, first and group["base"] == "sgd")
            bucket = buckets.setdefault(key, TensorBucket(first_step=key[3]))
            bucket.params.append(distributed.local_tensor(p))  # kernels update FSDP2 shards in place
            bucket.forget.append(distributed.local_tensor(gf))
            bucket.preserve.append(distributed.local_tensor(gr))
            bucket.states.append(distributed.local_state(state))
        return list(buckets.values())

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        low_precision = p.dtype in (torch.bfloat16, torch.float16)
        return self.state_dtype if self.state_dtype is not None and low_precision else p.dtype

    # --------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but floating states take this optimizer's state dtype (torch's would
        cast them to the parameter dtype, rounding fp32 moments of bf16 parameters)."""
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                st = self.state.get(p)
                for key, value in saved_state.get(index, {}).items():
                    if key == "step":  # fused kernels keep the step count on the device
                        st[key] = value.to(device=p.device, dtype=torch.float32)
                    elif isinstance(value, Tensor) and value.is_floating_point():
                        st[key] = value.to(device=p.device, dtype=self._state_dtype_for(p))


def _check_not_aliased(forget: Iterable[Tensor], preserve: Iterable[Tensor | None]) -> None:
    """Refuse preserve gradients written into the forget gradients' memory.

    The forget gradient is moved aside, not copied, so a framework that backs ``.grad`` with
    persistent buffers (DDP with ``gradient_as_bucket_view=True``, contiguous gradient
    buffers) overwrites it during the preserve backward.  Storage identity is host metadata:
    checking it costs no synchronisation.
    """

    def storages(grads):
        local = (distributed.local_tensor(g) for g in grads if g is not None)
        ptrs = (t.untyped_storage().data_ptr() for t in local if not isinstance(t, FakeTensor))
        return {ptr for ptr in ptrs if ptr}  # 0: meta or empty tensors, which hold no data

    if not torch.compiler.is_compiling() and storages(forget) & storages(preserve):
        raise RuntimeError(
            "the preserve gradients were written into the memory of the captured forget "
            "gradients, which are therefore lost; no parameter was updated. This happens when "
            ".grad is backed by persistent buffers, e.g. DistributedDataParallel(..., "
            "gradient_as_bucket_view=True): use gradient_as_bucket_view=False (the default)"
        )


def _check_grad(p: Tensor, g: Tensor, which: str) -> None:
    if g.is_sparse:
        raise RuntimeError(f"MUNBaOptimizer does not support sparse gradients ({which} gradient)")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(
            f"the {which} gradient of a parameter has shape/dtype/device "
            f"{tuple(g.shape)}/{g.dtype}/{g.device} but the parameter has "
            f"{tuple(p.shape)}/{p.dtype}/{p.device}"
        )
