"""Benchmark of cross-attention recording: sampling time with recording off, with t2i's
AttentionRecorder (float32 running sums), and with a naive store-every-map reference that keeps each
step's per-head maps of every cross-attention layer, so its memory grows with the number of steps. It is
not prompt-to-prompt's AttentionStore (Hertz et al. 2022), which sums maps over steps but holds the
current step's store and the running sum for self- as well as cross-attention layers, about 4x the
maps it counts. All three run in one process.

  python bench/attention.py                      # small preset, 32x32, 4 prompts, 10 and 20 steps
  python bench/attention.py --preset tiny --size 16 --steps 4 8 --repeats 2
  python bench/attention.py --preset base --size 64 --prompts 8 --threads 8
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from t2i.attention import AttentionRecorder, attention_with_probs, cross_attention_modules

from _common import CORPUS, random_pipeline

class StoreEveryMapRecorder:
    """Naive reference: keeps p (rows, heads, N, T) of every cross-attention layer at every step."""

    def __init__(self):
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self._step = 0

    @contextmanager
    def record(self, unet, layout):
        self.maps = {}
        modules = cross_attention_modules(unet)
        originals = {k: m.processor for k, m in modules.items()}
        try:
            for name, m in modules.items():
                m.processor = self._processor(name)
            yield self
        finally:
            for name, m in modules.items():
                m.processor = originals[name]

    def _processor(self, name):
        def process(attn, x, context=None, mask=None):
            q, k, v = attn.project(x, context)
            o, p = attention_with_probs(q, k, v, mask, attn.scale)
            self.maps[(self._step, name)] = p.detach().clone()
            return attn.merge(o)
        return process

    def set_step(self, i: int) -> None:
        self._step = i

    @property
    def bytes_kept(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.maps.values())

    def heatmaps(self):
        return self.maps


def sample_once(pipe, prompts, steps, size, recorder, device):
    """Seconds for one guided sampling run; the recorder's bytes kept; CUDA peak bytes (else None)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=size, width=size, output_type="pt",
         generator=torch.Generator().manual_seed(0), record_attention=recorder)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return seconds, (recorder.bytes_kept if recorder is not None else 0), peak


def bench(device: str, args) -> None:
    pipe = random_pipeline(args.preset, args.text_width, scheduler="ddim").to(device)
    prompts = (CORPUS * args.prompts)[: args.prompts]
    modes = {"off": lambda: None, "ours": AttentionRecorder, "store-every-map": StoreEveryMapRecorder}
    sample_once(pipe, prompts, 2, args.size, AttentionRecorder(), device)  # warm-up
    n_layers = len(cross_attention_modules(pipe.unet))
    print(f"\n{device}: preset {args.preset}, {args.size}x{args.size}, {len(prompts)} prompts x 2 (guidance), "
          f"{n_layers} cross-attention layers, best and median of {args.repeats} runs, threads {torch.get_num_threads()}")
    print(f"{'steps':>5}  {'recorder':<16}{'best s':>8}{'median s':>10}{'best/off':>10}{'median/off':>12}{'bytes kept':>13}"
          + (f"{'peak MiB':>10}" if device.startswith("cuda") else ""))
    for steps in args.steps:
        times = {m: [] for m in modes}
        kept, peak = {}, {}
        order = list(modes)
        for r in range(args.repeats):  # interleaved in rotating order, so background load hits every mode alike
            for mode in order[r % 3:] + order[: r % 3]:
                s, kept[mode], peak[mode] = sample_once(pipe, prompts, steps, args.size, modes[mode](), device)
                times[mode].append(s)
        off, off_med = min(times["off"]), statistics.median(times["off"])
        for mode in modes:
            best, med = min(times[mode]), statistics.median(times[mode])
            line = (f"{steps:>5}  {mode:<16}{best:>8.3f}{med:>10.3f}{best / off:>9.3f}x{med / off_med:>11.3f}x"
                    f"{kept[mode]:>13,}")
            if peak[mode] is not None:
                line += f"{peak[mode] / 2**20:>10.1f}"
            print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="UNet preset: tiny, small, base")
    p.add_argument("--text-width", type=int, default=128, help="offline text encoder width")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch (each also has an unconditional row)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20], help="sampling step counts to compare")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, and cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small, busy machine more threads only add noise)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        bench(device, args)


if __name__ == "__main__":
    main()
