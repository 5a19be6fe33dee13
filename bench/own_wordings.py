"""Prompts in wordings of our own (none of them a training template or a grammar frame as written), drawn by
two models side by side at fixed seeds; the segmenter says what each image holds (colour shape @ grid cell),
and a grid of the images is written for the README.

  python bench/own_wordings.py                                        # the shipped model against bench/template_default
  python bench/own_wordings.py --models bench/template_default runs/x/pipeline --out outputs/own-wordings.png
  python bench/own_wordings.py --models runs/shapes64-latent/pipeline --prompts "a red circle" "a blue square"
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from t2i.metrics import to_uint8
from t2i.pipeline import load_pipeline
from t2i.segment import segment
from t2i.settings import generators

PROMPTS = (
    ("there's a small green square up in the top right corner", "green square @ top right"),
    ("Blue circle, bottom left.", "blue circle @ bottom left"),
    ("i would like to see a yellow triangle in the middle", "yellow triangle @ center"),
    ("a purple diamond that is to the right of a red circle", "purple diamond right of red circle"),
    ("In the picture: an orange circle above a green diamond!", "orange circle above green diamond"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[None, "bench/template_default"],
                   help="pipeline folders (None: the shipped model)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default="outputs/own-wordings.png", help="the grid: a row per model and prompt")
    p.add_argument("--prompts", nargs="+", help="prompts of your own instead of the wordings above")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        pipe = load_pipeline(None if model in (None, "None", "default") else model)
        pipe.set_progress_bar_config(disable=True)
        print(f"## {model or 'the shipped model'}")
        for prompt, meant in [(q, q) for q in args.prompts] if args.prompts else PROMPTS:
            images = pipe([prompt] * args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=generators(range(args.seeds)), output_type="np").images
            said = ["; ".join(f"{d.colour} {d.shape} @ {d.position}" for d in segment(to_uint8(im))) or "nothing"
                    for im in images]
            print(f"- {prompt!r} (meant: {meant}):")
            for k, s in enumerate(said):
                print(f"    seed {k}: {s}")
            rows.append(np.concatenate([to_uint8(im) for im in images], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: a row per model and prompt, {args.seeds} seeds a row")


if __name__ == "__main__":
    main()
