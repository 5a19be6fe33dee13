"""Do position words move anything? From pure noise (t = 999, where the text is the only information), a
model's x0 prediction for "a red circle <position>" should put the red where the words say. This prints, per
grid position, the centroid of the predicted red and its distance to the stated cell's centre, against the
reference of the same prompt without the position phrase (what the model draws when it is told nothing).

    python bench/position_probe.py                          # the shipped model
    python bench/position_probe.py --model runs/x/pipeline --t 999 900 --seeds 8

A model that uses position words has a distance well below the reference's (ratio < 1); the centre cell has
distance ~0 either way, so it is left out of the mean.
"""
from __future__ import annotations

import argparse

import torch

from t2i.pipeline import load_pipeline
from t2i.probe import probe_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--t", type=int, nargs="+", default=[999, 900], help="timesteps to probe (default: 999 900)")
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args()
    pipe = load_pipeline(args.model)
    print(f"model: {args.model or 'shipped'}; {args.seeds} noise draws per prompt; CPU, torch {torch.__version__}\n")
    print("| t | position | red centroid (x, y) | distance to the cell | without the phrase (reference) | x reference |")
    print("|---|---|---|---|---|---|")
    for t in args.t:
        rows, mean = probe_table(pipe, t, args.seeds)
        for r in rows:
            x, y = r["centroid"]
            print(f"| {t} | {r['position']} | ({x:.2f}, {y:.2f}) | {r['distance']:.3f} | {r['reference']:.3f} | "
                  f"{r['ratio']:.2f} |")
        print(f"| {t} | **mean, 8 off-centre cells** | | | | **{mean:.2f}** |")

if __name__ == "__main__":
    main()
