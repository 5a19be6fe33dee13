"""Image transforms for training data: load as RGB, resize + square crop, flip, PIL <-> tensor in [-1, 1],
done with PIL, numpy and torch (no torchvision).

    image = load_rgb(path)                                  # any mode -> RGB
    image = resize_and_crop(image, 64, crop="random", rng=rng)
    x = to_tensor(image)                                    # (3, 64, 64) float32 in [-1, 1]
    image = to_pil(x)                                       # back to PIL
"""

from __future__ import annotations

import os
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

CropMode = Literal["center", "random"]
CROP_MODES = ("center", "random")

# Above this downscale factor PIL first shrinks with a box filter (Image.reduce), then
# finishes with Lanczos: as good as a full Lanczos pass, and much faster for photos.
REDUCING_GAP = 3.0

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """32-bit int or 16-bit greyscale -> 8-bit 'L', mapping 0..65535 onto 0..255."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))  # (H, W) -> "L"


def load_rgb(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open an image file (a path or a binary file object) as an 8-bit RGB PIL image (H, W, 3).

    Handles every PIL mode: palette, greyscale, 16-bit, CMYK, and alpha (composited on
    white, so transparent backgrounds do not turn black). Applies the EXIF orientation so
    phone photos come out upright. Animated GIF/WebP: the first frame.
    """
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode in _INT_MODES:
        image = _to_8bit_grey(image)
    elif image.mode == "F":
        image = image.convert("L")  # float images: values clipped to 0..255
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image,
    size: int,
    crop: CropMode = "center",
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Resize the short side to `size`, then crop a (size, size) square.

    The square is chosen in the source image and resampled once (Lanczos, with a box
    pre-reduction for big downscales), which equals resize-then-crop but is cheaper.
    crop="center" takes the middle; crop="random" takes an offset drawn from `rng`.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}.")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs rng=np.random.default_rng(seed) for reproducible crops.")
    width, height = image.size
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
    box = (left, top, left + side, top + side)
    if side == size:
        return image.crop(box)
    return image.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def horizontal_flip(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """Mirror left-right: a PIL image, or a tensor (..., H, W) along its last dim."""
    if isinstance(image, torch.Tensor):
        return image.flip(-1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image (H, W) -> float32 tensor (3, H, W) in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {image.mode!r}; load it with load_rgb(path).")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Tensor (3, H, W) -> PIL image, or (B, 3, H, W) -> list of B PIL images.

    Values are read as [-1, 1] and clamped; any device and dtype.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(
            f"to_pil expects a (3, H, W) or (B, 3, H, W) tensor in [-1, 1], got shape {tuple(images.shape)}."
        )
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.movedim(-3, -1).numpy()  # (..., H, W, 3)
    if pixels.ndim == 3:
        return Image.fromarray(pixels)
    return [Image.fromarray(p) for p in pixels]
