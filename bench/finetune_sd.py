"""Fine-tuning speed and memory of a Stable Diffusion 1.5-sized UNet (issue 24): t2i's training step (its
diffusion_loss with min-SNR, AdamW, bf16 autocast on a GPU) on a UNet2DConditionModel of SD 1.5's size with random
weights, 64x64 latents (512 px images, as the latent cache gives them) and 77 text states of width 768 (a frozen
CLIP's, cached), with and without gradient checkpointing, side by side in one process. The reference row is
"no checkpointing".

    python bench/finetune_sd.py --device cuda --batch 16 --steps 10     # on a GPU (bench/gpu.sh)
    python bench/finetune_sd.py --tiny                                    # toy size on the CPU (the smoke test)
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from _common import machine
from diffusers import DDPMScheduler, UNet2DConditionModel

from t2i.config import NoiseConfig
from t2i.diffusion import diffusion_loss


def build(tiny: bool) -> tuple[UNet2DConditionModel, int, int]:
    torch.manual_seed(0)
    if tiny:
        return UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, sample_size=16, norm_num_groups=8), 16, 32
    # diffusers' default config is SD 1.5's UNet but for the cross-attention width (SD 1.5: CLIP's 768)
    return UNet2DConditionModel(cross_attention_dim=768, sample_size=64), 64, 768


def run(args, checkpointing: bool, device: torch.device) -> dict:
    unet, latent, width = build(args.tiny)
    unet.to(device).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD 1.5's
    noise, g = NoiseConfig(beta_schedule="scaled_linear"), torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, 4, latent, latent, device=device)
    states = torch.randn(args.batch, 77, width, device=device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = diffusion_loss(unet, scheduler, x0, states, None, noise, g, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in unet.parameters())
    del unet, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = sorted(times)[len(times) // 2]
    return {"img_s": args.batch / step_s, "step_s": step_s, "peak_gib": peak, "params": params, "latent": latent}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--tiny", action="store_true", help="a toy UNet at 16x16 latents: the smoke test")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {name: run(args, ckpt, device) for name, ckpt in (("no checkpointing", False), ("checkpointing", True))}
    ref = rows["no checkpointing"]
    print(f"# bench/finetune_sd.py on {machine(device)}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}: "
          f"UNet2DConditionModel {ref['params'] / 1e6:.0f}M parameters, {ref['latent']}x{ref['latent']} latents, "
          f"77 text states, batch {args.batch}, AdamW, median of {args.steps} steps")
    print("| gradient checkpointing | img/s | s/step | peak GiB | img/s × reference | peak × reference |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        gpu = device.type == "cuda"  # peak memory is measured on a GPU only
        peak = f"{r['peak_gib']:.2f} | " if gpu else "– | "
        print(f"| {name} | {r['img_s']:.2f} | {r['step_s']:.3f} | {peak}{r['img_s'] / ref['img_s']:.2f} | "
              f"{r['peak_gib'] / ref['peak_gib'] if gpu else float('nan'):.2f} |".replace("nan", "–"))


if __name__ == "__main__":
    main()
