"""Where does training learn layout? The share of training steps in which an object's place is hidden in x_t.

A matched filter over an object's pixels sees it in x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps when
    d(t) = sqrt(SNR(t)) * contrast * sqrt(pixels * 3) >= 1,   SNR(t) = alpha_bar_t / (1 - alpha_bar_t),
with contrast the object's mean difference from the background in [-1, 1] units (about 1.1 in the shapes world)
over pixels * 3 values (RGB). Where d < 1 the model cannot read the object's place off the noisy image and has to
take it from the words: only those steps teach "top left". This prints, per noise schedule (beta schedule and
SNR shift) and timestep distribution (bias, uniform share, the step of a curriculum), the share of training
steps in which an object of each size is hidden, and the share of low-noise steps (t < 300) left for detail.

    python bench/schedule.py                                       # the table in docs/results.md
    python bench/schedule.py --size 64 --objects 8 14 28 --shift 1 2 4
"""
from __future__ import annotations

import argparse
import itertools


from t2i.config import NoiseConfig
from t2i.diffusion import make_noise_scheduler, timestep_probs


def hidden_share(cfg: NoiseConfig, side: int, contrast: float, step: int = 0) -> float:
    """Share of training timesteps (under timestep_probs at training step `step`) where a side x side object's
    matched-filter detectability d(t) is below 1."""
    alpha_bar = make_noise_scheduler(cfg).alphas_cumprod.double()
    d = (alpha_bar / (1 - alpha_bar)).sqrt() * contrast * (side * side * 3) ** 0.5
    return float((timestep_probs(cfg, len(alpha_bar), step) * (d < 1)).sum())


def low_noise_share(cfg: NoiseConfig, step: int = 0, below: int = 300) -> float:
    """Share of training timesteps with t < below: the steps that draw edges and clean backgrounds."""
    return float(timestep_probs(cfg, cfg.num_train_timesteps, step)[:below].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="image side in pixels (for the caption only)")
    p.add_argument("--objects", type=int, nargs="+", default=[8, 14], help="object sides in pixels (default: 8 14)")
    p.add_argument("--contrast", type=float, default=1.1)
    p.add_argument("--schedule", nargs="+", default=["squaredcos_cap_v2", "scaled_linear", "linear"])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="SNR shifts (noise.snr_shift)")
    p.add_argument("--bias", type=float, nargs="+", default=[1.0, 3.0], help="timestep biases (noise.timestep_bias)")
    p.add_argument("--uniform-share", type=float, nargs="+", default=[0.0, 0.5], help="noise.uniform_share")
    args = p.parse_args()
    sizes = " / ".join(f"{s}x{s}" for s in args.objects)
    print(f"{args.size} px images, objects {sizes}, contrast {args.contrast}: share of training steps where the "
          f"object's place is hidden (d < 1), and of steps with t < 300\n")
    print(f"| beta schedule | snr_shift | timestep_bias | uniform_share | hidden ({sizes}) | t < 300 |")
    print("|---|---|---|---|---|---|")
    for schedule, shift, bias, share in itertools.product(args.schedule, args.shift, args.bias, args.uniform_share):
        if bias == 1.0 and share:
            continue  # a mixture of uniform with uniform
        cfg = NoiseConfig(beta_schedule=schedule, snr_shift=shift, timestep_bias=bias, uniform_share=share)
        hidden = " / ".join(f"{hidden_share(cfg, s, args.contrast):.1%}" for s in args.objects)
        print(f"| {schedule} | {shift:g} | {bias:g} | {share:g} | {hidden} | {low_noise_share(cfg):.1%} |")


if __name__ == "__main__":
    main()
