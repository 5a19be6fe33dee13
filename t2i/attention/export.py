"""One image's heatmaps on disk for people: the image, a grid and an overlay (and GIF) per word, beside
its raw maps (Heatmaps.save) and their metadata as JSON; and one image's word effects.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image

from .effects import WordEffects
from .heatmaps import Heatmaps
from .overlay import animate, effect_panel, grid_image, upscale, word_overlays


def _info(metadata: dict | None):
    """PNG text fields (JSON for what is not a string), or None."""
    if metadata is None:
        return None
    from ..sampling import png_metadata
    return png_metadata(**metadata)


def _stems(labels: list[str]) -> dict[str, str]:
    """Distinct file stems 'word-<label>' ('circle#2' -> 'word-circle-2'; odd characters dropped)."""
    stems: dict[str, str] = {}
    for k, label in enumerate(labels):
        stem = "word-" + (re.sub(r"[^0-9a-zA-Z]+", "-", label).strip("-") or str(k))
        stems[label] = stem if stem not in stems.values() else f"{stem}-{k}"
    return stems


def write_heatmap_outputs(heatmaps: Heatmaps, image_index: int, image: Image.Image, out_dir: str | os.PathLike,
                          words: list[str] | None = None, size: int = 256, metadata: dict | None = None
                          ) -> dict[str, Path]:
    """For image `image_index`: image.png (upscaled to `size`, with `metadata` as its text fields, what `t2i
    generate` regenerates it from), grid.png, word-<label>.png per word, maps.safetensors and maps.json (this
    image's raw maps and metadata), and word-<label>.gif per word when the heatmaps have a timeline. Returns
    {name: path}. Unknown words -> ValueError."""
    words = None if words is None else [w for w in words if w.strip()] or None
    out = Path(out_dir)
    labels = list(heatmaps.word_maps(image_index, words))  # validates the words before writing anything
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["image"] = out / "image.png"
    upscale(image, size).save(paths["image"], pnginfo=_info(metadata))
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


def write_effect_outputs(effects: WordEffects, out_dir: str | os.PathLike, size: int = 256,
                         metadata: dict | None = None) -> dict[str, Path]:
    """image.png (upscaled to `size`); per word, word-<label>.png (the image, the word's attention, the
    reweighted image and the effect map side by side) and word-<label>-weighted.png (the reweighted
    image); maps.safetensors (the image's heatmaps); effects.json (each word's change, in [0, 1]: mean,
    peak, and the share of pixels that changed by at least 0.1). Returns {name: path}. `metadata`: the
    image's text fields (its settings), which the reweighted images carry too with their word_weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"image": out / "image.png"}
    upscale(effects.image, size).save(paths["image"], pnginfo=_info(metadata))
    attention = effects.attention.word_maps(0, list(effects.effects))
    stems, summary = _stems(list(effects.effects)), {}
    for label, effect in effects.effects.items():
        paths[f"word:{label}"] = out / f"{stems[label]}.png"
        effect_panel(effects.image, attention[label], effects.images[label], effect, label, effects.weight,
                     size=size).save(paths[f"word:{label}"])
        paths[f"weighted:{label}"] = out / f"{stems[label]}-weighted.png"
        weighted = None if metadata is None else {**metadata, "word_weights": {label: effects.weight}}
        upscale(effects.images[label], size).save(paths[f"weighted:{label}"], pnginfo=_info(weighted))
        summary[label] = {"mean": float(effect.mean()), "peak": float(effect.max()),
                          "changed_share": float((effect >= 0.1).float().mean())}
    paths["maps"] = out / "maps.safetensors"
    effects.attention.save(paths["maps"])
    paths["effects"] = out / "effects.json"
    paths["effects"].write_text(json.dumps({"prompt": effects.attention.prompts[0], "weight": effects.weight,
                                            "words": summary}, indent=2) + "\n")
    return paths
