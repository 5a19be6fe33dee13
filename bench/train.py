"""End-to-end training throughput of t2i (shapes data -> text encoder -> UNet -> loss -> AdamW -> EMA),
with the share of time in data, forward, backward and optimiser, for each speed switch in turn.

    python bench/train.py                                      # CPU: small preset, batch 32, 32x32
    python bench/train.py --preset base --size 64 --batch 256  # GPU

Each variant is measured in this process against the first one ("eager", fp32, no switches); the
utilisation column divides achieved model FLOP/s (3 x forward, FlopCounterMode) by this device's
measured dense matmul rate (bf16 on CUDA, fp32 on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dataclasses import asdict

from t2i.config import load_config
from t2i.data.stream import build_dataset, data_stream
from t2i.diffusion import diffusion_loss, make_noise_scheduler
from t2i.ema import EMA
from t2i.text import TextStates, build_text
from t2i.unet import build_unet

from _common import machine, sync

VARIANTS = {  # name -> switches; each adds one switch to the eager baseline
    "eager": {},
    "channels_last": {"channels_last": True},
    "bf16": {"bf16": True},
    "fused_adamw": {"fused": True},
    "compile": {"compile": True},
    "all": {"channels_last": True, "bf16": True, "fused": True, "compile": True},
}


def matmul_tflops(device: torch.device) -> float:
    """This device's dense matmul rate: bf16 on CUDA, fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 20 if device.type == "cuda" else 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def run_variant(cfg, switches: dict, device, steps: int) -> dict:
    torch.manual_seed(0)
    dataset, corpus = build_dataset(cfg)
    tokenizer, encoder = build_text(cfg.text, corpus)
    unet = build_unet(**asdict(cfg.model), sample_size=cfg.data.size,
                      cross_attention_dim=encoder.config.hidden_size).to(device)
    encoder.to(device)
    if switches.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if switches.get("compile") else unet
    params = list(unet.parameters()) + list(encoder.parameters())
    fused = bool(switches.get("fused")) and device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    ema, sched, text = EMA(unet, 0.999), make_noise_scheduler(cfg.noise), TextStates(tokenizer, encoder, True)
    amp = torch.autocast(device.type, torch.bfloat16) if switches.get("bf16") else contextlib.nullcontext()
    B = cfg.train.batch_size
    loader = data_stream(dataset, cfg)
    g = torch.Generator(device=device).manual_seed(0)
    parts = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)

    def step(record: bool):
        marks = [time.perf_counter()]

        def mark():
            if record:
                sync(device)
            marks.append(time.perf_counter())
        batch = next(loader)
        x0 = batch["pixel_values"].to(device, non_blocking=True)
        if switches.get("channels_last"):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        mark()
        with amp:
            states, mask = text(batch["text"], device)
            loss = diffusion_loss(model, sched, x0, states, mask, cfg.noise, g)
        mark()
        loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(unet, 1)
        mark()
        if record:
            for name, a, b in zip(parts, marks, marks[1:]):
                parts[name] += b - a

    for _ in range(3):  # warm-up (and compilation)
        step(False)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(False)
    sync(device)
    rate = steps * B / (time.perf_counter() - t0)
    for _ in range(max(2, steps // 3)):  # a second pass with a sync between phases, for the breakdown
        step(True)
    total = sum(parts.values())
    return dict(rate=rate, **{k: v / total for k, v in parts.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--variants", default=None, help=f"comma list from {','.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_config(None, [f"model.preset={args.preset}", f"data.size={args.size}", f"train.batch_size={args.batch}",
                             f"text.width={args.text_width}", f"data.num_workers={args.workers}"])
    default = "eager,channels_last,bf16,fused_adamw,compile,all" if device.type == "cuda" else "eager,channels_last,bf16"
    names = (args.variants or default).split(",")

    torch.manual_seed(0)
    probe = build_unet(**asdict(cfg.model), sample_size=args.size, cross_attention_dim=args.text_width)
    x = torch.randn(1, 3, args.size, args.size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        probe(x, torch.tensor([1]), torch.randn(1, cfg.text.max_length, args.text_width))
    train_flops = 3 * fc.get_total_flops()  # per image, UNet only
    peak = matmul_tflops(device)

    print(f"\nTraining benchmark: preset {args.preset}, {args.size}x{args.size}, batch {args.batch}, "
          f"{machine(device)}; dense matmul peak {peak:.2f} TFLOP/s; UNet train GFLOP/img {train_flops / 1e9:.2f}")
    print(f"{'variant':<14} {'img/s':>9} {'vs eager':>9} {'util':>7} {'data':>6} {'fwd':>6} {'bwd':>6} {'opt':>6}")
    base = None
    for name in names:
        r = run_variant(cfg, VARIANTS[name], device, args.steps)
        base = base or r["rate"]
        util = r["rate"] * train_flops / (peak * 1e12)
        print(f"{name:<14} {r['rate']:>9.1f} {r['rate'] / base:>8.2f}x {util:>6.1%} {r['data']:>6.0%} "
              f"{r['forward']:>6.0%} {r['backward']:>6.0%} {r['optimizer']:>6.0%}", flush=True)


if __name__ == "__main__":
    main()
