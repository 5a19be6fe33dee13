"""Prompt fidelity against sampling steps and guidance scale, the measurement behind the CLI's
defaults: each (steps, guidance) cell samples the same prompts with the same seeds and is scored by
`t2i evaluate`'s segmenter. Prints one markdown table per split, and the seconds per image.

    python bench/sampling_sweep.py                                  # the shipped model, seen + paraphrase
    python bench/sampling_sweep.py --model runs/x/pipeline --steps 10,20 --guidance 1,3,5
"""
from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

from t2i.evaluate import EvalConfig, paraphrase_scenes, pct, prompt_scenes, sample_and_score, training_world
from t2i.metrics import GENEVAL
from t2i.pipeline import load_pipeline

from _common import machine

COLUMNS = ("shape", "size", "position", "relation", "count", "exact")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--guidance", default="1,2,3,5,7")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args()

    pipe = load_pipeline(args.model)
    world, _ = training_world(pipe)
    splits = {"seen": prompt_scenes(world, "train", args.num_prompts, args.seed),
              "paraphrase": paraphrase_scenes(world, args.num_prompts, args.seed)}
    steps = [int(s) for s in args.steps.split(",")]
    scales = [float(g) for g in args.guidance.split(",")]
    rows = {name: [] for name in splits}
    total = len(steps) * len(scales) * sum(len(s) for s in splits.values()) * args.images_per_prompt
    with tqdm(total=total, unit="img", desc="sweep") as bar:
        for n in steps:
            for g in scales:
                config = EvalConfig(steps=n, guidance=g, seed=args.seed)
                for split_id, (name, scenes) in enumerate(splits.items(), start=1):
                    t0 = time.perf_counter()
                    tally, _, images = sample_and_score(pipe, scenes, config, split_id, args.images_per_prompt, bar)
                    per_image = (time.perf_counter() - t0) / images
                    overall = [tally.rate(m) for m in GENEVAL if tally.rate(m) is not None]
                    rows[name].append([str(n), f"{g:g}"] + [pct(tally.rate(m)) for m in COLUMNS]
                                      + [pct(sum(overall) / len(overall)), f"{per_image:.3f}"])
    print(f"# Fidelity against steps and guidance: {args.model or 'the shipped model'}; {machine(pipe.device)}")
    print(f"{args.num_prompts} prompts x {args.images_per_prompt} images per split and cell, seed {args.seed}, "
          f"scheduler {type(pipe.scheduler).__name__}")
    for name, table in rows.items():
        print(f"\n## {name}\n")
        header = ["steps", "guidance"] + list(COLUMNS) + ["GenEval-style overall", "s/img"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in table:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
