"""The hash of every image each front-end samples at fixed seeds with the shipped model (a few steps): `t2i
generate` (four schedulers, a negative prompt, guidance below 1), `t2i heatmap`, `t2i effect`, the explorer's
Generate and reweight, and `t2i evaluate` (its report). Run it before and after a change that must not move a
pixel, and diff the two files.

    python bench/sampling_hashes.py before.json     # on the old code
    python bench/sampling_hashes.py after.json      # on the new; then: diff before.json after.json
"""
import argparse
import hashlib
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i.cli import main
from t2i.evaluate import EvalConfig, evaluate
from t2i.explorer import Explorer, Request
from t2i.pipeline import T2IPipeline, load_pipeline

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("out", help="the JSON file to write")
args = p.parse_args()
warnings.simplefilter("ignore")
torch.set_num_threads(1)

calls: list[str] = []
sample = T2IPipeline.__call__


def hashed(self, *a, **k):
    """Every pipeline call, whichever front-end makes it: the hash of its images' bytes."""
    out = sample(self, *a, **k)
    images = out.images if hasattr(out, "images") else out[0]
    arrays = [np.asarray(im) for im in images] if isinstance(images, list) else [np.asarray(images)]
    calls.append(digest(b"".join(x.tobytes() for x in arrays)))
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def pngs(folder: Path) -> dict[str, str]:
    """The hash of the pixels of every PNG a command wrote."""
    return {p.relative_to(folder).as_posix(): digest(np.asarray(Image.open(p)).tobytes())
            for p in sorted(folder.rglob("*.png"))}


def command(out: Path, *argv: str):
    return main([*argv, "--out", str(out)]), pngs(out)


def explore():
    explorer = Explorer([None], "cpu")
    r = explorer.generate(Request("a red circle above a blue square", negative="green", seed=7, steps=4,
                                  guidance=2.5, scheduler="euler-a", num_images=2))
    changed = explorer.reweight(r, "red", 0.0, index=1)[0]
    explorer.close()
    return [digest(np.asarray(im).tobytes()) for im in r.images + [changed]]


def evaluated():
    report = evaluate(load_pipeline(), EvalConfig(num_prompts=2, images_per_prompt=2, steps=3, calibration_prompts=2,
                                                  batch_size=3, effect_prompts=1, scheduler="ddim", seed=11),
                      progress=False).to_dict()
    for volatile in ("seconds", "split_seconds", "model"):   # times, and the path of the model in another checkout
        report.pop(volatile)
    report["world"].pop("source")
    report["calibration"].pop("sampling_seconds")
    return digest(json.dumps(report, sort_keys=True, default=str).encode())


T2IPipeline.__call__ = hashed
tmp, results = Path(tempfile.mkdtemp()), {}
runs = {f"cli generate {s}": lambda s=s: command(tmp / f"gen-{s}", "generate", "a red circle",
                                                 "a blue square above a green triangle", "--steps", "4", "--seed", "7",
                                                 "--num-images", "2", "--upscale", "1", "--negative", "green",
                                                 *(["--scheduler", s] if s else []))
        for s in (None, "ddim", "euler-a", "dpm")}
runs["cli generate guidance 0.5"] = lambda: command(tmp / "gen-g1", "generate", "a red circle", "--steps", "3",
                                                    "--guidance", "0.5", "--seed", "3", "--upscale", "1")
runs["cli heatmap"] = lambda: command(tmp / "heat", "heatmap", "a red circle above a blue square", "--steps", "4",
                                      "--seed", "5", "--scheduler", "euler-a")
runs["cli effect"] = lambda: command(tmp / "eff", "effect", "a red circle above a blue square", "--words",
                                     "red,square", "--steps", "4", "--seed", "5", "--negative", "green")
runs["explorer"] = explore
runs["evaluate"] = evaluated
for name, run in runs.items():
    calls.clear()
    extra = run()
    results[name] = (list(calls), extra)
Path(args.out).write_text(json.dumps(results, indent=1))
print(f"wrote {args.out}: {sum(len(c) for c, _ in results.values())} pipeline calls hashed")
