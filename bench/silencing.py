"""Does weight 0 take a word out of the picture? One-object prompts ("a red circle in the top left"), each
image drawn as it is and with its colour word silenced, then with the colour word and the noun silenced, by
three methods, same seed and settings; the learning-free segmenter then looks for the object:
  cross-attention   prompt-to-prompt's reweighting in the UNet's cross-attention only (t2i before issue #22)
  everywhere        also the word's keys in the text encoder's self-attention and t2i's context layer
                    (word_weights' default since issue #22)
  counterfactual    the prompt re-encoded with the words deleted ("a in the top left")
Scores: "colour gone", the share of images (among those whose object was drawn with the word in place)
with no object of the prompted colour once the colour word is silenced; "object gone", the share with no
object of the prompted colour and shape once both words are silenced. Target (issue #22): >= 90% each.

  python bench/silencing.py                                   # the shipped model
  python bench/silencing.py --model bench/position_blind      # the reference
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from t2i.data.shapes import PALETTE, POSITION_PHRASES, POSITIONS, SHAPES
from t2i.metrics import to_uint8
from t2i.pipeline import load_pipeline
from t2i.segment import segment
from t2i.settings import generators

from _common import machine

HELD_OUT = {("green", "triangle"), ("purple", "circle")}  # configs/shapes32.yaml's held-out pairs


def prompts(num: int, seed: int) -> list[tuple[str, str, str]]:
    """`num` one-object prompts (prompt, colour, shape) with positions, none held out in training."""
    combos = [(c, s, p) for c, s, p in itertools.product(PALETTE, SHAPES, POSITIONS)
              if (c, s) not in HELD_OUT and not (s == "square" and p == "bottom right")]
    rng = np.random.default_rng(seed)
    chosen = [combos[i] for i in rng.choice(len(combos), num, replace=False)]
    return [(f"a {c} {s} {POSITION_PHRASES[p]}", c, s) for c, s, p in chosen]


def draw(pipe, texts, seeds, args, **kwargs) -> list[np.ndarray]:
    out = []
    for i in range(0, len(texts), args.batch_size):
        batch = slice(i, i + args.batch_size)
        extra = {k: v[batch] if isinstance(v, list) else v for k, v in kwargs.items()}
        out += list(pipe(texts[batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                         generator=generators(seeds[batch]), output_type="np", **extra).images)
    return [to_uint8(im) for im in out]


def found(image: np.ndarray, colour: str, shape: str | None = None) -> bool:
    return any(d.colour == colour and (shape is None or d.shape == shape) for d in segment(image))


def delete(prompt: str, words: list[str]) -> str:
    return " ".join(w for w in prompt.split() if w not in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = [r for r in prompts(args.prompts, args.seed) for _ in range(args.images_per_prompt)]
    texts = [t for t, _, _ in rows]
    seeds = [args.seed + i for i in range(len(rows))]
    t0 = time.perf_counter()
    base = draw(pipe, texts, seeds, args)
    drawn = [found(im, c, s) for im, (_, c, s) in zip(base, rows)]
    colour_drawn = [found(im, c) for im, (_, c, _) in zip(base, rows)]
    print(f"model: {args.model or 'the shipped model'}; {len(rows)} images, {args.steps} steps, guidance "
          f"{args.guidance}; {machine(torch.device('cpu'))}")
    print(f"drawn as prompted without silencing: colour {np.mean(colour_drawn):.0%}, colour and shape {np.mean(drawn):.0%}")
    print("| method | colour gone (colour word at 0) | object gone (colour word and noun at 0) | mean change |")
    print("|---|---|---|---|")
    for method in ("cross-attention", "everywhere", "counterfactual"):
        results = []
        for silenced in (["colour"], ["colour", "shape"]):
            words = [[c if w == "colour" else s for w in silenced] for _, c, s in rows]
            if method == "counterfactual":
                images = draw(pipe, [delete(t, ws) for t, ws in zip(texts, words)], seeds, args)
            else:
                images = draw(pipe, texts, seeds, args, word_weights=[{w: 0.0 for w in ws} for ws in words],
                              reweight_text=method == "everywhere")
            keep = colour_drawn if silenced == ["colour"] else drawn
            gone = [not found(im, c, s if len(silenced) == 2 else None)
                    for im, (_, c, s), k in zip(images, rows, keep) if k]
            change = np.mean([np.abs(a.astype(float) - b.astype(float)).mean() / 255 for a, b in zip(images, base)])
            results.append((np.mean(gone), sum(gone), len(gone), change))
        (c_rate, c_hits, c_n, c_change), (o_rate, o_hits, o_n, o_change) = results
        print(f"| {method} | {c_rate:.0%} ({c_hits}/{c_n}) | {o_rate:.0%} ({o_hits}/{o_n}) | "
              f"{c_change:.3f} / {o_change:.3f} |")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
