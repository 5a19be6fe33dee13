"""The sweep behind attention guidance's defaults: `t2i evaluate`'s scores of one model alone and guided from
each prompt's own words (t2i.attention.guidance), varying one strength at a time around the defaults (the
share of steps guided, gradient steps per sampling step, their size), with seconds per image measured in this
one process, side by side. Rows: the boxes, presence and both, and each strength varied for the boxes; columns: position, relation, count, exact, colour and shape on the held-out and the
paraphrase splits, each prompt's images from the same seeds in every row.

    python bench/guidance.py                              # the position-blind reference; docs/results.md
    python bench/guidance.py --model runs/shapes32/pipeline --prompts 24 --images 2
    python bench/guidance.py --time 5                     # seconds per image alone and guided, alternating
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from t2i.evaluate import EvalConfig, evaluate
from t2i.pipeline import load_pipeline
from t2i.settings import GuideSettings

SPLITS = ("held-out", "paraphrase")
POSITION_BLIND = Path(__file__).resolve().parent / "position_blind"
METRICS = ("position", "relation", "count", "exact", "colour", "shape")


def rows(base: GuideSettings) -> list[tuple[str, GuideSettings | None]]:
    """The unguided row; boxes (`--guide`'s layout), presence and both at the defaults; presence at a lower
    threshold; then each strength of the boxes moved down and up on its own."""
    out = [("alone", None), ("layout", base), ("excite", base), ("both", base),
           ("excite, threshold 0.3", dataclasses.replace(base, threshold=0.3))]
    for name, values in (("fraction", (base.fraction / 2, min(1.0, base.fraction * 2))),
                         ("iterations", (1, base.iterations * 2)),
                         ("step_size", (base.step_size / 2, base.step_size * 2))):
        out += [(f"layout, {name}={v:g}", dataclasses.replace(base, **{name: v})) for v in values]
    return out


def time_ratio(pipe, steps: int, repeats: int) -> None:
    """Seconds per image alone and guided (the defaults, boxes from the prompts), alternating in this process so
    that both see the same load; medians over `repeats` rounds of 8 images."""
    from t2i.settings import generators
    prompts = ["a red circle in the top left", "a blue square above a green triangle"] * 4
    runs = {"alone": {}, "guided": {"layout": True}}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats + 1):                             # round 0 warms up
        for name, kw in runs.items():
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, generator=generators(range(8)), output_type="np", **kw)
            if r:
                seconds[name].append((time.perf_counter() - t0) / len(prompts))
    times = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"| sampling | s/image | x alone |\n|---|---|---|\n| alone | {times['alone']:.3f} | 1.00 |\n"
          f"| guided (defaults) | {times['guided']:.3f} | {times['guided'] / times['alone']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(POSITION_BLIND), help="pipeline folder (default: bench/position_blind, "
                   "the model shipped before issue 16, which places objects at chance)")
    p.add_argument("--prompts", type=int, default=12, help="prompts per split (default: 12)")
    p.add_argument("--images", type=int, default=2, help="images per prompt (default: 2)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--only", nargs="*", help="row names to run (default: all)")
    p.add_argument("--time", type=int, metavar="REPEATS", help="only time alone against guided, REPEATS rounds")
    args = p.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.time:
        return time_ratio(pipe, args.steps, args.time)
    base = EvalConfig(num_prompts=args.prompts, images_per_prompt=args.images, steps=args.steps,
                      calibration_prompts=0, effect_prompts=0)
    print(f"# bench/guidance.py: {args.model}, {args.prompts} prompts per split x "
          f"{args.images} images, {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    header = ["row", "fraction", "iterations", "step size"] + [f"{s} {m}" for s in SPLITS for m in METRICS]
    print("| " + " | ".join(header + ["s/image", "x alone"]) + " |", flush=True)
    print("|" + "---|" * (len(header) + 2), flush=True)
    alone_time = None
    for name, guide in rows(GuideSettings()):
        if args.only and name not in args.only and name != "alone":
            continue
        kind = None if guide is None else name.split(",")[0]
        config = dataclasses.replace(base, guide=kind, guide_settings=guide or GuideSettings())
        report = evaluate(pipe, config, progress=False)
        per_image = report.split_seconds / report.split_images
        alone_time = alone_time or per_image
        settings = ["–"] * 3 if guide is None else [f"{guide.fraction:g}", str(guide.iterations), f"{guide.step_size:g}"]
        cells = [f"{100 * report.fidelity[s]['model'][m]['rate']:.1f}" if report.fidelity[s]['model'][m]['rate']
                 is not None else "–" for s in SPLITS for m in METRICS]
        print("| " + " | ".join([name, *settings, *cells,
                                 f"{per_image:.2f}", f"{per_image / alone_time:.2f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
