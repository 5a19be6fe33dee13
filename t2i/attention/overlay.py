"""Drawing heatmaps: an inferno-like colormap (no matplotlib), a map alpha-blended on its image, a
labelled grid (the image, then one overlay per word), an animated GIF of a word over the steps, and a
word's effect beside its attention.
Small images are upscaled (nearest, to keep their pixels crisp) to `size` px before drawing.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .heatmaps import Heatmaps, resize_maps

# A perceptually ordered dark-to-bright ramp after matplotlib's 'inferno': (position, RGB) stops,
# linearly interpolated between them.
INFERNO_STOPS = torch.tensor([
    [0.000, 0, 0, 4], [0.125, 27, 12, 65], [0.250, 74, 12, 107], [0.375, 120, 28, 109],
    [0.500, 165, 44, 96], [0.625, 207, 68, 70], [0.750, 237, 105, 37], [0.875, 251, 155, 6],
    [1.000, 252, 255, 164]], dtype=torch.float32)
LABEL_HEIGHT = 22
EFFECT_FLOOR = 0.1  # effect maps are drawn on a scale of at least a 10% change (25 of 255 levels)
BACKGROUND = (255, 255, 255)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours of the inferno-like ramp."""
    pos, rgb = INFERNO_STOPS[:, 0].contiguous(), INFERNO_STOPS[:, 1:]
    x = values.detach().float().cpu().clamp(0, 1)
    i = torch.bucketize(x, pos[1:-1].contiguous())                                # segment index 0..len-2
    t = ((x - pos[i]) / (pos[i + 1] - pos[i]))[..., None]
    return (rgb[i] * (1 - t) + rgb[i + 1] * t).round().to(torch.uint8)


def display_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """(H, W) scaled so the longer side is `size` px (never below the original)."""
    H, W = image_size
    s = max(1.0, size / max(H, W))
    return round(H * s), round(W * s)


def upscale(image: Image.Image, size: int = 256) -> Image.Image:
    """Nearest-neighbour upscale so the longer side is `size` px."""
    H, W = display_size((image.height, image.width), size)
    return image.convert("RGB").resize((W, H), Image.NEAREST)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6, size: int = 256,
            mode: str = "bilinear") -> Image.Image:
    """The image, upscaled to `size`, blended with the colour-mapped `heat` (h, w) in [0, 1]
    (upsampled smoothly to the same size): (1 - alpha) * image + alpha * colour."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heat.ndim != 2:
        raise ValueError(f"heat must be one (h, w) map, got shape {tuple(heat.shape)}")
    base = upscale(image, size)
    heat = resize_maps(heat[None].float().cpu(), (base.height, base.width), mode)[0].clamp(0, 1)
    colour = colormap(heat).numpy().astype(np.float32)
    out = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colour
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _font(px: int = 14):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def labelled(tile: Image.Image, label: str) -> Image.Image:
    """The tile with its label centred in a strip beneath it."""
    out = Image.new("RGB", (tile.width, tile.height + LABEL_HEIGHT), BACKGROUND)
    out.paste(tile, (0, 0))
    draw, font = ImageDraw.Draw(out), _font()
    text = _fit(draw, label, font, tile.width - 4)
    w = draw.textlength(text, font=font)
    draw.text(((tile.width - w) / 2, tile.height + 3), text, fill=(0, 0, 0), font=font)
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


def word_overlays(image: Image.Image, heatmaps: Heatmaps, index: int = 0, words: list[str] | None = None,
                  normalize: str | None = "token", alpha: float = 0.6, size: int = 256) -> dict[str, Image.Image]:
    """{word label: overlay image} for image `index` of `heatmaps` (default: every word)."""
    maps = heatmaps.word_maps(index, words, normalize=normalize)
    return {label: overlay(image, m, alpha, size) for label, m in maps.items()}


def grid_image(image: Image.Image, heatmaps: Heatmaps, index: int = 0, words: list[str] | None = None,
               normalize: str | None = "token", alpha: float = 0.6, size: int = 256, columns: int = 6,
               title: bool = True) -> Image.Image:
    """A labelled grid: the image, then one overlay per word, `columns` tiles a row, the prompt on top."""
    tiles = [labelled(upscale(image, size), "image")]
    tiles += [labelled(im, label) for label, im in
              word_overlays(image, heatmaps, index, words, normalize, alpha, size).items()]
    return tile_grid(tiles, columns, heatmaps.prompts[index] if title else None)


def tile_grid(tiles: list[Image.Image], columns: int, title: str | None = None) -> Image.Image:
    """Equal-sized tiles in rows of `columns`, with an optional title line on top."""
    tw, th = tiles[0].size
    cols = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // cols)
    top = LABEL_HEIGHT + 4 if title else 0
    pad = 4
    out = Image.new("RGB", (cols * (tw + pad) + pad, top + rows * (th + pad) + pad), BACKGROUND)
    for k, tile in enumerate(tiles):
        out.paste(tile, (pad + (k % cols) * (tw + pad), top + pad + (k // cols) * (th + pad)))
    if title:
        draw, font = ImageDraw.Draw(out), _font(15)
        draw.text((pad, 5), _fit(draw, title, font, out.width - 2 * pad), fill=(0, 0, 0), font=font)
    return out


def effect_heat(effect: torch.Tensor) -> torch.Tensor:
    """An effect map (H, W) in [0, 1] scaled for drawing: by its peak, but never by less than EFFECT_FLOOR,
    so that a change too small to see stays dark instead of being stretched into a pattern."""
    return (effect / max(float(effect.max()), EFFECT_FLOOR)).clamp(0, 1)


def effect_panel(image: Image.Image, attention: torch.Tensor, reweighted: Image.Image, effect: torch.Tensor,
                 label: str, weight: float, alpha: float = 0.6, size: int = 256) -> Image.Image:
    """Side by side: the image, where `label` looks (its normalised attention map, (h, w)), the image
    with its weight set to `weight`, and where the image changed (the effect map, (H, W))."""
    tiles = [labelled(upscale(image, size), "image"),
             labelled(overlay(image, attention, alpha, size), f"attention: {label}"),
             labelled(upscale(reweighted, size), f"{label} x {weight:g}"),
             labelled(overlay(image, effect_heat(effect), alpha, size), f"effect (max {float(effect.max()):.2f})")]
    return tile_grid(tiles, 4)


def animate(image: Image.Image, heatmaps: Heatmaps, index: int, word: str, path: str | os.PathLike | None = None,
            normalize: str | None = "shared", alpha: float = 0.6, size: int = 256,
            duration_ms: int = 250) -> list[Image.Image]:
    """Frames of `word`'s map over the recorded steps (needs timeline=True), labelled with the step;
    written as a looping GIF when `path` is given. normalize='shared' keeps one scale for all frames."""
    frames_maps = heatmaps.word_timeline(index, word, normalize=normalize)    # (S, hc, wc)
    if normalize is None:
        frames_maps = frames_maps / frames_maps.amax().clamp_min(1e-12)
    S = heatmaps.num_inference_steps or (max(heatmaps.steps) + 1)
    frames = [labelled(overlay(image, m, alpha, size), f"{word}  step {s + 1}/{S}")
              for s, m in zip(heatmaps.steps, frames_maps)]
    if path is not None:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return frames
