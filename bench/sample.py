"""Sampling throughput of the t2i pipeline (guided, DPM-Solver++) for 20 and 50 steps at batch 1
and 32, for each speed switch in turn, against the eager fp32 pipeline in the same process.

    python bench/sample.py                           # CPU: small preset (random weights), 32x32
    python bench/sample.py --model t2i/default_model # the shipped model
    python bench/sample.py --preset base --size 64   # GPU: adds compile and CUDA graphs
"""
from __future__ import annotations

import argparse

import torch

from t2i.pipeline import T2IPipeline, load_pipeline

from _common import CORPUS, machine, random_pipeline, timed

def apply(pipe: T2IPipeline, variant: str, device) -> T2IPipeline:
    if variant in ("channels_last", "all"):
        pipe.unet.to(memory_format=torch.channels_last)
    if variant in ("bf16", "all"):
        pipe.to(dtype=torch.bfloat16)
    if variant in ("compile", "all"):
        pipe.unet = torch.compile(pipe.unet)
    if variant == "autocast_bf16":  # weights and latents stay float32; the UNet computes in bf16
        pipe.autocast_dtype = torch.bfloat16
    if variant == "cuda_graphs":
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a pipeline folder (default: random weights of --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--steps", default="20,50")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=None, help="eager,channels_last,bf16,autocast_bf16,compile,cuda_graphs,all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    default = "eager,channels_last,bf16,compile,cuda_graphs,all" if device.type == "cuda" else "eager,channels_last,bf16"
    variants = (args.variants or default).split(",")
    steps, batches = [int(s) for s in args.steps.split(",")], [int(b) for b in args.batches.split(",")]

    print(f"\nSampling benchmark: {args.model or f'{args.preset} preset, random weights'}, {args.size}x{args.size}, "
          f"guidance 3 (UNet batch = 2 x images), DPM-Solver++, {machine(device)}")
    print(f"{'variant':<13}" + "".join(f"{f'{s} steps b{b}':>16}" for s in steps for b in batches) + "   (img/s, ratio)")
    base = {}
    for variant in variants:
        pipe = load_pipeline(args.model, device) if args.model else \
            random_pipeline(args.preset, args.text_width, sample_size=args.size).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe = apply(pipe, variant, device)
        cells = []
        for s in steps:
            for b in batches:
                prompts = [CORPUS[i % len(CORPUS)] for i in range(b)]
                seconds = timed(lambda: pipe(prompts, num_inference_steps=s, height=args.size, width=args.size,
                                             output_type="pt"), device, args.repeats)
                rate = b / seconds
                base.setdefault((s, b), rate)
                cells.append(f"{rate:>9.1f} {rate / base[(s, b)]:>5.2f}x")
        print(f"{variant:<13}" + "".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
