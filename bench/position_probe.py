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

from _common import red_centroid

from t2i.data.shapes import POSITIONS, POSITION_PHRASES
from t2i.diffusion import alpha_bar_at, predict_x0
from t2i.pipeline import load_pipeline
from t2i.text import encode_prompts


def red_centroids(pipe, prompts: list[str], t: int, seeds: int) -> torch.Tensor:
    """(len(prompts), 2) mean (x, y) in [0, 1] of the predicted x0's redness, over `seeds` noise draws."""
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    side = pipe.unet.config.sample_size
    out = torch.zeros(len(prompts), 2)
    for seed in range(seeds):
        noise = torch.randn((1, 3, side, side), generator=torch.Generator().manual_seed(seed)).repeat(len(prompts), 1, 1, 1)
        with torch.no_grad():
            pred = pipe.unet(noise, t, encoder_hidden_states=enc.hidden_states,
                             encoder_attention_mask=enc.attention_mask).sample
        x0 = predict_x0(noise, pred, alpha_bar_at(pipe.scheduler, t), pipe.scheduler.config.prediction_type)
        out += red_centroid(x0)
    return out / seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--t", type=int, nargs="+", default=[999, 900], help="timesteps to probe (default: 999 900)")
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args()
    pipe = load_pipeline(args.model)
    cells = [(position, ((i % 3) + 0.5) / 3, ((i // 3) + 0.5) / 3) for i, position in enumerate(POSITIONS)]
    print(f"model: {args.model or 'shipped'}; {args.seeds} noise draws per prompt; CPU, torch {torch.__version__}\n")
    print("| t | position | red centroid (x, y) | distance to the cell | without the phrase (reference) | x reference |")
    print("|---|---|---|---|---|---|")
    for t in args.t:
        told = red_centroids(pipe, [f"a red circle {POSITION_PHRASES[c]}" for c, _, _ in cells], t, args.seeds)
        plain = red_centroids(pipe, ["a red circle"], t, args.seeds)[0]
        ratios = []
        for (position, cx, cy), (x, y) in zip(cells, told.tolist()):
            target = torch.tensor([cx, cy])
            d, ref = (torch.tensor([x, y]) - target).norm().item(), (plain - target).norm().item()
            if position != "center":
                ratios.append(d / ref)
            print(f"| {t} | {position} | ({x:.2f}, {y:.2f}) | {d:.3f} | {ref:.3f} | {d / ref:.2f} |")
        print(f"| {t} | **mean, 8 off-centre cells** | | | | **{sum(ratios) / len(ratios):.2f}** |")


if __name__ == "__main__":
    main()
