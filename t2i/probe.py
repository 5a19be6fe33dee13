"""Does a shapes-world model place objects where the words say? Two cheap measures, for the position curve
that `t2i train` logs while it trains and for bench/position_probe.py.

1. The probe ratio: from pure noise (t = 999 by default, where the words are the only information about
   place), where the x0 the model predicts for "a red circle <position>" puts its red, as the distance to
   the stated cell's centre over the distance of "a red circle" (told nothing): the mean over the 8
   off-centre cells. 1.00: the words move nothing; 0: every red lands on its cell's centre.
2. The in-cell share: sampled images of fixed one-object prompts, one per cell and colour, scored by the
   learning-free segmenter: the share whose object (the largest of the prompted colour) sits in the stated cell.
"""
from __future__ import annotations

import torch

from .data.shapes import POSITION_PHRASES, POSITIONS
from .diffusion import alpha_bar_at, predict_x0
from .conditioning import UNetConditioning, unet_prediction

# (colour, shape) pairs for the in-cell prompts: none of them held out in configs/shapes32.yaml
CELL_OBJECTS = (("red", "circle"), ("blue", "diamond"))


def red_centroid(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) centroid (x, y) in [0, 1] of the redness of images (B, 3, H, W): red above the mean of green
    and blue, weighted by how much."""
    H, W = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    red = (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).clamp(min=0) + 1e-8      # (B, H, W)
    mass = red.sum(dim=(1, 2))
    return torch.stack([(red * xs).sum(dim=(1, 2)) / mass / W, (red * ys).sum(dim=(1, 2)) / mass / H], 1)


def cell_centres() -> torch.Tensor:
    """(9, 2) centre (x, y) in [0, 1] of each grid cell, in POSITIONS order."""
    return torch.tensor([[((i % 3) + 0.5) / 3, ((i // 3) + 0.5) / 3] for i in range(len(POSITIONS))])


@torch.no_grad()
def red_centroids(pipe, prompts: list[str], t: int, seeds: int) -> torch.Tensor:
    """(len(prompts), 2) mean centroid of the red in the x0 `pipe`'s UNet predicts at timestep t from
    `seeds` pure-noise draws (the same draws for every prompt)."""
    unet, space = pipe.unet, pipe.image_space
    if space.kind != "pixels":
        raise ValueError("the position probe reads colours off the predicted x0: it needs a pixel-space model")
    side, dtype = pipe.native_size, unet.dtype
    enc = pipe.conditioning.encode(prompts)
    cond = pipe.conditioning.unet_conditioning(enc, len(prompts), side, side)
    cond = UNetConditioning(cond.states.to(unet.device, dtype), None if cond.mask is None else cond.mask.to(unet.device),
                            cond.added)
    alpha_bar, prediction_type = alpha_bar_at(pipe.scheduler, t), pipe.scheduler.config.prediction_type
    out = torch.zeros(len(prompts), 2)
    for seed in range(seeds):
        noise = torch.randn(space.sample_shape(1, side, side), generator=torch.Generator().manual_seed(seed))
        noise = noise.repeat(len(prompts), 1, 1, 1).to(unet.device, dtype)
        pred = unet_prediction(unet, noise, t, cond)
        out += red_centroid(predict_x0(noise.float(), pred.float(), alpha_bar, prediction_type).cpu())
    return out / seeds


def probe_table(pipe, t: int = 999, seeds: int = 8) -> tuple[list[dict], float]:
    """Per cell: the red's centroid for "a red circle <phrase>", its distance to the cell's centre, the
    reference distance (no phrase) and their ratio; and the mean ratio over the 8 off-centre cells."""
    told = red_centroids(pipe, [f"a red circle {POSITION_PHRASES[p]}" for p in POSITIONS], t, seeds)
    plain = red_centroids(pipe, ["a red circle"], t, seeds)[0]
    rows, centres = [], cell_centres()
    for position, centroid, centre in zip(POSITIONS, told, centres):
        d, ref = (centroid - centre).norm().item(), (plain - centre).norm().item()
        rows.append({"position": position, "centroid": tuple(centroid.tolist()), "distance": d, "reference": ref,
                     "ratio": d / max(ref, 1e-8)})
    off_centre = [r["ratio"] for r in rows if r["position"] != "center"]
    return rows, sum(off_centre) / len(off_centre)


def cell_prompts(holdout_wording: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    """(prompt, colour, position) for every cell and CELL_OBJECTS pair: 18 one-object prompts in the template's
    wording, or, given held-out wording elements, each said with at least one of them (a fixed draw)."""
    prompts = [(f"a {colour} {shape} {POSITION_PHRASES[p]}", colour, p) for colour, shape in CELL_OBJECTS for p in POSITIONS]
    if holdout_wording is None:
        return prompts
    import numpy as np
    from .data.shapes import ShapeObject, ShapeScene
    from .data.wording import Grammar
    grammar, rng = Grammar(holdout_wording, "unseen"), np.random.default_rng(0)
    out = []
    for (_, colour, position), (_, shape) in zip(prompts, [o for o in CELL_OBJECTS for _ in POSITIONS]):
        row, col = divmod(POSITIONS.index(position), 3)
        obj = ShapeObject(shape, colour, "small", position, row, col, (0, 0, 1, 1))
        scene = ShapeScene(None, "", (obj,), None, ("colour", "shape", "position"))
        out.append((grammar.caption(scene, rng).text, colour, position))
    return out


@torch.no_grad()
def in_cell_share(pipe, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                  holdout_wording: tuple[str, ...] | None = None) -> tuple[float, float]:
    """(share of the cell prompts whose object lands in the stated cell, share whose colour is found at all),
    one image per prompt, seeds seed, seed + 1, ...; the prompts in held-out wordings when given."""
    from .metrics import to_uint8
    from .segment import segment
    from .settings import generators
    prompts = cell_prompts(holdout_wording)
    images = pipe([p for p, _, _ in prompts], num_inference_steps=steps, guidance_scale=guidance,
                  generator=generators(range(seed, seed + len(prompts))), output_type="np").images
    in_cell = found = 0
    for image, (_, colour, position) in zip(images, prompts):
        same_colour = [d for d in segment(to_uint8(image)) if d.colour == colour]
        if same_colour:  # the largest object of the prompted colour, as evaluate matches objects
            found += 1
            in_cell += max(same_colour, key=lambda d: d.area).position == position
    return in_cell / len(prompts), found / len(prompts)
