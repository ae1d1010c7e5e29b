"""A small class-conditional DDPM (diffusers) and the diffusion unlearning losses and methods.

The model is diffusers' ``UNet2DModel`` with a class embedding table of ``num_classes + 1``
rows: the extra row is the *null* class.  Pre-training replaces a label by the null class
with probability ``class_dropout`` so that one network gives both ε(x_t, c) and the
unconditional ε(x_t, ∅); that enables classifier-free guidance when sampling and ESD's
negative guidance target.  Images live in [-1, 1] inside the diffusion code and in [0, 1]
outside it (the judge classifier and the data loaders use [0, 1]).

Unlearning methods (all fine-tune a copy of the original with the optimizer one
:class:`DiffusionRecipe` builds: AdamW, the optimizer DDPMs are trained with, the same
learning rate, steps, batches and clip; weight decay 0, because decay shrinks weights that
neither objective asked to move):

    MUNBa  forget and preserve losses, Nash-bargained    MUNBaOptimizer(base="adamw")
    Naive  the same two losses summed, one backward      torch.optim.AdamW
    ESD    negative guidance from a frozen copy only     torch.optim.AdamW

The recipe's clip (``max_grad_norm``, off by default) bounds MUNBa's ‖d‖ and the gradient
of Naive and ESD alike.  ``power_schedule="forget-loss"`` (an option, never the default)
lets MUNBa's bargaining power follow the forget loss; see :func:`scheduled_power_ratio`.

forget loss   MSE(ε(x_t, c_forget), ε(x_t, c_anchor).detach()), shared noise and timestep,
              x_0 from the forget class (SalUn's and MUNBa's diffusion forget loss)
preserve loss the denoising loss on retain classes, with the same class dropout as pre-training
ESD loss      MSE(ε(x_t, c_forget), ε*(x_t, ∅) − η (ε*(x_t, c_forget) − ε*(x_t, ∅))), ε* frozen

Several erased classes: every forget sample is mapped to its own class's anchor.  MUNBa's
``players="merged"`` (the default) bargains the forget loss of the whole forget batch against
the preserve loss (two players); ``players="per-class"`` gives every erased class a player of
its own (its forget loss on its own samples of the same batch) beside the preserve player, so
one class whose loss is already solved cannot hide another that is not.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from munba_kernels import MUNBaOptimizer
from munba_kernels.bargaining import validate_power

from .unlearning import Subset, clip_grads_, optimizer_settings

UNLEARN_METHODS = ("MUNBa", "Naive", "ESD")
#: Methods that combine a forget and a preserve objective; the fairness contract binds them.
TWO_OBJECTIVE = ("MUNBa", "Naive")
NUM_TRAIN_TIMESTEPS = 1000
POWER_SCHEDULES = ("constant", "forget-loss")
#: MUNBa's players with several erased classes: one merged forget player, or one per class.
PLAYERS = ("merged", "per-class")


@dataclass(frozen=True)
class DiffusionRecipe:
    """The optimizer settings every diffusion unlearning method is built from: one home.

    ``power_ratio`` is MUNBa's w_f/w_r, normalised to w_f + w_r = 2 (the step length of
    equal power).  ``power_schedule="forget-loss"`` scales it down once the forget loss is
    solved (:func:`scheduled_power_ratio`, with ``power_threshold``); it has no counterpart
    in a sum, so Naive and ESD ignore both.
    """

    lr: float = 5e-5
    steps: int = 300
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    power_ratio: float = 1.0
    power_schedule: str = "constant"
    power_threshold: float = 0.1

    def __post_init__(self):
        if not self.lr > 0 or self.steps < 1:
            raise ValueError(f"DiffusionRecipe needs lr > 0 and steps >= 1, got {self.lr!r}, {self.steps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.power_schedule not in POWER_SCHEDULES:
            raise ValueError(f"power_schedule must be one of {POWER_SCHEDULES}, got {self.power_schedule!r}")
        if not 0 < self.power_threshold < 1:
            raise ValueError(f"power_threshold must lie in (0, 1), got {self.power_threshold!r}")
        validate_power((self.power_ratio, 1.0))

    def optimizer(self, method: str, params, players: tuple[str, ...] | None = None) -> torch.optim.Optimizer:
        """``players`` (MUNBa only; default: forget and preserve): every forget player gets
        ``power_ratio`` times the preserve player's power (:func:`power_weights`)."""
        if method == "MUNBa":
            extra = {} if players is None else {"players": players}
            return MUNBaOptimizer(
                params,
                lr=self.lr,
                weight_decay=self.weight_decay,
                max_grad_norm=self.max_grad_norm,
                bargaining_power=power_weights(self.power_ratio, 2 if players is None else len(players)),
                **extra,
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def power_pair(ratio: float) -> tuple[float, float]:
    """(w_f, w_r) with w_f / w_r = ``ratio`` and w_f + w_r = 2."""
    return (2 * ratio / (1 + ratio), 2 / (1 + ratio))


def power_weights(ratio: float, players: int) -> tuple[float, ...]:
    """K = ``players`` powers: each forget player ``ratio`` × the last (preserve) one's, summing
    to K (the squared step length of equal power); :func:`power_pair` for K = 2."""
    if players == 2:
        return power_pair(ratio)
    scale = players / ((players - 1) * ratio + 1)
    return (ratio * scale,) * (players - 1) + (scale,)


#: Smoothing of the forget loss the schedule reads (per-batch losses vary with the timesteps drawn).
SCHEDULE_EMA = 0.9
#: The schedule never lowers w_f/w_r below this share of the base ratio: the forget player
#: keeps a voice, or the forget loss drifts back up unopposed.
SCHEDULE_FLOOR = 0.02


def scheduled_power_ratio(base_ratio: float, forget_loss: float, first_loss: float, threshold: float) -> float:
    """w_f/w_r that follows the forget loss (``power_schedule="forget-loss"``).

    Why: the bargaining power is the weight of each player's utility in the Nash product.
    Once the forget loss has fallen below ``threshold`` × its first value the forget player
    has what it asked for, yet the equal-power bisector still gives it half of every step.
    Below the threshold the ratio shrinks in proportion to the (smoothed) loss, so the step
    turns towards the preserve objective, and grows back if the forget loss rises again;
    it never falls below ``SCHEDULE_FLOOR`` × the base ratio.
    """
    if not (math.isfinite(forget_loss) and first_loss > 0):
        return base_ratio
    share = forget_loss / (threshold * first_loss)
    return base_ratio * min(1.0, max(share, SCHEDULE_FLOOR))


def build_unet(image_size: int, in_channels: int, num_classes: int, channels=(32, 64, 64)) -> nn.Module:
    """Residual blocks only (no attention): at 16×16 attention buys little and costs CPU time."""
    from diffusers import UNet2DModel

    if image_size % 2 ** (len(channels) - 1):
        raise ValueError(f"image_size {image_size} must be divisible by 2**{len(channels) - 1}")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        add_attention=False,
        num_class_embeds=num_classes + 1,  # the last id is the null (unconditional) class
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # The cosine schedule keeps small images from being pure noise for the last third of t.
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")


def to_model_range(x: Tensor, image_size: int) -> Tensor:
    """[0, 1] images at any size → [-1, 1] at ``image_size`` (area pooling down, bilinear up)."""
    if x.shape[-1] != image_size:
        mode = "area" if x.shape[-1] > image_size else "bilinear"
        x = F.interpolate(x, size=(image_size, image_size), mode=mode)
    return x.clamp(0, 1) * 2 - 1


def eps(model: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    return model(x_t, t, class_labels=labels).sample


def add_noise(scheduler, x0: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, noise, t) with a uniformly drawn timestep per sample (seeded)."""
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
    return scheduler.add_noise(x0, noise, t), noise, t


def drop_labels(labels: Tensor, null_class: int, p: float, gen: torch.Generator) -> Tensor:
    if p <= 0:
        return labels
    drop = (torch.rand(labels.shape, generator=gen) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# The losses take ``eps_fn(x_t, t, cond) -> ε`` so that the class-conditional UNet (cond = labels)
# and Stable Diffusion's UNet (cond = text embeddings) share them.


def denoising_loss(eps_fn, scheduler, x0: Tensor, cond: Tensor, gen: torch.Generator) -> Tensor:
    """The DDPM objective: predict the noise added to ``x0`` at a random timestep."""
    x_t, noise, t = add_noise(scheduler, x0, gen)
    return F.mse_loss(eps_fn(x_t, t, cond), noise)


def forget_loss(eps_fn, x_t: Tensor, t: Tensor, cond_forget: Tensor, cond_anchor: Tensor) -> Tensor:
    """MSE(ε(x_t, c_forget), ε(x_t, c_anchor).detach()): the forget condition now denoises like the anchor."""
    with torch.no_grad():
        target = eps_fn(x_t, t, cond_anchor)
    return F.mse_loss(eps_fn(x_t, t, cond_forget), target)


def esd_loss(
    eps_fn, frozen_eps_fn, x_t: Tensor, t: Tensor, cond_forget: Tensor, cond_null: Tensor, eta: float
):
    """ESD's negative guidance: steer ε(x_t, c_forget) away from the concept, as judged by a frozen copy."""
    with torch.no_grad():
        uncond = frozen_eps_fn(x_t, t, cond_null)
        target = uncond - eta * (frozen_eps_fn(x_t, t, cond_forget) - uncond)
    return F.mse_loss(eps_fn(x_t, t, cond_forget), target)


def train_ddpm(
    model: nn.Module,
    data: Subset,
    *,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    class_dropout: float,
    ema_decay: float,
    seed: int,
    progress: bool = True,
) -> nn.Module:
    """Pre-train with AdamW and a one-cycle schedule; returns the EMA of the weights (better
    samples after short training than the last iterate)."""
    gen = torch.Generator().manual_seed(seed)
    scheduler = build_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)
    )
    model.train()
    with tqdm(range(steps), desc="DDPM pre-training", unit="step", disable=not progress, leave=False) as bar:
        for _ in bar:
            idx = torch.randint(0, len(data), (batch_size,), generator=gen).to(data.x.device)
            labels = drop_labels(data.y[idx], num_classes, class_dropout, gen)
            loss = denoising_loss(partial(eps, model), scheduler, data.x[idx], labels, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.load_state_dict(ema.module.state_dict())
    return model.eval()


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: Tensor,
    *,
    null_class: int,
    steps: int = 25,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
) -> Tensor:
    """DDIM (η = 0) samples for ``labels`` with classifier-free guidance; [0, 1] images on the CPU.

    ``guidance`` w mixes ε_∅ + w (ε_c − ε_∅); w = 1 is the plain conditional model.
    """
    from diffusers import DDIMScheduler

    model.eval()
    device = next(model.parameters()).device
    cfg = model.config
    ddim = DDIMScheduler.from_config(build_scheduler().config)
    ddim.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)
    out = []
    chunks = list(zip(noise.split(batch_size), labels.split(batch_size)))
    for x, c in tqdm(chunks, desc="sampling", unit="batch", disable=not progress, leave=False):
        x, c = x.to(device), c.to(device)
        both = torch.cat([c, torch.full_like(c, null_class)])
        for t in ddim.timesteps:
            e_c, e_u = eps(model, torch.cat([x, x]), t.to(device).expand(2 * len(x)), both).chunk(2)
            x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu())
    return torch.cat(out) if out else torch.empty(0, cfg.in_channels, cfg.sample_size, cfg.sample_size)


@dataclass
class UnlearnRun:
    model: nn.Module
    seconds: float
    losses: list[tuple[float, float]] = field(default_factory=list)  # (forget, preserve) per step
    #: (α_f, α_r, cos φ) per step; K players: α per player, then cos φ per pair (trace_columns)
    bargain_log: list[tuple[float, ...]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # read back from the optimizer, plus steps etc.
    #: (norm of the direction before the clip, norm handed to AdamW) per step
    step_norms: list[tuple[float, float]] = field(default_factory=list)
    power_ratios: list[float] = field(default_factory=list)  # MUNBa's w_f/w_r per step
    snapshots: dict[int, UnlearnRun] = field(default_factory=dict)  # by step (unlearn_class(snapshots=...))


def unlearn_class(
    method: str,
    original: nn.Module,
    forget: Subset,
    retain: Subset,
    *,
    num_classes: int,
    anchor_class: int | Mapping[int, int],
    batch_size: int,
    class_dropout: float,
    recipe: DiffusionRecipe = DiffusionRecipe(),
    esd_eta: float = 1.0,
    seed: int = 0,
    snapshots: tuple[int, ...] = (),
    players: str = "merged",
    progress: bool = True,
) -> UnlearnRun:
    """Erase ``forget``'s class from a copy of ``original`` with ``method`` (see module docstring).

    ``recipe`` builds the optimizer and sets the steps.  Every method sees the same forget
    batches, noise and timesteps (one seeded generator per purpose); MUNBa and Naive also
    the same retain batches.  ``snapshots`` (step counts below ``recipe.steps``) also returns
    the run as it stood after those steps: the learning rate is constant and every step
    draws from the same streams, so each is exactly a shorter run.

    ``anchor_class``: one anchor for every forget sample, or ``{erased class: anchor}`` when
    ``forget`` holds several classes.  ``players`` (MUNBa only): ``"merged"`` bargains one
    forget loss over the whole forget batch against the preserve loss; ``"per-class"`` one
    player per erased class (``forget_<class>``, its loss on its own samples of the same
    batch, a zero gradient when the batch drew none of them: that player then sits the step
    out, ``PLAYER_ZERO``) plus ``preserve``.  Batches, noise and timesteps do not depend on it.
    """
    if players not in PLAYERS:
        raise ValueError(f"players must be one of {PLAYERS}, got {players!r}")
    if any(not 1 <= k < recipe.steps for k in snapshots):
        raise ValueError(f"snapshots must be step counts in 1..{recipe.steps - 1}, got {snapshots}")
    if method not in UNLEARN_METHODS:
        raise ValueError(f"method must be one of {UNLEARN_METHODS}, got {method!r}")
    if len(forget) == 0 or len(retain) == 0:
        raise ValueError("unlearn_class needs non-empty forget and retain sets")
    present = sorted(int(c) for c in forget.y.unique())
    if isinstance(anchor_class, Mapping):
        anchors = {int(c): int(a) for c, a in anchor_class.items()}
        if set(present) - set(anchors) or set(anchors.values()) & set(present):
            raise ValueError(f"anchor_class {anchors} must map every forget class {present} to a non-erased class")
        lut = torch.full((num_classes + 1,), -1, dtype=forget.y.dtype)
        for c, a in anchors.items():
            lut[c] = a
        lut = lut.to(forget.y.device)
        classes = sorted(anchors)
    else:
        lut, classes = None, present
    per_class = method == "MUNBa" and players == "per-class"
    names = (*(f"forget_{c}" for c in classes), "preserve") if per_class else None
    model = copy.deepcopy(original).train()
    eps_fn = partial(eps, model)
    if method == "ESD":
        frozen_eps_fn = partial(eps, copy.deepcopy(original).eval().requires_grad_(False))
    opt = recipe.optimizer(method, model.parameters(), names)
    clip, steps = recipe.max_grad_norm, recipe.steps
    scheduler = build_scheduler()
    f_gen, r_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    device = forget.x.device
    null, log, trace, norms, ratios = num_classes, [], [], [], []
    smoothed = first = None
    kept = {}
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{method} unlearning", unit="step", disable=not progress, leave=False):
        if step in snapshots:
            kept[step] = (copy.deepcopy(model).eval(), time.perf_counter() - start)
            model.train()
        f_idx = torch.randint(0, len(forget), (batch_size,), generator=f_gen).to(device)
        x_t, _, t = add_noise(scheduler, forget.x[f_idx], f_gen)
        c_f = forget.y[f_idx]
        opt.zero_grad(set_to_none=True)
        if method == "ESD":
            loss_f = esd_loss(eps_fn, frozen_eps_fn, x_t, t, c_f, torch.full_like(c_f, null), esd_eta)
            loss_f.backward()
            raw = clip_grads_(model.parameters(), clip)
            norms.append(torch.stack([raw, raw if clip is None else raw.clamp(max=clip)]).float())
            opt.step()
            log.append((loss_f.detach(), torch.zeros((), device=device)))
            continue
        c_a = torch.full_like(c_f, anchor_class) if lut is None else lut[c_f]
        if per_class:
            # One forget player per erased class, each on its own samples of this batch; the
            # logged forget loss is their sample-weighted mean: the merged loss of the batch.
            loss_f = torch.zeros((), device=device)
            for name, c in zip(names[:-1], classes):
                mine = (c_f == c).nonzero().squeeze(1)  # host sync: the per-class batch sizes
                if len(mine):
                    loss_c = forget_loss(eps_fn, x_t[mine], t[mine], c_f[mine], c_a[mine])
                    loss_c.backward()
                    loss_f = loss_f + loss_c.detach() * (len(mine) / len(c_f))
                opt.capture(name)  # nothing drawn: an empty capture, a zero gradient
        else:
            loss_f = forget_loss(eps_fn, x_t, t, c_f, c_a)
        r_idx = torch.randint(0, len(retain), (batch_size,), generator=r_gen).to(device)
        # The preserve loss keeps pre-training's class dropout, so the unconditional ε that
        # classifier-free guidance relies on is preserved as well.
        r_labels = drop_labels(retain.y[r_idx], null, class_dropout, r_gen)
        loss_r = denoising_loss(eps_fn, scheduler, retain.x[r_idx], r_labels, r_gen)
        if method == "MUNBa":
            if recipe.power_schedule == "forget-loss":  # reads the loss on the host: one sync per step
                value = loss_f.item()
                first = value if first is None else first
                smoothed = value if smoothed is None else SCHEDULE_EMA * smoothed + (1 - SCHEDULE_EMA) * value
                ratio = scheduled_power_ratio(recipe.power_ratio, smoothed, first, recipe.power_threshold)
                k = len(opt.players)
                opt.bargaining_power = validate_power(power_weights(ratio, k), k)
                ratios.append(ratio)
            if not per_class:
                loss_f.backward()
                opt.capture_forget()
            loss_r.backward()
            opt.step()
            b = opt.last_bargain
            trace.append(torch.cat([b.alpha, _pair_cosines(b)]).float())
            norms.append(torch.stack([b.direction_norm, b.direction_norm * b.clip_scale]).float())
        else:
            (loss_f + loss_r).backward()
            raw = clip_grads_(model.parameters(), clip)
            norms.append(torch.stack([raw, raw if clip is None else raw.clamp(max=clip)]).float())
            opt.step()
        log.append((loss_f.detach(), loss_r.detach()))
    seconds = time.perf_counter() - start
    losses = [tuple(row) for row in torch.stack([torch.stack(p) for p in log]).tolist()]
    bargain = [tuple(row) for row in torch.stack(trace).tolist()] if trace else []
    settings = {
        **optimizer_settings(opt, clip),
        "steps": steps,
        "batch_size": batch_size,
        "forget_loss": "esd" if method == "ESD" else "anchor_mse",
    }
    if method == "MUNBa":
        settings.update(power_ratio=recipe.power_ratio, power_schedule=recipe.power_schedule)
        if len(classes) > 1 or per_class:
            settings["players"] = list(opt.players)
        if recipe.power_schedule != "constant":
            settings["power_threshold"] = recipe.power_threshold
            settings["bargaining_power"] = "scheduled"
    step_norms = [tuple(row) for row in torch.stack([n.cpu() for n in norms]).tolist()]

    def upto(k: int, trained: nn.Module, secs: float) -> UnlearnRun:
        return UnlearnRun(trained, secs, losses[:k], bargain[:k], {**settings, "steps": k}, step_norms[:k], ratios[:k])

    run = upto(steps, model.eval(), seconds)
    run.snapshots = {k: upto(k, m, secs) for k, (m, secs) in sorted(kept.items())}
    return run


def _pair_cosines(b) -> Tensor:
    """cos φ of every pair of players (i < j, row by row): [cos φ] for two, as ``b.cos``."""
    if b.cosines is None or b.alpha.shape[-1] == 2:
        return b.cos[None]
    i, j = torch.triu_indices(*b.cosines.shape[-2:], 1, device=b.cosines.device)
    return b.cosines[i, j]


def trace_columns(players) -> list[str]:
    """Names of a bargain trace row's entries: α per player, then cos φ per pair (i < j)."""
    players = list(players)
    pairs = [f"cos({a},{b})" for n, a in enumerate(players) for b in players[n + 1 :]]
    return [f"alpha_{p}" for p in players] + pairs


def default_anchor(forget_class: int, num_classes: int, erased=()) -> int:
    """The next class (mod K) that is not erased (``erased``: every class being erased): a
    fixed, documented choice rather than a tuned one."""
    skip = {forget_class, *erased}
    if len(skip) >= num_classes:
        raise ValueError(f"no class is left to anchor to: {sorted(skip)} of {num_classes} are erased")
    anchor = (forget_class + 1) % num_classes
    while anchor in skip:
        anchor = (anchor + 1) % num_classes
    return anchor


def relearn_checkpoints(
    model: nn.Module,
    images: Subset,
    *,
    steps: int,
    every: int,
    lr: float,
    batch_size: int,
    seed: int,
):
    """The diffusion relearning attack: fine-tune a copy of ``model`` with AdamW (no decay, no
    clip) on the plain conditional denoising loss of a few forget-class ``images`` with their
    label; yields ``(step, model)`` at 0, every, 2·every, …, steps (the same copy, trained on)."""
    if len(images) == 0:
        raise ValueError("the relearning attack needs at least one image")
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = build_scheduler()
    gen = torch.Generator().manual_seed(seed)
    eps_fn = partial(eps, model)
    yield 0, model.eval()
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(images), (batch_size,), generator=gen).to(images.x.device)
        opt.zero_grad(set_to_none=True)
        denoising_loss(eps_fn, scheduler, images.x[idx], images.y[idx], gen).backward()
        opt.step()
        if step % every == 0 or step == steps:
            yield step, model.eval()
