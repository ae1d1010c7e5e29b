"""Time one whole unlearning step on a real model: this package against the published recipe.

Models: torchvision's ResNet-18 at 32×32 (classification: forget loss = cross-entropy against
random labels, as published) and the diffusion driver's class-conditional diffusers UNet2DModel
(munba_kernels/drivers/ddpm.py; widths 64/128/128, 4.2M params) at 32×32: forget loss = MSE
between the noise predicted for the forgotten class and for an anchor class at the same x_t
and timestep, retain loss = the denoising loss (SalUn's and MUNBa's recipe).

Variants, each a full step on a batch of forget and a batch of retain data:
  munba      forget backward → capture_forget → retain backward → MUNBaOptimizer.step
             (2 backward passes, no flattened copies; paper_faithful settings)
  published  the published code's recipe: two autograd.grad(..., retain_graph=True) calls,
             both gradients flattened, closed-form weights (with its +1e-8 terms), a third
             backward on the weighted loss, clip_grad_norm_(1.0), SGD step
  naive      (forget loss + retain loss).backward(), SGD step: the same compute as two
             backward passes, so it is the floor; everything above it is bargaining's cost

Times are medians of interleaved rounds in one process.  Peak memory is measured per
variant in a fresh subprocess (CUDA: max_memory_allocated; CPU: the sampled peak of the
resident set over its value after set-up), reported as the extra bytes a step needs over
the model and its data (optimizer state included).

    python benchmarks/bench_unlearning_step.py [--model resnet18|unet] [--batch 32] [--device cpu]
        [--rounds 8] [--quick] [--out results.json] [--markdown results.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from bench_memory import peak_extra_bytes, probe_in_subprocess
from bench_output import emit

from munba_kernels import MUNBaOptimizer
from munba_kernels.drivers import ddpm

VARIANTS = ("munba", "published", "naive")
CLASSIFIERS = ("resnet18", "narrow_resnet")
UNETS = {"unet": (64, 128, 128), "tiny_unet": (8, 16)}  # widths of the diffusion driver's UNet
QUICK_MODEL = {"resnet18": "narrow_resnet", "narrow_resnet": "narrow_resnet", "unet": "tiny_unet", "tiny_unet": "tiny_unet"}
CLASSES = 10

Loss = Callable[[torch.nn.Module], torch.Tensor]


def make_step(variant: str, model: torch.nn.Module, forget_loss: Loss, retain_loss: Loss) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "munba":
        opt = MUNBaOptimizer.paper_faithful(params)

        def step():
            opt.zero_grad(set_to_none=True)
            forget_loss(model).backward()
            opt.capture_forget()
            retain_loss(model).backward()
            opt.step()

        return step
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    if variant == "naive":

        def step():
            opt.zero_grad(set_to_none=True)
            (forget_loss(model) + retain_loss(model)).backward()
            opt.step()

        return step

    def step():  # the published recipe, as its code does it
        opt.zero_grad(set_to_none=True)
        loss_f = forget_loss(model)
        loss_r = retain_loss(model)
        g_f = torch.cat([g.flatten() for g in torch.autograd.grad(loss_f, params, retain_graph=True)])
        g_r = torch.cat([g.flatten() for g in torch.autograd.grad(loss_r, params, retain_graph=True)])
        G = torch.stack([g_r, g_f])
        gram = G @ G.T
        ff, fr, rr = gram[1, 1], gram[0, 1], gram[0, 0]
        cos = fr / (torch.sqrt(ff * rr) + 1e-8)
        alpha_r = 1 / (torch.sqrt(rr) * torch.sqrt(1 + cos) + 1e-8)
        alpha_f = 1 / (torch.sqrt(ff) * torch.sqrt(1 + cos) + 1e-8)
        (alpha_f.detach() * loss_f + alpha_r.detach() * loss_r).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def build(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in CLASSIFIERS:
        # imported here: the classifiers need torchvision, the UNet runs do not (a bare CUDA box)
        from munba_kernels.drivers.models import build_model

        return build_model(name, 3, CLASSES).to(device)
    return ddpm.build_unet(32, 3, CLASSES, channels=UNETS[name]).to(device)


def losses(name: str, batch: int, device: str) -> tuple[Loss, Loss]:
    """The forget and retain losses on fixed, seeded batches."""
    gen = torch.Generator().manual_seed(0)

    def labels(high):
        return torch.randint(0, high, (batch,), generator=gen).to(device)

    x_f, x_r = (torch.randn(batch, 3, 32, 32, generator=gen).to(device) for _ in range(2))
    if name in CLASSIFIERS:  # y_f: random labels, the published forget loss
        y_f, y_r = labels(CLASSES), labels(CLASSES)
        return (lambda m: F.cross_entropy(m(x_f), y_f)), (lambda m: F.cross_entropy(m(x_r), y_r))
    # the diffusion driver's losses: forgotten class 0 denoises like anchor class 1; retain classes 1..9
    scheduler = ddpm.build_scheduler()
    xt_f, _, t_f = ddpm.add_noise(scheduler, x_f, gen)
    xt_r, noise_r, t_r = ddpm.add_noise(scheduler, x_r, gen)
    forgotten, anchor, retained = torch.zeros_like(t_f), torch.ones_like(t_f), labels(CLASSES - 1) + 1

    def forget_loss(m):
        return ddpm.forget_loss(partial(ddpm.eps, m), xt_f, t_f, forgotten, anchor)

    def retain_loss(m):
        return F.mse_loss(ddpm.eps(m, xt_r, t_r, retained), noise_r)

    return forget_loss, retain_loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_step_bytes(args, variant: str) -> int:
    """Peak bytes a few steps of one variant need beyond the model and its data (in this process)."""
    model = build(args.model, args.device)
    step = make_step(variant, model, *losses(args.model, args.batch, args.device))

    def work():
        for _ in range(3):
            step()

    return peak_extra_bytes(work, args.device)


def mib(n_bytes: int | None) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2**20:.0f}"


def markdown(result: dict) -> str:
    median = result["median_ms"]
    lines = [
        f"{result['model']} ({result['params'] / 1e6:.1f}M params), forget + retain batches of {result['batch']} "
        f"at 32×32, {result['device']}, {result['threads']} threads, median of {result['rounds']} interleaved rounds",
        "",
        "| variant | ms / step | IQR ms | vs published | vs naive | extra peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        lines.append(
            f"| {v} | {median[v]:.1f} | {result['iqr_ms'][v]:.1f} | {median[v] / median['published']:.2f}× | "
            f"{median[v] / median['naive']:.2f}× | {mib(result['extra_peak_bytes'].get(v))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=(*CLASSIFIERS, *UNETS))
    p.add_argument("--batch", type=int, default=32, help="forget and retain batch size each (default 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=8, help="interleaved timed rounds (default 8)")
    p.add_argument("--quick", action="store_true", help="the model's small sibling, batch 4, 2 rounds (a smoke test)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.rounds = QUICK_MODEL[args.model], 4, 2
    for flag in ("batch", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.memory_probe:
        print(peak_step_bytes(args, args.memory_probe))
        return {}

    model = build(args.model, args.device)
    loss_fns = losses(args.model, args.batch, args.device)
    steps = {}
    for v in VARIANTS:  # each variant gets its own copy of the model, same data
        m = build(args.model, args.device)
        m.load_state_dict(model.state_dict())
        steps[v] = make_step(v, m, *loss_fns)
        steps[v]()  # warm-up: optimizer state, allocator, kernels
    times = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        print(f"[e2e] round {r + 1}/{args.rounds}", flush=True)
        for v in VARIANTS:
            sync(args.device)
            start = time.perf_counter()
            steps[v]()
            sync(args.device)
            times[v].append(time.perf_counter() - start)
    del steps
    common = ["--model", args.model, "--batch", str(args.batch), "--device", args.device]
    memory = {}
    for v in () if args.no_memory else VARIANTS:
        print(f"[e2e] peak memory of {v} (fresh process)", flush=True)
        memory[v] = probe_in_subprocess(__file__, [*common, "--memory-probe", v])
    quartiles = {v: statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3 for v, ts in times.items()}
    result = dict(
        model=args.model,
        params=sum(p.numel() for p in model.parameters()),
        batch=args.batch,
        device=args.device,
        threads=torch.get_num_threads(),
        rounds=args.rounds,
        median_ms={v: statistics.median(ts) * 1e3 for v, ts in times.items()},
        iqr_ms={v: (q[2] - q[0]) * 1e3 for v, q in quartiles.items()},
        times_s=times,
        extra_peak_bytes=memory,
    )
    emit(result, markdown(result), args.out, args.markdown)
    return result


if __name__ == "__main__":
    main()
