"""What recording every cross-attention map costs on a UNet of Stable Diffusion 1.5's size: diffusers' default
UNet2DConditionModel (SD 1.5's cross-attention width, 768), random weights, 64x64 latents (512x512 images), 77
text tokens. Three ways, side by side in one process, on the same sampling loop (DDIM, classifier-free guidance
unless --no-guidance):
  off   no recording: diffusers' own fused attention;
  t2i   t2i's AttentionRecorder on every cross-attention layer: explicit softmax, summed over heads, layers and
        steps on the fly in float32 (memory flat in the steps);
  daam  a DAAM-style recorder (Tang et al. 2023, its paper-era code): each layer's per-head maps upsampled to the
        64x64 latent grid (bicubic) at every step and kept per step (memory grows with the steps).
Prints wall and CPU seconds per run (the median of interleaved runs; on a shared CPU the process's CPU time is
the steadier of the two), their ratios to `off`, and the bytes each recorder holds at the end.

  python bench/sd.py                                            # CPU: batch 1, 1 and 2 steps (minutes)
  python bench/sd.py --device cuda --batch 4 --steps 10 20 --repeats 3      # on a GPU
  python bench/sd.py --tiny                                      # a toy UNet, seconds (the smoke test)
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from t2i.attention import AttentionRecorder
from t2i.attention.processors import attached, cross_attention_modules
from t2i.conditioning import UNetConditioning, unet_prediction
from t2i.layout import BatchLayout, query_grid
from t2i.text import PromptEncoding

from _common import machine, sync


class DAAMStyleRecorder:
    """Per-head maps of every cross-attention layer, upsampled to the latent grid and kept per step (the
    recorder role of t2i's explicit processors, so its softmax costs what t2i's does; the rest is DAAM's)."""

    def __init__(self, latent: tuple[int, int]):
        self.latent, self.maps, self._step = latent, {}, 0

    @contextmanager
    def record(self, unet, layout: BatchLayout):
        self.layout, self.maps = layout, {}
        with attached(unet, cross_attention_modules(unet), "recorder", self):
            yield self

    def set_step(self, i: int) -> None:
        self._step = i

    def _grid_to_record(self, N: int):
        return query_grid(N, self.latent)

    def _add(self, name: str, grid, p: torch.Tensor) -> None:
        p = p[self.layout.branch_rows("cond")]                              # (B, heads, N, T)
        B, heads, N, T = p.shape
        maps = p.permute(0, 1, 3, 2).reshape(B * heads, T, *grid)
        up = F.interpolate(maps, size=self.latent, mode="bicubic", align_corners=False).clamp_(min=0)
        self.maps[(self._step, name)] = up.view(B, heads, T, *self.latent)  # kept per step and layer

    @property
    def bytes_kept(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.maps.values())


def sample(unet, cond: UNetConditioning, layout: BatchLayout, steps: int, guided: bool, recorder, device):
    """The sampling loop of T2IPipeline without text encoder and VAE: latents in, latents out."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps, device=device)
    B = layout.num_prompts
    x = torch.randn((B, 4, *layout.image_size), generator=torch.Generator().manual_seed(0)).to(device, unet.dtype)
    with recorder.record(unet, layout) if recorder is not None else nullcontext(), torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if recorder is not None:
                recorder.set_step(i)
            x_in = torch.cat([x, x]) if guided else x
            pred = unet_prediction(unet, x_in, t, cond)
            if guided:
                uncond, cond_pred = pred.chunk(2)
                pred = uncond + 7.5 * (cond_pred - uncond)
            x = scheduler.step(pred, t, x).prev_sample
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="sampling steps (several: memory against steps)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each mode, interleaved (median)")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs of each mode first")
    p.add_argument("--no-guidance", dest="guided", action="store_false", help="the conditional branch alone")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="a toy UNet (32 and 64 channels, 16x16 latents): the smoke test")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.tiny:
        unet, latent, width = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=(
            "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, sample_size=16, norm_num_groups=8), 16, 32
    else:  # diffusers' default config is SD 1.5's UNet but for the cross-attention width (SD 1.5: CLIP's 768)
        unet, latent, width = UNet2DConditionModel(cross_attention_dim=768, sample_size=64), 64, 768
    unet = unet.to(device).eval()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        unet.to(dtype)

    # text states of 77 tokens (random), with token strings so the t2i recorder can name its maps
    B, T = args.batch, 77
    texts = 2 * B if args.guided else B
    tokens = [["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]] * texts
    mask = torch.zeros(texts, T, dtype=torch.long)
    mask[:, :5] = 1
    enc = PromptEncoding(torch.randn(texts, T, width), mask, torch.zeros_like(mask), tokens)
    cond = UNetConditioning(enc.hidden_states.to(device, dtype))      # Stable Diffusion: padding not masked
    params = sum(q.numel() for q in unet.parameters())
    print(f"# bench/sd.py on {machine(device)}, {dtype}: UNet2DConditionModel {params / 1e6:.0f}M parameters, "
          f"{len(cross_attention_modules(unet))} cross-attention layers, {latent}x{latent} latents, {T} tokens, "
          f"batch {B}{', guided' if args.guided else ''}")
    print("| steps | mode | wall s | × off | CPU s | × off | kept MiB |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.steps:
        layout = BatchLayout(enc, (latent, latent), 1, args.guided, steps)
        makers = {"off": lambda: None, "t2i": AttentionRecorder, "daam": lambda: DAAMStyleRecorder((latent, latent))}
        times: dict[str, list[float]] = {m: [] for m in makers}
        cpu: dict[str, list[float]] = {m: [] for m in makers}
        kept: dict[str, int] = {}
        for r in range(args.warmup + args.repeats):
            for mode, make in makers.items():                          # interleaved, so drift hits every mode
                recorder = make()
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                sample(unet, cond, layout, steps, args.guided, recorder, device)
                sync(device)
                if r >= args.warmup:
                    times[mode].append(time.perf_counter() - t0)
                    cpu[mode].append(time.process_time() - c0)
                kept[mode] = recorder.bytes_kept if recorder is not None else 0
        off, off_cpu = statistics.median(times["off"]), statistics.median(cpu["off"])
        for mode in makers:
            s, c = statistics.median(times[mode]), statistics.median(cpu[mode])
            print(f"| {steps} | {mode} | {s:.2f} | {s / off:.3f} | {c:.2f} | {c / off_cpu:.3f} | "
                  f"{kept[mode] / 2**20:.2f} |", flush=True)


if __name__ == "__main__":
    main()
