"""t2i's UNet against a diffusers UNet2DConditionModel of matched widths, depths, attention
resolutions and text width, side by side in one process.

    python bench/unet.py                       # CPU: small preset, batch 32, 32x32, 16 tokens
    python bench/unet.py --preset base --batch 256 --tokens 77 --size 32   # on a GPU (bf16 autocast)

Prints parameters, forward GFLOP/img (FlopCounterMode, a multiply-add counts 2), forward and
forward+backward(+AdamW step) images/s (medians of alternating runs), and the ratios
ours/diffusers, raw and per FLOP.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from t2i.unet import PRESETS, T2IUNet, unet_config

from _common import machine, timed


def matched_diffusers_unet(cfg: dict) -> UNet2DConditionModel:
    """The diffusers UNet with the same levels, channels, layers, attention placement and heads."""
    attn = cfg["attention_levels"]
    return UNet2DConditionModel(
        sample_size=cfg["sample_size"], in_channels=3, out_channels=3,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg["block_channels"]), layers_per_block=cfg["layers_per_block"],
        cross_attention_dim=cfg["cross_attention_dim"], attention_head_dim=cfg["num_heads"],  # (= heads in diffusers)
        norm_num_groups=cfg["norm_groups"])


def gflops_per_image(model, x, t, ctx) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1], t[:1], encoder_hidden_states=ctx[:1])
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, help="image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = unet_config(args.preset, sample_size=args.size)  # args.size None: the preset's
    s, B, D = cfg["sample_size"], args.batch, cfg["cross_attention_dim"]
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    torch.manual_seed(0)
    models = {"t2i": T2IUNet(**cfg),
              "diffusers": matched_diffusers_unet(cfg)}
    x, t = torch.randn(B, 3, s, s, device=device), torch.randint(0, 1000, (B,), device=device)
    ctx = torch.randn(B, args.tokens, D, device=device)
    # one forward and one training step function per model; timed alternately so drifting load hits both alike
    fns, rows = {}, {}
    for name, model in models.items():
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def forward(model=model):
            with torch.no_grad(), autocast:
                model(x, t, encoder_hidden_states=ctx)

        def train_step(model=model, opt=opt):
            with autocast:
                out = model(x, t, encoder_hidden_states=ctx).sample
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = {"fwd": forward, "train": train_step}
        rows[name] = dict(params=sum(q.numel() for q in model.parameters()) / 1e6,
                          gflops=gflops_per_image(model, x, t, ctx), fwd=[], train=[])
    for _ in range(args.repeats):
        for name in models:
            for kind in ("fwd", "train"):
                rows[name][kind].append(B / timed(fns[name][kind], device, repeats=1))
    for r in rows.values():
        r["fwd"], r["train"] = statistics.median(r["fwd"]), statistics.median(r["train"])

    where = machine(device)
    print(f"\nUNet benchmark: preset {args.preset}, {s}x{s}, batch {B}, {args.tokens} tokens, {where}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"{'model':<10} {'params (M)':>10} {'GFLOP/img':>10} {'fwd img/s':>10} {'train img/s':>12} "
          f"{'train TFLOP/s':>14}")
    for name, r in rows.items():
        tflops = r["train"] * 3 * r["gflops"] / 1e3  # forward + backward ~ 3x forward
        print(f"{name:<10} {r['params']:>10.2f} {r['gflops']:>10.3f} {r['fwd']:>10.1f} {r['train']:>12.1f} "
              f"{tflops:>14.3f}")
    a, b = rows["t2i"], rows["diffusers"]
    print(f"ratio t2i/diffusers: forward {a['fwd'] / b['fwd']:.2f}x, train {a['train'] / b['train']:.2f}x; "
          f"per FLOP: forward {a['fwd'] * a['gflops'] / (b['fwd'] * b['gflops']):.2f}x, "
          f"train {a['train'] * a['gflops'] / (b['train'] * b['gflops']):.2f}x")


if __name__ == "__main__":
    main()
