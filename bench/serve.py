"""Timing of `t2i serve` against the CLI, on loopback: how long the server takes to start (model loaded),
and one Generate in the page (all maps: every resolution, a map per step, x0 previews, overlays, the
grid and the downloads, through the queue and HTTP) against `t2i heatmap` with the same settings, both
as the command's in-process work (sampling with recording, writing its files) and as a whole command.
The issue-11 targets: page generate within 2x the CLI's time; server start under 30 s on 2 cores.

  python bench/serve.py                       # the shipped model, 20 steps, 5 repeats
  python bench/serve.py --model runs/my-run/pipeline --steps 30
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def start_server(model: str | None) -> tuple[subprocess.Popen, str, float]:
    cmd = [sys.executable, "-m", "t2i.cli", "serve", "--port", "0", "--device", "cpu"]
    cmd += ["--model", model] if model else []
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("t2i explorer at "):
            return proc, line.split()[3], time.perf_counter() - t0
    log.seek(0)
    raise RuntimeError(f"t2i serve exited ({proc.wait()}) before it was ready:\n{log.read()[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from gradio_client import Client

    from t2i.attention import AttentionRecorder
    from t2i.attention.export import write_heatmap_outputs
    from t2i.pipeline import load_pipeline

    # 1. the server: start, then Generate as the page does (medians after one warm-up)
    proc, url, start_s = start_server(args.model)
    try:
        client = Client(url, download_files=False, verbose=False)
        page = []
        for k in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = client.predict(args.prompt, "", k, args.steps, 3.0, "default", None, 32, 1, False, False, "",
                                 api_name="/generate")
            page.append(time.perf_counter() - t0)
        assert "image(s)" in out[-1], out[-1]
    finally:
        proc.terminate()
        proc.wait()

    # 2. the CLI's work in-process (model loaded once), then the whole command
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    work, command = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats + 1):
            t0 = time.perf_counter()
            result = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(k), record_attention=AttentionRecorder())
            write_heatmap_outputs(result.attention, 0, result.images[0], Path(tmp) / f"w{k}")
            work.append(time.perf_counter() - t0)
        for k in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "t2i.cli", "heatmap", args.prompt, "--steps", str(args.steps),
                            "--seed", str(k), "--device", "cpu", "--out", str(Path(tmp) / f"c{k}")]
                           + (["--model", args.model] if args.model else []), check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            command.append(time.perf_counter() - t0)
    page_s, work_s, command_s = (statistics.median(x[1:] if len(x) > args.repeats else x) for x in (page, work, command))
    print(f"model: {args.model or 'shipped'}; CPU, torch {torch.__version__}; {args.steps} steps, guidance 3, "
          f"32x32, medians of {args.repeats}")
    print(f"server start (process launch to ready, model loaded): {start_s:.1f} s")
    print(f"page Generate with all maps (gradio_client, loopback): {page_s:.2f} s")
    print(f"t2i heatmap, in-process work (sample + record + write): {work_s:.2f} s  -> page / CLI work {page_s / work_s:.2f}x")
    print(f"t2i heatmap, whole command (start, load, sample, write): {command_s:.2f} s  -> page / command "
          f"{page_s / command_s:.2f}x")


if __name__ == "__main__":
    main()
