"""The space the UNet denoises in: pixels (t2i's own models) or a VAE's latents (Stable Diffusion, Rombach et
al. 2022). One object owns what differs between the two: the channels and size of the noise for an image of
H x W pixels, decoding the denoised sample (or a step's predicted x0) to an image in [0, 1], encoding an image,
and which scheduler options apply (x0 thresholding and clip_sample bound x0 to [-1, 1]: right for pixels,
wrong for latents, which are not bounded).
"""
from __future__ import annotations

import torch

from .settings import downsample_factor


class PixelSpace:
    """The UNet samples the image itself, in [-1, 1]: one sample cell per pixel."""

    kind = "pixels"
    factor = 1  # pixels per sample cell, along each side

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):  # 4 is a VAE's latents: they were saved as an RGBA PNG
            raise ValueError(f"the UNet denoises {channels} channels and the pipeline has no VAE to decode them: "
                             "pixels are 1 channel (grayscale) or 3 (RGB); give the pipeline the VAE the UNet was "
                             "trained with (vae=..., a latent image space), or use a UNet of 1 or 3 channels")
        self.channels = channels

    def sample_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of the noise for `batch` images of height x width pixels: (B, C, H / f, W / f)."""
        return batch, self.channels, height // self.factor, width // self.factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) samples -> (B, 3, H, W) float32 images in [0, 1]."""
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> samples (B, C, h, w)."""
        return images * 2 - 1

    def scheduler_options(self, options: dict) -> dict:
        """A scheduler's options for this space: pixels keep x0 thresholding and clip_sample as asked."""
        return dict(options)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PixelSpace":
        """The space with its frozen parts (a VAE) on `device` in `dtype` (None: as they are)."""
        return self

    def describe(self) -> str:
        return f"pixels, {self.channels} channels"


class LatentSpace(PixelSpace):
    """A VAE's latents: z = (encode(x) - shift) * scale, decoded as decode(z / scale + shift) (SD 1.x, 2.x and
    XL have no shift; a VAE with per-channel latents_mean/std, as Playground's, uses them instead)."""

    kind = "latents"

    def __init__(self, vae):
        config = vae.config
        self.vae = vae
        self.channels = config.latent_channels
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = config.scaling_factor
        self.shift_factor = getattr(config, "shift_factor", None) or 0.0
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.mean_std = None if mean is None or std is None else (torch.tensor(mean), torch.tensor(std))

    def to(self, device, dtype=None) -> "LatentSpace":
        from .stable_diffusion import quiet_third_party
        with quiet_third_party():  # diffusers warns of any cast, even to float32 on the CPU
            self.vae.to(device) if dtype is None else self.vae.to(device, dtype)
        return self

    def _decode_in(self) -> torch.dtype:
        """fp16 VAEs that say they overflow (SDXL's, force_upcast) decode in float32."""
        vae = self.vae
        return torch.float32 if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else vae.dtype

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean_std is not None:
            mean, std = (t.view(1, -1, 1, 1).to(z.device, z.dtype) for t in self.mean_std)
            z = z * std / self.scaling_factor + mean
        else:
            z = z / self.scaling_factor + self.shift_factor
        dtype, stored = self._decode_in(), self.vae.dtype
        if dtype != stored:
            self.vae.to(dtype)
        try:
            x = self.vae.decode(z.to(dtype), return_dict=False)[0]
        finally:
            if dtype != stored:
                self.vae.to(stored)
        return super().decode(x)

    def distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images in [0, 1] -> the VAE's latent distribution as (mean, std), each (B, C, h, w), in
        the VAE's own units (before the scaling factor). AutoencoderTiny encodes to a point: std is zero."""
        out = self.vae.encode((images * 2 - 1).to(self.vae.device, self.vae.dtype))
        dist = getattr(out, "latent_dist", None)
        if dist is None:
            return out.latents, torch.zeros_like(out.latents)
        return dist.mean, dist.std

    def from_distribution(self, mean: torch.Tensor, std: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw z = mean + std * eps from a latent distribution (a cached one, or `distribution`'s), scaled to
        what the UNet denoises: (z - shift) * scale, or per channel (z - mean_c) * scale / std_c."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + std * eps
        if self.mean_std is not None:
            mean_c, std_c = (t.view(1, -1, 1, 1).to(z.device, z.dtype) for t in self.mean_std)
            return (z - mean_c) * self.scaling_factor / std_c
        return (z - self.shift_factor) * self.scaling_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.from_distribution(*self.distribution(images), generator)

    def scheduler_options(self, options: dict) -> dict:
        """Latents are not bounded: no x0 thresholding, no clip_sample."""
        options = dict(options)
        if "thresholding" in options:
            options["thresholding"] = False
        options["clip_sample"] = False
        return options

    def describe(self) -> str:
        return (f"latents of a VAE ({type(self.vae).__name__}), {self.channels} channels, {self.factor}x smaller "
                f"than the image, scaling factor {self.scaling_factor:g}"
                + (f", shift {self.shift_factor:g}" if self.shift_factor else ""))


def image_space(vae=None, unet=None) -> PixelSpace:
    """The space of a pipeline: a VAE's latents, else pixels with the UNet's input channels."""
    if vae is not None:
        return LatentSpace(vae)
    return PixelSpace(unet.config.in_channels if unet is not None else 3)


def native_size(unet, space: PixelSpace) -> int:
    """The image side in pixels the UNet was made for: its sample size times the space's factor."""
    return unet.config.sample_size * space.factor


def size_multiple(unet, space: PixelSpace) -> int:
    """Image height and width must be multiples of this: the UNet's downsampling times the space's factor."""
    return downsample_factor(unet) * space.factor
