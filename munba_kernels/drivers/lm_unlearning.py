"""The language-model driver's unlearning methods, all under one budget.

Every method starts from the same target model and gets the same steps, the same seeded forget and
retain batches (single-objective methods use only the forget ones), the same AdamW settings and the
same clip of the update direction at ``max_grad_norm``:

==========  =================  ==========================================================
method      forget loss        how it is combined with the retain NLL
==========  =================  ==========================================================
GradAscent  −NLL (ga)          not at all
GradDiff    −NLL (ga)          summed: ``torch.optim.AdamW`` on ∇(L_f + L_r), norm clipped
NPO         NPO (β)            not at all
NPO+RT      NPO (β)            summed, as GradDiff
MUNBa-GA    −NLL (ga)          bargained: ``MUNBaOptimizer`` (AdamW base), ‖d‖ clipped
MUNBa-NPO   NPO (β)            bargained, as MUNBa-GA
==========  =================  ==========================================================
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from munba_kernels import MUNBaOptimizer
from munba_kernels.integrations import lm
from munba_kernels.integrations.loop import lm_unlearning_step

from .lm_models import batches

#: name → (forget loss, combination with the retain NLL: None, "sum" or "munba")
METHODS: dict[str, tuple[str, str | None]] = {
    "GradAscent": ("ga", None),
    "GradDiff": ("ga", "sum"),
    "NPO": ("npo", None),
    "NPO+RT": ("npo", "sum"),
    "MUNBa-GA": ("ga", "munba"),
    "MUNBa-NPO": ("npo", "munba"),
}


@dataclass(frozen=True)
class Budget:
    """What every method gets (recorded in results.json with each run)."""

    steps: int = 30
    forget_batch: int = 8
    retain_batch: int = 8
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    npo_beta: float = 0.1
    seed: int = 0


@dataclass
class Run:
    model: torch.nn.Module
    seconds: float  # unlearning only, evaluation excluded
    settings: dict
    losses: list[tuple[float, float]] = field(default_factory=list)  # (forget, retain) per step
    bargain: list[tuple[float, float, float]] = field(default_factory=list)  # (α_f, α_r, cos φ) per step
    curve: list[dict] = field(default_factory=list)  # evaluations along training


def unlearn(
    method: str,
    target: torch.nn.Module,
    forget_items: list[dict],
    retain_items: list[dict],
    *,
    lr: float,
    budget: Budget,
    ref_model: torch.nn.Module | None = None,
    device: str = "cpu",
    pad_token_id: int = 0,
    eval_at: tuple[int, ...] = (),
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    shard: Callable[[dict], dict] | None = None,
    progress: bool = False,
) -> Run:
    """Unlearn a copy of ``target`` with ``method`` at ``lr``; ``evaluate(model)`` runs after the
    steps in ``eval_at`` (not timed).  ``wrap``: e.g. LoRA or FSDP2 around the copy; ``shard``: this
    rank's rows of a batch (data parallel).  ``ref_model`` (NPO's reference) defaults to ``target``."""
    forget_kind, combine = METHODS[method]
    ref = ref_model if ref_model is not None else target
    model = copy.deepcopy(target).to(device).train()
    model.requires_grad_(True)
    model = wrap(model) if wrap is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    common = dict(lr=lr, betas=budget.betas, weight_decay=budget.weight_decay)
    if combine == "munba":
        opt = MUNBaOptimizer(params, max_grad_norm=budget.max_grad_norm, **common)
    else:
        opt = torch.optim.AdamW(params, **common)
    settings = {
        "optimizer": type(opt).__name__,
        "trainable_parameters": sum(p.numel() for p in params),
        **common,
        "max_grad_norm": budget.max_grad_norm,
        "forget_loss": forget_kind,
        "preserve_loss": "nll" if combine else None,
        "combine": combine,
        **({"npo_beta": budget.npo_beta} if forget_kind == "npo" else {}),
        **{
            k: v
            for k, v in asdict(budget).items()
            if k not in ("max_grad_norm", "weight_decay", "betas", "npo_beta")
        },
    }
    run = Run(model, 0.0, settings)
    forget_stream = batches(forget_items, budget.forget_batch, budget.seed, pad_token_id)
    retain_stream = batches(retain_items, budget.retain_batch, budget.seed + 1, pad_token_id)
    for step in tqdm(range(1, budget.steps + 1), desc=method, disable=not progress, leave=False):
        start = time.perf_counter()
        f_full, r_full = next(forget_stream), next(retain_stream)
        window = lm.Window.of([{"forget": f_full, "retain": r_full}])
        f = _to(shard(f_full) if shard else f_full, device)
        r = _to(shard(r_full) if shard else r_full, device)
        if shard is not None:
            window = window.scaled(_world())
        if combine == "munba":
            out = lm_unlearning_step(
                opt, model, [{"forget": f, "retain": r}], forget_loss=forget_kind, ref_model=ref,
                npo_beta=budget.npo_beta, window=window,
            )  # fmt: skip
            b = opt.last_bargain
            run.bargain.append((float(b.alpha[0]), float(b.alpha[1]), float(b.cos)))
            run.losses.append((out["forget_loss"], out["preserve_loss"]))
        else:
            model.train()
            loss_f = lm.forget_loss(forget_kind, model, f, window, ref_model=ref, beta=budget.npo_beta)
            loss = loss_f
            loss_r = None
            if combine == "sum":
                loss_r = lm.preserve_loss("nll", model, r, window)
                loss = loss_f + loss_r
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.losses.append((loss_f.item(), loss_r.item() if loss_r is not None else float("nan")))
        run.seconds += time.perf_counter() - start
        if evaluate is not None and step in eval_at:
            run.curve.append({"step": step, **evaluate(model)})
    return run


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def relearn(model: torch.nn.Module, items: list[dict], *, steps: int, lr: float, batch_size: int, seed: int,
            device: str = "cpu", pad_token_id: int = 0) -> torch.nn.Module:  # fmt: skip
    """The relearning attack: a copy of ``model`` fine-tuned (AdamW, constant lr) on ``items``."""
    attacked = copy.deepcopy(model).to(device).train()
    attacked.requires_grad_(True)
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr, weight_decay=0.0)
    stream = batches(items, batch_size, seed, pad_token_id)
    for _ in range(steps):
        loss = lm.preserve_loss("nll", attacked, _to(next(stream), device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return attacked.eval()
