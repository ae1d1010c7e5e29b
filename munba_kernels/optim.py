"""MUNBaOptimizer: a drop-in ``torch.optim.Optimizer`` that bargains between two losses.

One step, for the parameters of *all* groups:

    forget backward → capture_forget() moves .grad aside (no copy) → preserve backward
    → pass 1: Gram (ff, fr, rr) in float64 → α solved on the device (bargaining.py)
    → pass 2: d = α_f g_f + α_r g_r replaces the gradient in AdamW or SGD.

The optimizer owns the bookkeeping (groups, state); the rules it checks them against live
in ``validation.py``, the passes in ``backends/``.  A step validates everything it will
touch before it launches anything, so it either raises with nothing changed or runs to the
end.  Nothing in ``step()`` reads a device value on the host unless ``nonfinite="raise"``
asks for it (or on DCP's initialisation step, see :meth:`MUNBaOptimizer._is_dcp_initialisation`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor  # data-less: no storage to compare
from torch.optim import Optimizer

from . import backends, distributed, validation
from .backends.base import AdamWHyper, SGDHyper, TensorBucket, compute_dtype, kernel_coefficients
from .bargaining import DEFAULT_OPPOSITION_TOL, Bargain, BargainStatus, solve_bargain, validate_power

__all__ = ["MUNBaOptimizer"]

#: Optimizer-wide settings (one Gram, one bargain per step): pickled with the optimizer.
_SETTINGS = (
    "state_dtype",
    "gram_process_group",
    "capturable",
    "max_grad_norm",
    "bargaining_power",
    "opposition_tol",
    "nonfinite",
    "backend",
)


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
        bargaining_power: ``(w_f, w_r)``, each in [1e-150, 1e150]; α solves
            ``(GᵀG) α = w/α``.  Scaling either *loss* never changes d; changing the power
            does.  ‖d‖² = w_f + w_r, so the largest step (after ``max_grad_norm``) must fit
            the parameters' dtype (``validation.step_norm_limit``: 16 for float16).
        opposition_tol: ``1 + cos φ`` at or below which the gradients count as opposed
            and d = 0 (see :mod:`munba_kernels.bargaining` for every degenerate case).
        nonfinite: ``"skip"`` (default) skips the step on the device when a gradient
            holds NaN/Inf, leaving every parameter, state and step count untouched, and
            records ``BargainStatus.NONFINITE`` in :attr:`last_bargain` (float64 gradients
            too large or small for a float64 Gram: ``OUT_OF_RANGE``, skipped alike);
            ``"raise"`` raises ``FloatingPointError`` instead (one host read per step).
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

    ``zero_grad()`` also drops a captured forget gradient: it clears *all* gradients, so an
    iteration that never reached ``step()`` (an AMP scaler skipping it, an exception) leaves
    nothing behind for the next one.  ``state_dict()`` / ``load_state_dict()`` round-trip
    exactly and a loaded state is validated like constructor arguments (torch.optim.AdamW
    and SGD state dicts load too); ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)``
    give working copies.
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
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set)):
            param_group = {**param_group, "params": list(params)}  # a generator is read once
            validation.check_params(param_group["params"], f"param group {len(self.param_groups)}: ")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        """Everything about one group, as at construction (also run on loaded groups)."""
        where = f"param group {index}: " if index else ""
        if group["weight_decay"] is None:
            group["weight_decay"] = validation.ADAMW_DEFAULT_WEIGHT_DECAY if group["base"] == "adamw" else 0.0
        validation.check_hyperparameters(group, where, read_tensor_lr=True)
        validation.check_params(group["params"], where)
        validation.check_step_norm(
            self.bargaining_power,
            self.max_grad_norm,
            # d is rounded to the parameter dtype and stored in the state dtype: both must hold it
            (dtype for p in group["params"] for dtype in (p.dtype, self._state_dtype_for(p))),
        )
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and drops a captured forget gradient too (it is a gradient)."""
        super().zero_grad(set_to_none)
        self._step_data["forget"] = None

    # ------------------------------------------------------------ forget grads
    def capture_forget(self) -> None:
        """Take every parameter's current ``.grad`` as the forget gradient.

        The tensors are moved, not copied: ``.grad`` is set to ``None`` so the next
        backward pass produces the preserve gradient.  Call exactly once per step;
        ``zero_grad()`` or ``discard_forget()`` drop a capture that will not be stepped.
        """
        if self._step_data["forget"] is not None:
            raise RuntimeError(
                "capture_forget() was already called for this step: call step() first, "
                "or zero_grad() / discard_forget() to drop the captured forget gradient"
            )
        captured: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _check_grad(p, p.grad, "forget")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    captured[p] = p.grad
                    p.grad = None
        self._step_data["forget"] = captured

    def discard_forget(self) -> None:
        """Drop a captured forget gradient without stepping."""
        self._step_data["forget"] = None

    @contextlib.contextmanager
    def forget_gradients(self):
        """Inside this block ``.grad`` *is* the forget gradient; outside, the preserve gradient.

        Entering swaps every parameter's ``.grad`` for the forget gradient captured so far
        (none the first time), leaving it, swaps back: so backward passes inside accumulate
        into the forget gradient and those outside into the preserve gradient, in any
        interleaving and without a copy.  This is gradient accumulation for two players::

            for micro_batch in micro_batches:            # e.g. gradient_accumulation_steps
                with opt.forget_gradients():
                    forget_loss(micro_batch).backward()
                preserve_loss(micro_batch).backward()
            opt.step(); opt.zero_grad()

        ``capture_forget()`` is the one-shot spelling (``.grad`` so far becomes the forget
        gradient); a capture made either way is stepped, or dropped by ``zero_grad()``.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        forget = self._step_data["forget"] or {}
        preserve = {p: p.grad for p in params if p.grad is not None}
        for p in params:
            p.grad = forget.get(p)
        try:
            yield self
        finally:
            captured = {p: p.grad for p in params if p.grad is not None}
            for p in params:
                p.grad = preserve.get(p)
        for p, g in captured.items():
            _check_grad(p, g, "forget")
        self._step_data["forget"] = captured

    def captured_forget_gradients(self) -> list[Tensor]:
        """The captured forget gradients (empty before a capture), e.g. for a loss scaler's
        inf check: they are not in ``.grad``, where torch's ``GradScaler`` looks."""
        forget = self._step_data["forget"]
        return [] if forget is None else list(forget.values())

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[Tensor, Tensor]] | None = None):
        """One bargained step.  Returns ``(forget_loss, preserve_loss)`` when given a closure.

        Everything the step will touch is validated first (groups, gradients, states); an
        error leaves every parameter, state and step count as it was, and keeps the capture.
        """
        losses = None
        if closure is not None:
            losses = self._backward_from_closure(closure)
        forget = self._step_data["forget"]
        if forget is None and self._is_dcp_initialisation():
            forget = {}  # torch.distributed.checkpoint's zero-lr step on zero gradients
        if forget is None:
            raise RuntimeError(
                "step() needs the forget gradient first: run loss_f.backward(); "
                "opt.capture_forget(); loss_r.backward(); opt.step(), or pass a closure "
                "returning (forget_loss, preserve_loss) (zero_grad() also drops a capture)"
            )
        device = self._check_single_device()
        if device is None:
            self._step_data["forget"] = None
            return losses
        per_group = self._present_tensors(forget)
        _check_not_aliased(forget.values(), [gr for _, _, present in per_group for _, _, gr in present])
        backend = backends.resolve(self.backend, device)
        self._validate_step(per_group)
        self._step_data["forget"] = None

        gram, flags = self._global_gram(backend, device, [t for _, _, present in per_group for t in present])
        bargain = solve_bargain(
            gram,
            self.bargaining_power,
            opposition_tol=self.opposition_tol,
            max_norm=self.max_grad_norm,
            gradient_flags=flags,
        )
        self._step_data["bargain"] = bargain
        if self.nonfinite == "raise" and bool(bargain.skipped):
            raise FloatingPointError(_skip_message(bargain))
        skip = bargain.skipped.to(torch.float32)
        coefficients: dict[torch.dtype, Tensor] = {}
        for update, hp, buckets in self._launches(per_group, backend):
            for bucket in buckets:
                math_dtype = compute_dtype(bucket.dtype)
                if math_dtype not in coefficients:
                    coefficients[math_dtype] = kernel_coefficients(bargain.coefficients, math_dtype)
                update(bucket, coefficients[math_dtype], skip, hp)
        return losses

    def _present_tensors(self, forget: dict[Tensor, Tensor]) -> list:
        """``(index, group, [(param, g_f, g_r), ...])`` for the parameters with any gradient."""
        per_group = []
        for index, group in enumerate(self.param_groups):
            present = []
            for p in group["params"]:
                gf, gr = forget.get(p), p.grad
                if gr is not None:
                    _check_grad(p, gr, "preserve")
                if gf is not None or gr is not None:
                    present.append((p, gf, gr))
            if present:
                per_group.append((index, group, present))
        return per_group

    def _validate_step(self, per_group: list) -> None:
        """The groups' settings and the existing states as they stand now (both may have been
        edited since they were last checked), before anything is created or updated."""
        for index, group, present in per_group:
            where = f"param group {index}: " if index else ""
            validation.check_hyperparameters(group, where)
            for p, _, _ in present:
                state = self.state.get(p)
                if state:
                    try:
                        validation.check_state(p, state, group, self._state_dtype_for(p))
                    except (ValueError, TypeError) as err:
                        i = next(i for i, q in enumerate(group["params"]) if q is p)
                        raise type(err)(f"param group {index}, params[{i}]: {err}; no parameter was updated") from None

    def _launches(self, per_group: list, backend) -> list:
        """``[(update, hyper, buckets), ...]``, creating the states that do not exist yet."""
        launches = []
        for _, group, present in per_group:
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
            launches.append((update, hp, self._buckets(group, present)))
        return launches

    def _global_gram(self, backend, device, triples: list) -> tuple[Tensor, Tensor | None]:
        """The Gram over all shards, and, when float64 gradients take part, the flags that
        tell zero and NaN/Inf gradients apart from a float64 Gram that under- or overflowed
        (:func:`~munba_kernels.bargaining.solve_bargain`).  Other dtypes square exactly into
        float64, so their Gram tells both by itself and costs nothing more."""
        if not any(p.dtype == torch.float64 for p, _, _ in triples):
            gram = distributed.global_gram(
                lambda forget, preserve: backend.gram(forget, preserve, device), triples, self.gram_process_group
            )
            return gram, None

        def gram_and_flags(forget: list, preserve: list) -> Tensor:
            pairs = list(zip(forget, preserve))
            wide = [pair for pair in pairs if _dtype_of(pair) == torch.float64]
            rest = [pair for pair in pairs if _dtype_of(pair) != torch.float64]
            total = torch.zeros(6, dtype=torch.float64, device=device)
            if rest:
                g = backend.gram([f for f, _ in rest], [r for _, r in rest], device)
                finite = torch.isfinite(g).all()
                total = total + torch.cat([g, torch.stack([g[0] > 0, g[2] > 0, ~finite]).to(torch.float64)])
            if wide:
                g = backend.gram([f for f, _ in wide], [r for _, r in wide], device)
                flags = []
                for grads in ([f for f, _ in wide], [r for _, r in wide]):
                    grads = [t for t in grads if t is not None and t.numel()]  # empty shards: nothing to see
                    amax = torch.stack(torch._foreach_norm(grads, math.inf)) if grads else torch.zeros(1)
                    flags.append(amax.to(device=device, dtype=torch.float64))
                nonzero = [(amax > 0).sum() for amax in flags]
                nonfinite = sum((~torch.isfinite(amax)).sum() for amax in flags)
                total = total + torch.cat([g, torch.stack([*nonzero, nonfinite]).to(torch.float64)])
            return total

        total = distributed.global_gram(gram_and_flags, triples, self.gram_process_group)
        return total[:3], total[3:]

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

    def _is_dcp_initialisation(self) -> bool:
        """Whether this step is the one ``torch.distributed.checkpoint`` takes on a fresh
        optimizer to create its states before loading them: no state yet, every lr 0, and
        every trainable parameter holding an all-zero ``.grad`` (DCP sets them).  The forget
        gradient is then taken as zero, which changes nothing but the step counters, as in
        torch's optimizers.  Checking the zeros reads the gradients on the host — only
        here, on a step that would otherwise be an error.  Any other step without
        ``capture_forget()`` (a scheduler warming up from lr 0, say) raises."""
        if self.state or any(float(group["lr"]) != 0 for group in self.param_groups):
            return False
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params or any(p.grad is None for p in params):
            return False
        return not any(bool(distributed.local_tensor(p.grad).any()) for p in params)

    def _buckets(self, group: dict[str, Any], present: list) -> list[TensorBucket]:
        """Initialise state lazily and split a group's tensors into fused-launch buckets."""
        buckets: dict[tuple, TensorBucket] = {}
        for p, gf, gr in present:
            state = self.state[p]
            first = not state
            if first:
                like = dict(memory_format=torch.preserve_format, dtype=self._state_dtype_for(p))
                keys = validation.expected_state_keys(group)
                if keys:
                    # The step count lives on the device, so a skipped step adds 0 without a sync.
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in keys:
                    if key != "step":
                        # For SGD: a zero buffer + a count of 0 is a first step: the kernel sets it to d.
                        state[key] = torch.zeros_like(p, **like)
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
        """As torch's, validated like constructor arguments, and all-or-nothing: a state dict
        with a wrong key, shape, dtype, hyperparameter or a non-finite moment raises and
        leaves this optimizer as it was.  torch.optim.AdamW / SGD state dicts load too
        (missing MUNBa keys keep this optimizer's values).  Floating states take this
        optimizer's state dtype (torch's would cast them to the parameter dtype, rounding
        fp32 moments of bf16 parameters)."""
        previous_state, previous_groups = self.state, self.param_groups
        previous_hyper = [{k: v for k, v in g.items() if k != "params"} for g in previous_groups]
        super().load_state_dict(state_dict)
        try:
            self._adopt_loaded(state_dict, previous_hyper)
        except Exception:
            self.state, self.param_groups = previous_state, previous_groups
            raise

    def _adopt_loaded(self, state_dict: dict[str, Any], previous_hyper: list[dict]) -> None:
        saved_state = state_dict["state"]
        known = {index for saved in state_dict["param_groups"] for index in saved["params"]}
        stray = sorted(set(saved_state) - known, key=str)
        if stray:
            raise ValueError(f"the loaded state has entries for parameters no group holds: {stray}")
        entries = []  # (key, tensor) pairs whose values are checked with one host read
        for index, (group, saved_group) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            where = f"loaded param group {index}: "
            validation.normalise_loaded_group(group, previous_hyper[index], where)
            self._validate_group(group, index)
            for i, (p, saved_index) in enumerate(zip(group["params"], saved_group["params"])):
                if p not in self.state:
                    continue
                st = validation.normalise_loaded_state(self.state[p], group, p, f"{where}params[{i}]: ")
                # Copies (copy=True): the kernels update states in place, which must never reach
                # the caller's state dict (torch's own load can alias tensors it does not cast).
                for key, value in saved_state.get(saved_index, {}).items():
                    if key == "step" and isinstance(value, Tensor):  # fused kernels keep the count on the device
                        st[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                    elif isinstance(value, Tensor) and value.is_floating_point():
                        st[key] = value.to(device=p.device, dtype=self._state_dtype_for(p), copy=True)
                    elif isinstance(value, Tensor):  # torch would quietly cast it to a float
                        raise TypeError(f"{where}params[{i}]: state[{key!r}] has non-floating dtype {value.dtype}")
                try:
                    validation.check_state(p, st, group, self._state_dtype_for(p))
                except (ValueError, TypeError) as err:
                    raise type(err)(f"{where}params[{i}]: {err}") from None
                self.state[p] = st
                entries.extend((k, distributed.local_tensor(v)) for k, v in st.items())
        if entries and not bool(validation.state_values_are_sound(entries)):
            raise ValueError(
                "the loaded state holds NaN/Inf moments or step counts, or a negative exp_avg_sq "
                "or step: it would corrupt every parameter it touches"
            )

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups: copies would lose the settings.
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in _SETTINGS})
        state["_step_data"] = self._step_data
        return state


def _dtype_of(pair: tuple[Tensor | None, Tensor | None]) -> torch.dtype:
    return (pair[0] if pair[0] is not None else pair[1]).dtype


def _skip_message(bargain: Bargain) -> str:
    entries = bargain.gram.tolist()
    if int(bargain.status) == BargainStatus.OUT_OF_RANGE:
        return (
            f"the float64 gradients are finite, but their Gram entries {entries} leave float64's "
            "range (gradient norms outside about [1.5e-154, 1.3e154]); no parameter was updated. "
            "Rescale the losses (the bargained direction does not depend on their scale)"
        )
    return f"a forget or preserve gradient holds NaN/Inf (Gram entries {entries}); no parameter was updated"


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
