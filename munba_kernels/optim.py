"""MUNBaOptimizer: a drop-in ``torch.optim.Optimizer`` that bargains between K ≥ 2 losses.

One step, for the parameters of *all* groups (two players, forget and preserve, by default):

    forget backward → capture_forget() moves .grad aside (no copy) → preserve backward
    → pass 1: Gram (ff, fr, rr) in float64 → α solved on the device (bargaining.py)
    → pass 2: d = α_f g_f + α_r g_r replaces the gradient in AdamW or SGD.

With ``players=(name_1, ..., name_K)`` every player but the last is captured by name
(``capture(name)`` or ``with opt.gradients_of(name): ...``), the last is the live ``.grad``,
and the Gram has K(K+1)/2 entries.

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

from . import backends, backward_gram, bargaining_k, distributed, validation
from .backends.base import AdamWHyper, SGDHyper, TensorBucket, compute_dtype, kernel_coefficients
from .bargaining import DEFAULT_OPPOSITION_TOL, Bargain, BargainStatus, solve_bargain, validate_power

__all__ = ["MUNBaOptimizer"]

#: Optimizer-wide settings (one Gram, one bargain per step): pickled with the optimizer.
_SETTINGS = (
    "players",
    "state_dtype",
    "gram_process_group",
    "capturable",
    "max_grad_norm",
    "bargaining_power",
    "opposition_tol",
    "nonfinite",
    "backend",
    "gram_in_backward",
)
#: The bargaining settings a state dict carries (in every saved group, under "munba"), so a
#: resumed run continues with the settings it was saved with, as torch does for lr & co.
_SAVED_SETTINGS = ("players", "bargaining_power", "max_grad_norm", "opposition_tol", "nonfinite", "state_dtype")
_STATE_DTYPES = {None: None, "float32": torch.float32}


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
        players: the players' names, K ≥ 2 (default ``("forget", "preserve")``); the last is
            the live ``.grad`` at ``step()``, the others are captured by name.
        bargaining_power: one power per player (a K-tuple, or a mapping from names; default
            all 1; two players: ``(w_f, w_r)``), each in [1e-150, 1e150]; α solves
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
        gram_in_backward: compute the Gram pass's partials in a ``post_accumulate_grad`` hook
            as the live player's gradient of each parameter is accumulated (CPU backends),
            so that ``step()`` reads each gradient once; bit-identical to the two-pass step
            (any gradient changed after its hook is recomputed), refused under DDP/FSDP1,
            whose gradients are reduced after the hooks (:mod:`munba_kernels.backward_gram`).

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
        bargaining_power: tuple[float, ...] | dict[str, float] | None = None,
        opposition_tol: float = DEFAULT_OPPOSITION_TOL,
        nonfinite: str = "skip",
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        gram_process_group: Any = None,
        players: tuple[str, ...] = ("forget", "preserve"),
        gram_in_backward: bool = False,
    ) -> None:
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        if not isinstance(gram_in_backward, bool):
            raise TypeError(f"gram_in_backward must be a bool, got {gram_in_backward!r}")
        self.gram_in_backward = gram_in_backward
        self._backward_gram = None
        self.gram_process_group = gram_process_group
        self.capturable = capturable
        self._configure(
            players=players,
            bargaining_power=bargaining_power,
            max_grad_norm=max_grad_norm,
            opposition_tol=opposition_tol,
            nonfinite=nonfinite,
            state_dtype=state_dtype,
        )
        self.backend = backends.validate_name(backend)
        # Per-step values live in a dict, not in attributes: torch.compile (2.14) drops
        # attribute writes made inside an Optimizer's step, but keeps dict mutations.
        # "captured": {player name: {param: gradient}} for the players captured so far.
        self._step_data: dict[str, Any] = {"captured": None, "bargain": None}
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
        device = self._check_single_device()
        if gram_in_backward and (
            self.backend not in ("auto", *backward_gram.SUPPORTED_BACKENDS)
            or (device is not None and device.type != "cpu")
        ):
            raise ValueError(
                f"gram_in_backward=True is implemented for the CPU backends {backward_gram.SUPPORTED_BACKENDS}, "
                f"not backend={self.backend!r} on {device}"
            )
        if self.backend != "auto" and device is not None:
            backends.resolve(self.backend, device)  # a forced backend that cannot run fails now, as fused=True
        if gram_in_backward:
            self._attach_backward_gram()

    def _attach_backward_gram(self) -> None:
        params = self._params()
        backward_gram.check_supported(params, self.gram_process_group)
        self._backward_gram = backward_gram.BackwardGram(self, params)

    def _configure(self, *, players, bargaining_power, max_grad_norm, opposition_tol, nonfinite, state_dtype):
        """Validate and set the bargaining settings (at construction, and from a loaded state dict)."""
        players = tuple(players) if isinstance(players, (tuple, list)) else players
        if not (
            isinstance(players, tuple)
            and len(players) >= 2
            and all(isinstance(n, str) and n for n in players)
            and len(set(players)) == len(players)
        ):
            raise ValueError(f"players must be two or more distinct names, got {players!r}")
        if isinstance(bargaining_power, dict):
            unknown = set(bargaining_power) - set(players)
            if unknown:
                raise ValueError(f"bargaining_power names {sorted(unknown)}, which are not players {players}")
            bargaining_power = tuple(bargaining_power.get(name, 1.0) for name in players)
        power = validate_power((1.0,) * len(players) if bargaining_power is None else bargaining_power, len(players))
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
        if self.capturable and nonfinite == "raise":
            raise ValueError(
                "capturable=True cannot be combined with nonfinite='raise': raising reads the "
                "skip flag on the host every step; use nonfinite='skip' and read last_bargain.status"
            )
        self.players = players
        self.bargaining_power = power
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.opposition_tol = float(opposition_tol)
        self.nonfinite = nonfinite
        self.state_dtype = state_dtype

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
        if getattr(self, "_backward_gram", None) is not None:  # a group added after construction
            self._backward_gram.remove()
            self._attach_backward_gram()

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
        """As torch's, and drops the captured gradients too (they are gradients)."""
        super().zero_grad(set_to_none)
        self._step_data["captured"] = None
        if self._backward_gram is not None:
            self._backward_gram.clear()

    # ------------------------------------------------------------ captured players
    def _player(self, name: str) -> str:
        if name not in self.players[:-1]:
            live = self.players[-1]
            raise ValueError(
                f"{name!r} is not a captured player: players are {self.players}, and the last, "
                f"{live!r}, is the live .grad at step()"
            )
        return name

    def _two_players(self, spelling: str) -> str:
        if len(self.players) != 2:
            raise RuntimeError(
                f"{spelling} is the two-player spelling; with players {self.players} name the player: "
                "capture(name) / gradients_of(name)"
            )
        return self.players[0]

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def capture(self, name: str) -> None:
        """Take every parameter's current ``.grad`` as player ``name``'s gradient.

        The tensors are moved, not copied: ``.grad`` is set to ``None`` so the next backward
        pass starts afresh.  Once per player per step; ``zero_grad()`` or ``discard_forget()``
        drop captures that will not be stepped.
        """
        self._player(name)
        captured = self._step_data["captured"] or {}
        if name in captured:
            raise RuntimeError(
                f"player {name!r} was already captured for this step: call step() first, "
                "or zero_grad() / discard_forget() to drop the captured gradients"
            )
        params = self._params()
        for p in params:
            if p.grad is not None:
                _check_grad(p, p.grad, name)
        grads = {}
        for p in params:
            if p.grad is not None:
                grads[p] = p.grad
                p.grad = None
        self._step_data["captured"] = {**captured, name: grads}

    def capture_forget(self) -> None:
        """Two players: take every parameter's current ``.grad`` as the forget gradient.

        The tensors are moved, not copied: ``.grad`` is set to ``None`` so the next
        backward pass produces the preserve gradient.  Call exactly once per step;
        ``zero_grad()`` or ``discard_forget()`` drop a capture that will not be stepped.
        """
        if self._step_data["captured"]:
            raise RuntimeError(
                "capture_forget() was already called for this step: call step() first, "
                "or zero_grad() / discard_forget() to drop the captured forget gradient"
            )
        self.capture(self._two_players("capture_forget()"))

    def discard_forget(self) -> None:
        """Drop the captured gradients (every player's) without stepping."""
        self._step_data["captured"] = None

    @contextlib.contextmanager
    def gradients_of(self, name: str):
        """Inside this block ``.grad`` *is* player ``name``'s gradient; outside, the live one.

        Entering swaps every parameter's ``.grad`` for the gradient captured for ``name`` so
        far (none the first time), leaving it, swaps back: so backward passes inside
        accumulate into that player's gradient and those outside into the live (last)
        player's, in any interleaving and without a copy.  This is gradient accumulation for
        several players::

            for micro_batch in micro_batches:            # e.g. gradient_accumulation_steps
                with opt.forget_gradients():             # two players; gradients_of(name) for K
                    forget_loss(micro_batch).backward()
                preserve_loss(micro_batch).backward()
            opt.step(); opt.zero_grad()
        """
        self._player(name)
        params = self._params()
        captured = self._step_data["captured"] or {}
        mine = captured.get(name, {})
        live = {p: p.grad for p in params if p.grad is not None}
        for p in params:
            p.grad = mine.get(p)
        try:
            yield self
        finally:
            grads = {p: p.grad for p in params if p.grad is not None}
            for p in params:
                p.grad = live.get(p)
        for p, g in grads.items():
            _check_grad(p, g, name)
        self._step_data["captured"] = {**captured, name: grads}

    def forget_gradients(self):
        """Two players: :meth:`gradients_of` the forget player (see there)."""
        return self.gradients_of(self._two_players("forget_gradients()"))

    def captured_gradients(self) -> list[Tensor]:
        """Every captured gradient (all players but the live one; empty before a capture),
        e.g. for a loss scaler's inf check: they are not in ``.grad``, where torch's
        ``GradScaler`` looks."""
        captured = self._step_data["captured"] or {}
        return [g for grads in captured.values() for g in grads.values()]

    def captured_forget_gradients(self) -> list[Tensor]:
        """Two-player spelling of :meth:`captured_gradients`."""
        return self.captured_gradients()

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[Tensor, ...]] | None = None):
        """One bargained step.  Returns the K losses (``(forget_loss, preserve_loss)``) when given a closure.

        Everything the step will touch is validated first (groups, gradients, states); an
        error leaves every parameter, state and step count as it was, and keeps the captures.
        """
        losses = None
        if closure is not None:
            losses = self._backward_from_closure(closure)
        captured = self._step_data["captured"]
        missing = [name for name in self.players[:-1] if name not in (captured or {})]
        if missing and not captured and self._is_dcp_initialisation():
            captured, missing = {name: {} for name in self.players[:-1]}, []  # DCP's zero-lr step
        if missing:
            if len(self.players) == 2:
                raise RuntimeError(
                    "step() needs the forget gradient first: run loss_f.backward(); "
                    "opt.capture_forget(); loss_r.backward(); opt.step(), or pass a closure "
                    "returning (forget_loss, preserve_loss) (zero_grad() also drops a capture)"
                )
            raise RuntimeError(
                f"step() needs every player's gradient: {missing} not captured (capture(name) after "
                f"its backward pass, or a closure returning {len(self.players)} losses; the last player, "
                f"{self.players[-1]!r}, is the live .grad)"
            )
        device = self._check_single_device()
        if device is None:
            self._step_data["captured"] = None
            return losses
        per_group = self._present_tensors(captured)
        _check_not_aliased([captured[name].values() for name in self.players[:-1]], per_group)
        backend = backends.resolve(self.backend, device)
        self._validate_step(per_group)
        self._step_data["captured"] = None

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

    def _present_tensors(self, captured: dict[str, dict[Tensor, Tensor]]) -> list:
        """``(index, group, [(param, (g_1, ..., g_K)), ...])`` for the parameters with any gradient."""
        names = self.players[:-1]
        per_group = []
        for index, group in enumerate(self.param_groups):
            present = []
            for p in group["params"]:
                live = p.grad
                if live is not None:
                    _check_grad(p, live, self.players[-1])
                grads = (*(captured[name].get(p) for name in names), live)
                if any(g is not None for g in grads):
                    present.append((p, grads))
            if present:
                per_group.append((index, group, present))
        return per_group

    def _validate_step(self, per_group: list) -> None:
        """The groups' settings and the existing states as they stand now (both may have been
        edited since they were last checked), before anything is created or updated."""
        for index, group, present in per_group:
            where = f"param group {index}: " if index else ""
            validation.check_hyperparameters(group, where)
            for p, _ in present:
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

    def _global_gram(self, backend, device, present: list) -> tuple[Tensor, Tensor | None]:
        """The packed Gram over all shards, and, when float64 gradients take part, the flags
        that tell zero and NaN/Inf gradients apart from a float64 Gram that under- or
        overflowed (:func:`~munba_kernels.bargaining.solve_bargain`).  Other dtypes square
        exactly into float64, so their Gram tells both by itself and costs nothing more."""
        k = len(self.players)
        if not any(p.dtype == torch.float64 for p, _ in present):
            def pass1(entries: list[tuple]) -> Tensor:
                return backend.gram(distributed.by_player(entries, k), device)

            hooks = self._backward_gram
            if hooks is not None and not torch.compiler.is_compiling():
                pass1 = hooks.gram_function(backend, device, k) or pass1  # None: this backend cannot add partials
            gram = distributed.global_gram(pass1, present, k, self.gram_process_group)
            if hooks is not None:
                hooks.clear()
            return gram, None
        diagonal = [q for q, (i, j) in enumerate(bargaining_k.pairs(k)) if i == j]
        width = k * (k + 1) // 2

        def gram_and_flags(entries: list[tuple]) -> Tensor:
            tensors = [grads for _, grads in entries]  # per tensor, its K gradients
            total = torch.zeros(width + k + 1, dtype=torch.float64, device=device)
            for wide in (False, True):
                part = [t for t in tensors if (_dtype_of(t) == torch.float64) == wide]
                if not part:
                    continue
                g = backend.gram([[t[j] for t in part] for j in range(k)], device)
                if not wide:  # exact squares: the Gram's own diagonal says which are zero
                    flags = [*(g[q] > 0 for q in diagonal), ~torch.isfinite(g).all()]
                else:  # the largest magnitude of each player's float64 gradients says it
                    amax = []
                    for player in zip(*part):
                        live = [t for t in player if t is not None and t.numel()]  # empty shards: nothing
                        norms = torch._foreach_norm(live, math.inf) if live else [torch.zeros((), device=device)]
                        amax.append(torch.stack(norms).to(device=device, dtype=torch.float64))
                    flags = [*((a > 0).sum() for a in amax), sum((~torch.isfinite(a)).sum() for a in amax)]
                total = total + torch.cat([g, torch.stack(flags).to(torch.float64)])
            return total

        total = distributed.global_gram(gram_and_flags, present, k, self.gram_process_group)
        return total[:width], total[width:]

    def _backward_from_closure(self, closure) -> tuple[Tensor, ...]:
        if self._step_data["captured"]:
            raise RuntimeError(
                "step(closure) runs the backward passes itself, but capture_forget() / capture() was "
                "already called: use one style or the other"
            )
        k = len(self.players)
        with torch.enable_grad():
            losses = closure()
            if not (isinstance(losses, (tuple, list)) and len(losses) == k):
                spelling = "(forget_loss, preserve_loss)" if k == 2 else f"{k} losses, one per player {self.players}"
                raise TypeError(f"the closure must return {spelling}, got {type(losses).__name__}")
            self.zero_grad(set_to_none=True)
            for name, loss in zip(self.players[:-1], losses):
                loss.backward(retain_graph=True)  # the losses may share a graph
                self.capture(name)
            losses[-1].backward()
        return tuple(loss.detach() for loss in losses)

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
        for p, grads in present:
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
            bucket = buckets.get(key)
            if bucket is None:
                keys = validation.expected_state_keys(group)  # SGD without momentum: none (a leftover buffer stays unread)
                bucket = buckets[key] = TensorBucket(
                    grads=[[] for _ in grads], states={k: [] for k in keys}, first_step=key[3]
                )
            bucket.params.append(distributed.local_tensor(p))  # kernels update FSDP2 shards in place
            for player, g in zip(bucket.grads, grads):
                player.append(distributed.local_tensor(g))
            for k, values in bucket.states.items():
                values.append(distributed.local_tensor(state[k]))
        return list(buckets.values())

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        low_precision = p.dtype in (torch.bfloat16, torch.float16)
        return self.state_dtype if self.state_dtype is not None and low_precision else p.dtype

    # --------------------------------------------------------------- state I/O
    def _saved_settings(self) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in _SAVED_SETTINGS}
        settings["state_dtype"] = next(k for k, v in _STATE_DTYPES.items() if v == self.state_dtype)
        settings["players"], settings["bargaining_power"] = list(self.players), list(self.bargaining_power)
        return settings

    def state_dict(self) -> dict[str, Any]:
        """As torch's; every saved group also carries the bargaining settings under ``"munba"``
        (players, power, clip, opposition_tol, nonfinite, state_dtype), so that loading restores
        them as torch restores ``lr`` (and ``torch.distributed.checkpoint`` carries them too)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["munba"] = self._saved_settings()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, validated like constructor arguments, and all-or-nothing: a state dict
        with a wrong key, shape, dtype, hyperparameter or a non-finite moment raises and
        leaves this optimizer as it was.  torch.optim.AdamW / SGD state dicts load too
        (missing MUNBa keys keep this optimizer's values).  Floating states take this
        optimizer's state dtype (torch's would cast them to the parameter dtype, rounding
        fp32 moments of bf16 parameters)."""
        previous_state, previous_groups = self.state, self.param_groups
        previous_hyper = [{k: v for k, v in g.items() if k != "params"} for g in previous_groups]
        previous_settings = {name: getattr(self, name) for name in _SAVED_SETTINGS}
        super().load_state_dict(state_dict)
        try:
            self._adopt_loaded(state_dict, previous_hyper)
        except Exception:
            self.state, self.param_groups = previous_state, previous_groups
            self._configure(**previous_settings)
            raise

    def _adopt_loaded(self, state_dict: dict[str, Any], previous_hyper: list[dict]) -> None:
        saved_settings = [group.pop("munba", None) for group in self.param_groups]
        if any(s is not None for s in saved_settings):
            if any(s != saved_settings[0] for s in saved_settings):
                raise ValueError("the loaded param groups carry different bargaining settings ('munba')")
            settings = dict(saved_settings[0])
            if settings.get("state_dtype") not in _STATE_DTYPES:
                raise ValueError(f"the loaded state_dtype {settings.get('state_dtype')!r} is not one of {list(_STATE_DTYPES)}")
            settings["state_dtype"] = _STATE_DTYPES[settings["state_dtype"]]
            unknown = set(settings) - set(_SAVED_SETTINGS)
            if unknown or set(settings) != set(_SAVED_SETTINGS):
                raise ValueError(f"the loaded bargaining settings have keys {sorted(settings)}, expected {sorted(_SAVED_SETTINGS)}")
            self._configure(**settings)  # validated; load_state_dict restores the previous ones on error
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
        state.pop("_backward_gram", None)  # hook handles: re-registered on the copy's parameters
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._backward_gram = None
        if getattr(self, "gram_in_backward", False):
            self._attach_backward_gram()


def _dtype_of(grads: tuple[Tensor | None, ...]) -> torch.dtype:
    return next(g for g in grads if g is not None).dtype


def _skip_message(bargain: Bargain) -> str:
    entries = bargain.gram.tolist()
    if int(bargain.status) == BargainStatus.OUT_OF_RANGE:
        return (
            f"the float64 gradients are finite, but their Gram entries {entries} leave float64's "
            "range (gradient norms outside about [1.5e-154, 1.3e154]); no parameter was updated. "
            "Rescale the losses (the bargained direction does not depend on their scale)"
        )
    return f"a forget or preserve gradient holds NaN/Inf (Gram entries {entries}); no parameter was updated"


def _check_not_aliased(captured: list[Iterable[Tensor]], per_group: list) -> None:
    """Refuse gradients of different players that share memory.

    Captured gradients are moved aside, not copied, so a framework that backs ``.grad`` with
    persistent buffers (DDP with ``gradient_as_bucket_view=True``, contiguous gradient
    buffers) overwrites them during the next backward pass.  Storage identity is host
    metadata: checking it costs no synchronisation.
    """
    if torch.compiler.is_compiling():
        return

    def storages(grads):
        local = (distributed.local_tensor(g) for g in grads if g is not None)
        ptrs = (t.untyped_storage().data_ptr() for t in local if not isinstance(t, FakeTensor))
        return {ptr for ptr in ptrs if ptr}  # 0: meta or empty tensors, which hold no data

    live = [grads[-1] for _, _, present in per_group for _, grads in present]
    seen = storages(live)
    for player in captured:
        mine = storages(player)
        if mine & seen:
            raise RuntimeError(
                "the preserve gradients were written into the memory of the captured forget "
                "gradients (or one captured player's into another's), which are therefore lost; "
                "no parameter was updated. This happens when .grad is backed by persistent buffers, "
                "e.g. DistributedDataParallel(..., gradient_as_bucket_view=True): use "
                "gradient_as_bucket_view=False (the default)"
            )
        seen |= mine


def _check_grad(p: Tensor, g: Tensor, which: str) -> None:
    if g.is_sparse:
        raise RuntimeError(f"MUNBaOptimizer does not support sparse gradients ({which} gradient)")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(
            f"the {which} gradient of a parameter has shape/dtype/device "
            f"{tuple(g.shape)}/{g.dtype}/{g.device} but the parameter has "
            f"{tuple(p.shape)}/{p.dtype}/{p.device}"
        )
