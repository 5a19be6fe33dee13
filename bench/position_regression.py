"""Can the UNet and the offline CLIP route a position word into the layout at all? A diagnostic, not training:
regress E[x0 | text] from pure noise (t = 999, so the text is the only information) on one-object scenes whose
captions always state the position, and print where the predicted red goes for "a red circle in the top left"
against "... in the bottom right" as the steps go by. Reference: the same run without model.pos_embed.

    python bench/position_regression.py --steps 600                 # both rows, one after the other
    python bench/position_regression.py --steps 600 --only pos_embed  # one row (run two at once on two cores)
"""
from __future__ import annotations

import argparse
import time
from typing import Iterator

import torch

from t2i.data.shapes import ShapesConfig, ShapesDataset, caption_corpus
from t2i.probe import red_centroid
from t2i.text import build_offline_text_encoder, build_offline_tokenizer, encode_prompts
from t2i.unet import build_unet

PROBES = ["a red circle in the top left", "a red circle in the bottom right"]


def run(pos_embed: bool, steps: int, every: int) -> Iterator[tuple[int, float, list[tuple[float, float]]]]:
    world = ShapesConfig(size=32, min_objects=1, max_objects=1, position_prob=1.0)
    data = ShapesDataset(world, length=10**7)
    torch.manual_seed(0)
    tokenizer = build_offline_tokenizer(caption_corpus(world), 24)
    encoder = build_offline_text_encoder(tokenizer, width=128, layers=2, heads=4, seed=0)
    unet = build_unet("small", sample_size=32, cross_attention_dim=128, pos_embed=pos_embed)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=1e-3)
    for step in range(1, steps + 1):
        items = [data[32 * step + i] for i in range(32)]
        x0 = torch.stack([it["pixel_values"] for it in items])
        text = encode_prompts(tokenizer, encoder, [it["text"] for it in items])
        pred = unet(torch.randn_like(x0), 999, encoder_hidden_states=text.hidden_states,
                    encoder_attention_mask=text.attention_mask).sample
        loss = (pred - x0).pow(2).mean()                                    # the x0 a model predicts at t = T
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                probe = encode_prompts(tokenizer, encoder, PROBES)
                out = unet(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 999,
                           encoder_hidden_states=probe.hidden_states, encoder_attention_mask=probe.attention_mask).sample
            yield step, loss.item(), [tuple(c) for c in red_centroid(out).tolist()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--only", choices=["reference", "pos_embed"], help="run one row")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"batch 32, AdamW lr 1e-3, t = 999 only; CPU, one thread, torch {torch.__version__}\n")
    print("| step | row | loss | top left: red at (x, y) | bottom right: red at (x, y) | apart |")
    print("|---|---|---|---|---|---|")
    rows = [(False, "no pos_embed (reference)"), (True, "model.pos_embed")]
    for pos_embed, name in [r for r in rows if args.only is None or r[0] == (args.only == "pos_embed")]:
        t0 = time.perf_counter()
        for step, loss, ((ax, ay), (bx, by)) in run(pos_embed, args.steps, args.every):
            print(f"| {step} | {name} | {loss:.4f} | ({ax:.2f}, {ay:.2f}) | ({bx:.2f}, {by:.2f}) | {((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5:.2f} |",
                  flush=True)
        print(f"| | {name}: {time.perf_counter() - t0:.0f} s | | | | |")


if __name__ == "__main__":
    main()
