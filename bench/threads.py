"""Seconds for one image of the shipped model (DPM-Solver++, guided) with 1 and 2 torch threads, with
OpenMP's threads spinning (libgomp's default) or sleeping (OMP_WAIT_POLICY=PASSIVE, what `t2i`
sets for generate, heatmap and evaluate), each in a fresh process, optionally with a busy loop
competing for the cores. A run that passes --timeout shows as '>T'.

    python bench/threads.py                  # the machine as it is
    python bench/threads.py --busy           # plus one `while True: pass` process
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from t2i.pipeline import load_pipeline
pipe = load_pipeline()
run = lambda: pipe("a red circle", num_inference_steps=int(sys.argv[2]), num_images_per_prompt=int(sys.argv[3]),
                   generator=torch.Generator().manual_seed(0))
run()
times = []
for _ in range(2):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
print(min(times))
"""


def seconds(threads: int, policy: str | None, steps: int, batch: int, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    try:
        run = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(batch)], env=env,
                             capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return f">{timeout:.0f}"
    return f"{float(run.stdout.split()[-1]):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", action="store_true", help="run a busy loop beside the measurements")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--timeout", type=float, default=45.0, help="seconds per configuration, start-up included")
    args = p.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores{', plus a busy loop' if busy else ''}; "
              f"{args.batch} image(s), {args.steps} steps, best of 2 timed calls, seconds")
        print("| OpenMP wait | 1 thread | 2 threads |\n|---|---|---|")
        for policy in (None, "PASSIVE"):
            cells = [seconds(n, policy, args.steps, args.batch, args.timeout) for n in (1, 2)]
            print(f"| {policy or 'spin (default)'} | " + " | ".join(cells) + " |")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
