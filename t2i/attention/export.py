# Heatmaps on disk: raw float32 maps as safetensors with their metadata (prompt, tokens, words,
# layers, steps, image size) as JSON in the safetensors header, plus the pictures for one image.
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file, save
from safetensors import safe_open

from .heatmaps import Heatmaps
from .overlay import animate, grid_image, upscale, word_overlays

METADATA_KEY = "t2i.heatmaps"
FORMAT_VERSION = 1
_FIELDS = ("tokens", "prompts", "image_size", "layers", "steps", "num_inference_steps", "branch", "heads",
           "prompt_index")


def save_heatmaps(heatmaps: Heatmaps, path: str | os.PathLike) -> None:
    """Write `maps` (images, T, h, w) and, if kept, `timeline` (S, images, T, hc, wc) to a .safetensors
    file; the metadata goes into its header as JSON under 't2i.heatmaps'."""
    tensors = {"maps": heatmaps.maps.float().contiguous()}
    if heatmaps.timeline is not None:
        tensors["timeline"] = heatmaps.timeline.float().contiguous()
    meta = {"version": FORMAT_VERSION, **heatmaps.metadata()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))  # save_file would make it 0600


def load_heatmaps(path: str | os.PathLike) -> Heatmaps:
    """Read a file written by `save_heatmaps` (or `Heatmaps.save`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no heatmaps file at {path!r}")
    with safe_open(path, framework="pt") as f:
        header = (f.metadata() or {}).get(METADATA_KEY)
    if header is None:
        raise ValueError(f"{path!r} is a safetensors file without t2i heatmap metadata; "
                         "write it with Heatmaps.save")
    meta = json.loads(header)
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path!r} has heatmaps format version {meta.get('version')}, this t2i reads "
                         f"{FORMAT_VERSION}")
    tensors = load_file(path)
    return Heatmaps(maps=tensors["maps"], timeline=tensors.get("timeline"),
                    **{k: meta[k] for k in _FIELDS})


def _stems(labels: list[str]) -> dict[str, str]:
    """Distinct file stems 'word-<label>' ('circle#2' -> 'word-circle-2'; odd characters dropped)."""
    stems: dict[str, str] = {}
    for k, label in enumerate(labels):
        stem = "word-" + (re.sub(r"[^0-9a-zA-Z]+", "-", label).strip("-") or str(k))
        stems[label] = stem if stem not in stems.values() else f"{stem}-{k}"
    return stems


def write_heatmap_outputs(heatmaps: Heatmaps, image_index: int, image: Image.Image, out_dir: str | os.PathLike,
                          words: list[str] | None = None, size: int = 256) -> dict[str, Path]:
    """For image `image_index`: image.png (upscaled to `size`), grid.png, word-<label>.png per word,
    maps.safetensors and maps.json (this image's raw maps and metadata), and word-<label>.gif per
    word when the heatmaps have a timeline. Returns {name: path}. Unknown words -> ValueError."""
    words = None if words is None else [w for w in words if w.strip()] or None
    out = Path(out_dir)
    labels = list(heatmaps.word_maps(image_index, words))  # validates the words before writing anything
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["image"] = out / "image.png"
    upscale(image, size).save(paths["image"])
    paths["grid"] = out / "grid.png"
    grid_image(image, heatmaps, image_index, labels, size=size).save(paths["grid"])
    stems = _stems(labels)
    for label, im in word_overlays(image, heatmaps, image_index, labels, size=size).items():
        paths[f"word:{label}"] = out / f"{stems[label]}.png"
        im.save(paths[f"word:{label}"])
    if heatmaps.timeline is not None:
        for label in labels:
            paths[f"gif:{label}"] = out / f"{stems[label]}.gif"
            animate(image, heatmaps, image_index, label, paths[f"gif:{label}"], size=size)
    single = heatmaps.select(image_index)
    paths["maps"] = out / "maps.safetensors"
    single.save(paths["maps"])
    paths["metadata"] = out / "maps.json"
    paths["metadata"].write_text(json.dumps({**single.metadata(), "selected_words": labels,
                                             "maps_file": paths["maps"].name}, indent=2) + "\n")
    return paths
