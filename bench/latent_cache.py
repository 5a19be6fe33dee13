"""Training img/s in a VAE's latent space with the latent cache (t2i.data.latents) against encoding every step,
side by side in one process. Reference: 'every step', what latent training without a cache does.

Both rows train the same T2IUNet from the same weights on the same image folder (shapes scenes) with the same
text encoder and loss (t2i.diffusion.diffusion_loss); they differ only in where the latents come from:
    cache       CachedLatents (one file per image, read and checked) -> LatentSpace.from_distribution
    every step  the dataset's pixels (decoded, resized) -> LatentSpace.encode (the VAE encoder)
The VAE is a diffusers AutoencoderKL with random weights (speed does not depend on them), 3 levels (factor 4).
The cache's one-off build (with the flipped images) is timed apart and not part of either row.

    python bench/latent_cache.py                      # 64 images of 64 px, 30 steps of 8
    python bench/latent_cache.py --steps 60 --channels 128 256 256
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch


def vae(channels: list[int]):
    """A random AutoencoderKL with len(channels) levels, 2 ResNet blocks a level, 4 latent channels."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    n = len(channels)
    return AutoencoderKL(block_out_channels=channels, layers_per_block=2, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n).eval()


def train_row(name, loader, latents_of, unet, text, scheduler, noise, steps: int, warmup: int = 2):
    """(img/s, share of the time spent getting latents) over `steps` timed steps after `warmup` untimed ones."""
    from t2i.diffusion import diffusion_loss
    unet = copy.deepcopy(unet).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches, images, in_latents, total = iter(loader), 0, 0.0, 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)                                           # read: entries, or decoded pixels
        t1 = time.perf_counter()
        with torch.no_grad():
            x0 = latents_of(batch, g)                                   # (B, 4, h, w)
            states, mask, _ = text(batch["text"])
        t2 = time.perf_counter()
        loss = diffusion_loss(unet, scheduler, x0, states, mask, noise, g, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= warmup:
            images += x0.shape[0]
            in_latents += (t1 - t0 if name == "cache" else 0.0) + (t2 - t1)  # the cache's read is its encode
            total += t3 - t0
    return images / total, in_latents / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=64, help="images in the folder")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128, 128], help="the VAE's block_out_channels")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from functools import partial

    from torch.utils.data import DataLoader

    from t2i.config import NoiseConfig
    from t2i.data.folder import ImageFolderDataset
    from t2i.data.latents import CachedLatents, LatentCache
    from t2i.data.shapes import ShapesConfig, write_image_folder
    from t2i.diffusion import make_noise_scheduler
    from t2i.image_space import LatentSpace
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer, encode
    from t2i.unet import build_unet

    # 1. The folder, the frozen VAE and text encoder, the UNet at the VAE's latent size.
    root = Path(tempfile.mkdtemp(prefix="t2i-bench-latents-"))
    try:
        write_image_folder(ShapesConfig(size=args.size), args.num, root / "images", progress=False)
        dataset = ImageFolderDataset(root / "images", size=args.size, flip=True)
        space = LatentSpace(vae(args.channels))
        tokenizer = build_offline_tokenizer(dataset.captions, max_length=24)
        encoder = build_offline_text_encoder(tokenizer, width=64, layers=2, heads=4, seed=0).eval()
        text = partial(encode, tokenizer, encoder)
        h = args.size // space.factor
        torch.manual_seed(0)
        unet = build_unet("small", sample_size=h, in_channels=4, out_channels=4, cross_attention_dim=64)
        noise = NoiseConfig()
        scheduler = make_noise_scheduler(noise)

        # 2. The cache, built once (timed apart).
        t0 = time.perf_counter()
        cache = LatentCache(dataset, space, batch_size=16)
        cache.build(progress=False)
        build_s = time.perf_counter() - t0

        # 3. The two rows, same UNet weights, same order of samples.
        def loader(ds):
            return DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(0), num_workers=0)

        def forever(ds):
            while True:
                yield from loader(ds)

        cached = train_row("cache", forever(CachedLatents(cache)),
                           lambda b, g: space.from_distribution(b["latent_mean"], b["latent_std"], g),
                           unet, text, scheduler, noise, args.steps)
        every = train_row("every step", forever(dataset),
                          lambda b, g: space.encode((b["pixel_values"] + 1) / 2, g),
                          unet, text, scheduler, noise, args.steps)

        # 4. The table.
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        encoder_params = sum(p.numel() for p in space.vae.encoder.parameters()) / 1e6
        print(f"{args.num} shapes images of {args.size} px, flip on; VAE AutoencoderKL {args.channels} (random "
              f"weights, encoder {encoder_params:.1f}M params) -> latents 4 x {h} x {h}; UNet 'small' "
              f"({params:.1f}M params); {args.steps} steps of {args.batch} after 2 warm-up steps; CPU "
              f"({torch.get_num_threads()} threads), torch {torch.__version__}")
        print(f"building the cache: {build_s:.1f} s for {args.num} images and their mirror images "
              f"({2 * args.num / build_s:.1f} encodes/s)\n")
        print("| latents from | img/s | encode time share | x 'every step' |")
        print("|---|---|---|---|")
        for name, (rate, share) in [("cache", cached), ("every step (reference)", every)]:
            print(f"| {name} | {rate:.2f} | {share:.0%} | {rate / every[0]:.2f} |")
        print("\nencode time share: for 'every step' the VAE encoder, for 'cache' reading and checking the entries "
              "and drawing mean + std * eps")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
