"""Helpers shared by the benchmark scripts (run them as `python bench/NAME.py`): timing, the machine's
name, and a randomly initialised pipeline (speed does not depend on the weights)."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


CORPUS = ["a red circle above a blue square", "a small green triangle in the top left",
          "a large purple diamond to the right of an orange circle", "a yellow square below a red triangle"]


def random_pipeline(preset: str, text_width: int, scheduler: str = "dpm", sample_size: int | None = None):
    """A T2IPipeline of a UNet preset and an offline CLIP (width `text_width`, 2 layers), random weights.
    The zero-initialised output projections are perturbed so that every path carries signal."""
    from diffusers import DDPMScheduler

    from t2i.pipeline import T2IPipeline, make_scheduler
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer
    from t2i.unet import build_unet
    torch.manual_seed(0)
    tokenizer = build_offline_tokenizer(CORPUS, max_length=24)
    encoder = build_offline_text_encoder(tokenizer, width=text_width, layers=2, heads=4, seed=0)
    unet = build_unet(preset, cross_attention_dim=text_width,
                      **({"sample_size": sample_size} if sample_size else {}))
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    noise = DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    pipe = T2IPipeline(unet, encoder, tokenizer, make_scheduler(scheduler, noise), caption_dropout=0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe

