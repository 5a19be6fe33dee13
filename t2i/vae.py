"""A small KL autoencoder trained from scratch, for latent training where no pretrained VAE can be had offline:
`t2i train-vae`. It is the KL-regularised autoencoder of Rombach et al. 2022 (sec. 3 and appendix G) as diffusers'
AutoencoderKL, trained with a pixel reconstruction loss plus a small KL term (Kingma & Welling 2014, eq. 10),
without the paper's LPIPS and patch-GAN terms: flat-coloured worlds reconstruct well without them, and neither
can be downloaded offline. After training, `scaling_factor` = 1 / std of sampled latents (sec. 4.3.2 of the
paper, as Stable Diffusion did), so that scaled latents have unit variance.

The run folder `out` holds: `vae/` (the export that `model.vae=out/vae` and AutoencoderKL.from_pretrained open,
written atomically, with train_vae.json beside its weights), `reconstructions.png` (held-out originals over
their reconstructions) and `tensorboard/`. There is no resume: an interrupted run exports nothing, and an
earlier export in `out/vae` stays until a new one is complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

MARK = ".t2i-train-vae"  # written into a fresh --out: what is beside it, train-vae wrote
OWN_FILES = (MARK, "vae", "tensorboard", "reconstructions.png", ".vae.tmp", ".vae.old", ".reconstructions.png.tmp")
HOLDOUT_START = 2**30  # shapes world: held-out scenes are numbered from here on, past any training stream
LOSSES = ("l1", "mse")
REPORTERS = ("tensorboard", "none")


@dataclass(frozen=True)
class VAETrainConfig:
    """One `t2i train-vae` run: data, model size and optimisation. Sizes default to the worked example's
    VAE (shapes world at 64 px -> 16 x 16 x 4 latents)."""

    out: str
    data: str = "shapes"                   # "shapes" (the procedural world) or a captioned image folder or shards
    size: int = 64                         # image side in pixels, a multiple of the VAE's factor
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50                 # linear warm-up, then cosine decay to lr / 10
    seed: int = 0
    loss: str = "l1"                       # pixel reconstruction loss: l1 or mse, per pixel channel in [-1, 1]
    kl_weight: float = 1e-4                # times the KL per latent element
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one block per entry: factor 2 ** (len - 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    holdout: int = 64                      # held-out images for the reconstruction error (folders: at most 10%)
    calibration_batches: int = 8           # training batches whose latents set scaling_factor
    report_to: str = "tensorboard"         # or none

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("steps", "batch_size", "layers_per_block", "latent_channels", "holdout", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block width {self.block_out_channels} must be a multiple of norm_num_groups "
                             f"{self.norm_num_groups}; pick widths like (32, 64, 64)")
        if self.size < self.factor or self.size % self.factor:
            raise ValueError(f"--size {self.size} is not a multiple of the VAE's factor {self.factor} "
                             f"(2 ** (blocks - 1)); pass e.g. --size {max(1, round(self.size / self.factor)) * self.factor}")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ValueError(f"--lr must be > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")
        if not self.kl_weight >= 0:
            raise ValueError(f"--kl-weight must be >= 0 (1e-4 is typical), got {self.kl_weight}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.report_to not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}, got {self.report_to!r}")
        if self.data != "shapes" and not Path(self.data).is_dir():
            raise ValueError(f"--data {self.data}: no such folder; pass shapes or a folder of captioned images or "
                             "shards")
        if self.data == "shapes" and self.steps * self.batch_size > HOLDOUT_START:
            raise ValueError(f"--steps x --batch-size must stay under {HOLDOUT_START} shapes scenes (the held-out ones)")

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


def build_vae(cfg: VAETrainConfig):
    """A freshly initialised AutoencoderKL: (B, 3, size, size) <-> (B, latent_channels, size / f, size / f)."""
    from diffusers import AutoencoderKL
    n = len(cfg.block_out_channels)
    torch.manual_seed(cfg.seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_num_groups, sample_size=cfg.size, mid_block_add_attention=False,
                         force_upcast=False)


def vae_datasets(cfg: VAETrainConfig) -> tuple[Dataset, Dataset]:
    """(training set, held-out set) of {"pixel_values": (3, size, size) in [-1, 1]} items. The shapes world
    holds out scenes numbered from HOLDOUT_START; a folder or shards the last 10% (at most cfg.holdout)."""
    if cfg.data == "shapes":
        from .data.shapes import ShapesConfig, ShapesDataset
        world = ShapesConfig(size=cfg.size, split="all")
        held = ShapesDataset(world, length=HOLDOUT_START + cfg.holdout)
        return ShapesDataset(world, length=HOLDOUT_START), Subset(held, range(HOLDOUT_START, len(held)))
    root = Path(cfg.data)
    if (root / "state.json").is_file() or any(root.rglob("*.parquet")):
        from .data.shards import ShardDataset
        ds = ShardDataset(root, size=cfg.size)
    else:
        from .data.folder import ImageFolderDataset
        ds = ImageFolderDataset(root, size=cfg.size)
    if len(ds) < 2:
        raise ValueError(f"--data {cfg.data} holds {len(ds)} image; train-vae needs at least 2 (one is held out)")
    n = min(cfg.holdout, max(1, len(ds) // 10))
    return Subset(ds, range(len(ds) - n)), Subset(ds, range(len(ds) - n, len(ds)))


class VAELoss(torch.nn.Module):
    """The objective around the VAE, so that a distributed wrapper sees one forward: x -> (rec, kl)."""

    def __init__(self, vae, loss: str):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> the reconstruction loss per pixel channel and the KL per latent element."""
        posterior = self.vae.encode(x).latent_dist            # mean, std: (B, C, H/f, W/f)
        z = posterior.sample(generator=generator)             # z ~ q(z | x)
        x_hat = self.vae.decode(z).sample                     # (B, 3, H, W)
        err = x_hat - x
        rec = err.abs().mean() if self.loss == "l1" else err.square().mean()
        kl = posterior.kl().mean() / z[0].numel()             # KL(q(z | x) || N(0, I)), per latent element
        return rec, kl


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> its reconstruction from the posterior mean, in [-1, 1]."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def reconstruction_error(vae, batches) -> dict[str, float]:
    """Mean absolute error and PSNR of reconstructions, on images in [0, 1], over all pixels of `batches`."""
    abs_sum = sq_sum = count = 0.0
    for x in batches:
        err = (reconstruct(vae, x) - x) / 2                   # in [0, 1] units
        abs_sum += err.abs().sum().item()
        sq_sum += err.square().sum().item()
        count += err.numel()
    mse = sq_sum / count
    return {"mean_abs": abs_sum / count, "psnr": 10 * math.log10(1 / max(mse, 1e-12))}


@torch.no_grad()
def calibrate(vae, batches, generator: torch.Generator | None = None) -> tuple[float, float, float]:
    """(scaling_factor, std, mean) of latents z ~ q(z | x) over `batches`: scaling_factor = 1 / std, so that
    z * scaling_factor has unit variance (Rombach et al. 2022, sec. 4.3.2)."""
    z = torch.cat([vae.encode(x).latent_dist.sample(generator=generator).flatten() for x in batches]).double()
    std = z.std().item()
    if not std > 0:
        raise ValueError("the latents have no spread (std 0); train longer or with a smaller --kl-weight")
    return 1 / std, std, z.mean().item()


def claim_out(out: Path, overwrite: bool) -> None:
    """Take `out` for a run: a new or empty folder, or one that train-vae wrote (marked); an earlier export
    there needs `overwrite` and stays until the new one replaces it. Anything else is refused, never replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a new or empty folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in held if name not in OWN_FILES] if MARK in held else held
    if foreign:
        raise ValueError(f"--out {out} holds files that t2i train-vae did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); nothing there is replaced: choose a new or empty --out")
    if "vae" in held and not overwrite:
        raise ValueError(f"--out {out} holds a trained VAE (vae/): pass --overwrite to replace it (it stays until the "
                         "new one is complete), or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("t2i train-vae writes here; what it wrote may be replaced\n")
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def export_vae(vae, folder: Path, info: dict) -> Path:
    """save_pretrained (safetensors) plus train_vae.json into `folder`, atomically: staged beside it, renamed
    into place when complete, so a failure leaves no half-written folder and keeps an older one."""
    from .checkpoint import staged_folder
    with staged_folder(folder, then="free space and run t2i train-vae again") as stage:
        vae.save_pretrained(stage, safe_serialization=True)
        (stage / "train_vae.json").write_text(json.dumps(info, indent=1))
    return folder


def save_side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path, upscale: int = 2) -> None:
    """(N, 3, H, W) in [-1, 1] each -> one PNG, originals in the top row, reconstructions below; atomic."""
    from PIL import Image
    grid = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(reconstructions), dim=2)], dim=1)  # (3, 2H, NW)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels).resize((pixels.shape[1] * upscale, pixels.shape[0] * upscale), Image.NEAREST)
    stage = path.with_name(f".{path.name}.tmp")
    image.save(stage, format="PNG")
    os.replace(stage, path)


def _lr_factor(cfg: VAETrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_vae(cfg: VAETrainConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Train, calibrate and export a VAE into `{cfg.out}/vae`; returns what train_vae.json records (metrics,
    scaling factor, throughput)."""
    from accelerate import Accelerator

    from .data.stream import CounterSampler, Epoched

    # 1. check the data and the run folder before anything is written
    out = Path(cfg.out)
    train_set, held_set = vae_datasets(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), project_dir=str(out),
                              log_with=None if cfg.report_to == "none" else cfg.report_to)
    if accelerator.is_main_process:
        claim_out(out, overwrite)
    accelerator.wait_for_everyone()

    # 2. the model, its objective, the optimiser and the data stream
    vae = build_vae(cfg)
    objective = VAELoss(vae, cfg.loss)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    sampler = CounterSampler(len(train_set), cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                             cfg.seed, shuffle=cfg.data != "shapes")  # a shapes scene is already a random draw
    stream = iter(DataLoader(Epoched(train_set), batch_size=cfg.batch_size, sampler=sampler, drop_last=True))
    noise = torch.Generator(accelerator.device).manual_seed(cfg.seed * 1000 + accelerator.process_index)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("tensorboard", config={k: str(v) for k, v in asdict(cfg).items()})

    # 3. train: reconstruction + kl_weight * KL
    start, bar = time.perf_counter(), tqdm(range(cfg.steps), desc="train-vae", dynamic_ncols=True,
                                           disable=not (progress and accelerator.is_main_process))
    for step in bar:
        x = next(stream)["pixel_values"].to(accelerator.device)   # (B, 3, H, W) in [-1, 1]
        rec, kl = objective(x, generator=noise)
        loss = rec + cfg.kl_weight * kl
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
            accelerator.log({"loss": loss.item(), "rec": rec.item(), "kl": kl.item(),
                             "lr": schedule.get_last_lr()[0]}, step=step)
    seconds = time.perf_counter() - start
    bar.close()

    # 4. calibrate the scaling factor, measure held-out reconstructions, export (main process)
    report: dict = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(objective).vae.eval()
        calibration = [next(stream)["pixel_values"].to(accelerator.device) for _ in range(cfg.calibration_batches)]
        scaling, std, mean = calibrate(vae, calibration, torch.Generator(accelerator.device).manual_seed(cfg.seed))
        vae.register_to_config(scaling_factor=scaling)
        held = [b["pixel_values"].to(accelerator.device) for b in DataLoader(held_set, batch_size=cfg.batch_size)]
        metrics = reconstruction_error(vae, held)
        report = {"config": asdict(cfg), "steps": cfg.steps, "held_out_images": len(held_set), **metrics,
                  "scaling_factor": scaling, "latent_std": std, "latent_mean": mean,
                  "train_seconds": seconds, "images_per_second": cfg.steps * cfg.batch_size
                  * accelerator.num_processes / seconds, "device": str(accelerator.device)}
        shown = held[0][:8]
        save_side_by_side(shown, reconstruct(vae, shown), out / "reconstructions.png")
        export_vae(vae, out / "vae", report)
        accelerator.log({"held_out/psnr": metrics["psnr"], "held_out/mean_abs": metrics["mean_abs"]}, step=cfg.steps)
    accelerator.end_training()
    return report
