"""Word effects of a model on its shapes world: silence each object word of a prompt in turn (prompt-to-
prompt reweighting to 0, same seed) and measure where the image changed: the share of the change inside
the object's mask (1 = only the object's pixels changed), per word class, and how the word's attention
map agrees with its effect map. The issue-11 target: silencing a colour word changes mostly pixels
inside its object's mask.

  python bench/effects.py                          # the shipped model, 64 seen prompts, 20 steps
  python bench/effects.py --model runs/my-run/pipeline --prompts 128 --split holdout
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from t2i.evaluate import EvalConfig, prompt_scenes, training_world
from t2i.faithfulness import sample_effects, score_faithfulness
from t2i.metrics import mass_share
from t2i.pipeline import load_pipeline

from _common import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--prompts", type=int, default=64, help="prompts, one image each")
    p.add_argument("--split", default="train", choices=["train", "holdout"], help="seen or held-out prompts")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = load_pipeline(args.model)
    world, source = training_world(pipe)
    config = EvalConfig(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    scenes = prompt_scenes(world, args.split, args.prompts, args.seed)
    t0 = time.perf_counter()
    found = sample_effects(pipe, scenes, dataclasses.replace(config, effect_prompts=args.prompts), split_id=1)
    seconds = time.perf_counter() - t0
    size = world.size
    scores = score_faithfulness(found, size)
    print(f"model: {args.model or 'shipped'} ({source}); {machine(torch.device('cpu'))}")
    print(f"{args.prompts} {args.split} prompts x 1 image, {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}; {seconds:.0f} s")
    print(f"{'word':<12}{'scored':>7}{'not found':>10}{'share in mask':>15}{'median':>8}{'words > 50%':>13}"
          f"{'pointing':>10}{'mask area':>11}{'attn corr':>11}")
    for word_class in ("colour", "noun"):
        effects, _, masks = found.arrays(word_class, size)
        if not len(effects):
            print(f"{word_class:<12}{0:>7}")
            continue
        shares = mass_share(effects, masks)
        e = scores[word_class]
        print(f"{word_class:<12}{len(effects):>7}{e['not_found']:>10}{100 * shares.mean():>14.1f}%"
              f"{100 * np.median(shares):>7.1f}%{100 * (shares > 0.5).mean():>12.1f}%"
              f"{100 * e['effect']['pointing']:>9.1f}%{100 * masks.mean():>10.1f}%{e['attention']['correlation']:>11.2f}")
    print("share in mask: the share of the image's change (mean |RGB difference|) inside the object's mask, "
          "averaged over words; mask area: the chance level (a change spread evenly).")


if __name__ == "__main__":
    main()
