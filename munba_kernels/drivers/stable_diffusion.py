"""Concept erasure in a local Stable Diffusion pipeline with MUNBa (the driver's --pretrained path).

1. Load ``StableDiffusionPipeline.from_pretrained(DIR, local_files_only=True)``; nothing is downloaded.
2. With the *original* UNet, generate ``--sd-images`` latents per forget prompt and per retain
   prompt (the retain prompts default to the anchor prompt).  These are the forget and retain data.
3. Fine-tune the UNet's cross-attention (``--sd-train xattn``: the ``attn2`` layers, as ESD-x and
   SalUn's SD recipe do) or all of it (``full``) with ``MUNBaOptimizer``:
   forget loss = MSE(ε(z_t, forget prompt), ε(z_t, anchor prompt).detach()) on forget latents,
   preserve loss = the denoising loss on retain latents with their prompts (ddpm.py's losses).
4. Save the pipeline with ``save_pretrained`` to OUTDIR/pipeline and a before/after image grid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from munba_kernels import MUNBaOptimizer
from munba_kernels.evaluation.generation import save_sample_grid

from .ddpm import add_noise, denoising_loss, forget_loss

BATCH_SIZE = 2  # latents per loss and step: Stable Diffusion fine-tuning recipes use 1–8 on one GPU


def check_pipeline_folder(path: str | Path) -> Path:
    """``path`` as a local pipeline folder; a clear FileNotFoundError for hub ids or typos."""
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--pretrained {str(path)!r} is not a local diffusers pipeline folder (no model_index.json). "
            "This driver never downloads weights: fetch the pipeline yourself (for a hub id, e.g. "
            "`huggingface-cli download ID --local-dir DIR`) and pass --pretrained DIR."
        )
    return folder


def load_pipeline(path: str | Path, device: str = "cpu"):
    """A StableDiffusionPipeline from a local folder, with a clear error for hub ids or typos."""
    folder = check_pipeline_folder(path)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def trainable_unet_parameters(unet, which: str) -> list[torch.nn.Parameter]:
    """Cross-attention weights only (``xattn``: keys under ``attn2``) or every UNet weight (``full``)."""
    if which not in ("xattn", "full"):
        raise ValueError(f"which must be 'xattn' or 'full', got {which!r}")
    params = [p for n, p in unet.named_parameters() if which == "full" or ".attn2." in n]
    if not params:
        raise ValueError("the UNet has no cross-attention (attn2) layers; use --sd-train full")
    return params


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, do_classifier_free_guidance=False)
    return embeds


@torch.no_grad()
def generate(pipe, prompts: list[str], per_prompt: int, steps: int, seed: int, output_type: str):
    """``per_prompt`` generations of each prompt, prompt-major; latents or [0, 1] images on the CPU."""
    out = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        result = pipe(
            prompt,
            num_images_per_prompt=per_prompt,
            num_inference_steps=steps,
            generator=gen,
            output_type="latent" if output_type == "latent" else "pt",
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def erase_concept(pipe, cfg) -> dict:
    """Fine-tune ``pipe.unet`` in place with MUNBa; returns per-step losses and bargaining weights."""
    from diffusers import DDPMScheduler

    device = pipe.device
    retain_prompts = cfg.retain_prompts or [cfg.anchor_prompt]
    forget_emb = encode_prompts(pipe, cfg.forget_prompts)
    anchor_emb = encode_prompts(pipe, [cfg.anchor_prompt])
    retain_emb = encode_prompts(pipe, retain_prompts)
    n = cfg.sd_images
    forget_z = generate(pipe, cfg.forget_prompts, n, cfg.sd_inference_steps, cfg.seed, "latent").to(device)
    retain_z = generate(pipe, retain_prompts, n, cfg.sd_inference_steps, cfg.seed + 1000, "latent").to(device)
    forget_p = torch.arange(len(cfg.forget_prompts), device=device).repeat_interleave(n)
    retain_p = torch.arange(len(retain_prompts), device=device).repeat_interleave(n)

    unet = pipe.unet
    unet.requires_grad_(False)
    params = trainable_unet_parameters(unet, cfg.sd_train)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    opt = MUNBaOptimizer(params, lr=cfg.sd_lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # training noise of the same schedule
    gen = torch.Generator().manual_seed(cfg.seed)

    def eps_fn(z, t, emb):
        return unet(z, t, encoder_hidden_states=emb).sample

    log = []
    start = time.perf_counter()
    for _ in tqdm(range(cfg.sd_steps), desc="MUNBa concept erasure", unit="step", disable=not cfg.progress):
        opt.zero_grad(set_to_none=True)
        f_idx = torch.randint(0, len(forget_z), (min(BATCH_SIZE, len(forget_z)),), generator=gen).to(device)
        z_t, _, t = add_noise(scheduler, forget_z[f_idx], gen)
        loss_f = forget_loss(
            eps_fn, z_t, t, forget_emb[forget_p[f_idx]], anchor_emb.expand(len(f_idx), -1, -1)
        )
        loss_f.backward()
        opt.capture_forget()
        r_idx = torch.randint(0, len(retain_z), (min(BATCH_SIZE, len(retain_z)),), generator=gen).to(device)
        loss_r = denoising_loss(eps_fn, scheduler, retain_z[r_idx], retain_emb[retain_p[r_idx]], gen)
        loss_r.backward()
        opt.step()
        b = opt.last_bargain
        log.append(
            torch.cat(
                [
                    torch.stack([loss_f.detach(), loss_r.detach()]).float(),
                    b.alpha.float(),
                    b.cos[None].float(),
                ]
            )
        )
    unet.eval().requires_grad_(False)
    rows = torch.stack(log).tolist() if log else []
    return {
        "seconds": time.perf_counter() - start,
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": [dict(zip(("forget_loss", "preserve_loss", "alpha_f", "alpha_r", "cos"), r)) for r in rows],
    }


def run_stable_diffusion(cfg) -> dict:
    """The --pretrained path of ``python -m munba_kernels.drivers.diffusion`` (``cfg``: its Config)."""
    from dataclasses import asdict

    pipe = load_pipeline(cfg.pretrained, cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [*cfg.forget_prompts, cfg.anchor_prompt]
    per_prompt = 4

    def images():
        imgs = generate(pipe, prompts, per_prompt, cfg.sd_inference_steps, cfg.seed + 2000, "pt")
        return imgs.reshape(len(prompts), per_prompt, *imgs.shape[1:])

    before = images()
    run = erase_concept(pipe, cfg)
    after = images()
    pipe.save_pretrained(out / "pipeline")
    save_sample_grid(
        {"original": before, "MUNBa": after}, out / "samples.png", prompts, "Stable Diffusion erasure"
    )
    results = {"config": asdict(cfg), "MUNBa": run}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"erased {cfg.forget_prompts} → {cfg.anchor_prompt!r} in {run['seconds']:.1f}s "
        f"({run['trainable_parameters']} trainable parameters); wrote {out / 'pipeline'}, samples.png, results.json"
    )
    return results
