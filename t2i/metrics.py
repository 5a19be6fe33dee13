"""Metrics for the shapes world, pure functions of arrays: prompt fidelity of an image judged by the
segmenter, how well a word's heatmap localises its object (IoU of the thresholded map, as in DAAM,
Tang et al. 2023, and pointing accuracy, Zhang et al. 2018 "Top-down neural attention by excitation backprop"),
and how faithful a heatmap is to what its word does (the word's effect map: where the image changes when
the word is silenced).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data.shapes import ShapeObject, ShapeScene, relation
from .segment import DetectedObject, match_objects

FIDELITY = ("recall", "colour", "shape", "size", "position", "relation", "count", "exact")
FIDELITY_HELP = {
    "recall": "prompted objects found (an object of the prompted colour)",
    "colour": "detected objects whose colour the prompt names (colour precision)",
    "shape": "found objects of the prompted shape",
    "size": "found objects of the prompted size, where the prompt states one",
    "position": "found objects in the prompted grid cell, where the prompt states one",
    "relation": "two found objects in the prompted relation ('above', ...), where the prompt states one",
    "count": "images with as many objects as prompted",
    "exact": "images with every object found, every stated attribute right and nothing else",
}
GENEVAL = ("single object", "two objects", "counting", "colours", "position", "colour attribution")
GENEVAL_HELP = {  # GenEval's categories (Ghosh et al. 2023) as they read in the shapes world
    "single object": "one-object prompts: an object of the prompted shape is there",
    "two objects": "two-object prompts: both prompted shapes are there",
    "counting": "as many objects as prompted",
    "colours": "one-object prompts: the object of the prompted colour has the prompted shape",
    "position": "every stated grid position or relation is right (prompts that state one)",
    "colour attribution": "two-object prompts: both colour-shape pairs are right",
}
TAUS = tuple(np.round(np.arange(0.1, 0.95, 0.1), 2).tolist())  # thresholds for the tau calibration
DAAM_TAU = 0.4  # DAAM's threshold, used when calibration has no objects to calibrate on


@dataclass
class Tally:
    """Hits over trials per metric name; hits may be fractional (a pointing tie split between pixels)."""

    hits: Counter = field(default_factory=Counter)
    trials: Counter = field(default_factory=Counter)

    def add(self, name: str, hit: float, trials: int = 1) -> None:
        self.hits[name] += float(hit)
        self.trials[name] += trials

    def __iadd__(self, other: "Tally") -> "Tally":
        self.hits.update(other.hits)
        self.trials.update(other.trials)
        return self

    def rate(self, name: str) -> float | None:
        """hits / trials, None when there were no trials."""
        return self.hits[name] / self.trials[name] if self.trials[name] else None

    def to_dict(self, names: Sequence[str]) -> dict:
        return {n: {"rate": self.rate(n), "hits": self.hits[n], "trials": self.trials[n]} for n in names}


# ----------------------------------------------------------------------------------------------
# 1. Prompt fidelity: what the segmenter finds in an image against what the prompt's scene states.


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float (H, W, 3) image in [0, 1] (the pipeline's 'np' output) or a uint8 one -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def score_fidelity(scene: ShapeScene, detected: Sequence[DetectedObject],
                   pairs: list[tuple[ShapeObject, DetectedObject | None]] | None = None) -> Tally:
    """Tally of the FIDELITY metrics for one image with objects `detected`, prompted by `scene.caption`.

    Objects are matched by colour (`segment.match_objects`), so colour is scored as precision: the share
    of detected objects whose colour the prompt names. Size, position and relation count only where
    `scene.stated` says the caption states them."""
    pairs = match_objects(scene.objects, detected) if pairs is None else pairs
    tally = Tally()
    exact = len(detected) == len(scene.objects)
    prompted = {o.colour for o in scene.objects}
    for d in detected:
        tally.add("colour", d.colour in prompted)
    for obj, det in pairs:
        tally.add("recall", det is not None)
        if det is None:
            exact = False
            continue
        checks = [("shape", det.shape == obj.shape)]
        if "size" in scene.stated:
            checks.append(("size", det.size == obj.size))
        if "position" in scene.stated:
            checks.append(("position", det.position == obj.position))
        for name, ok in checks:
            tally.add(name, ok)
            exact &= ok
    if "relation" in scene.stated:
        (a, da), (b, db) = pairs  # relation captions have exactly two objects
        if da is not None and db is not None:
            ok = _same_relation(a, b, da, db)
            tally.add("relation", ok)
            exact &= ok
    tally.add("count", len(detected) == len(scene.objects))
    tally.add("exact", exact)
    _add_geneval(tally, scene, detected, pairs)
    return tally


def _add_geneval(tally: Tally, scene: ShapeScene, detected: Sequence[DetectedObject],
                 pairs: list[tuple[ShapeObject, DetectedObject | None]]) -> None:
    """The GENEVAL categories of one image, each a 0/1 trial where it applies."""
    n, shapes = len(scene.objects), Counter(d.shape for d in detected)
    bound = all(det is not None and det.shape == obj.shape for obj, det in pairs)
    if n == 1:
        tally.add("single object", shapes[scene.objects[0].shape] > 0)
        tally.add("colours", bound)
    if n == 2:
        tally.add("two objects", not Counter(o.shape for o in scene.objects) - shapes)
        tally.add("colour attribution", bound)
    tally.add("counting", len(detected) == n)
    if "position" in scene.stated:
        tally.add("position", all(det is not None and det.position == obj.position for obj, det in pairs))
    if "relation" in scene.stated:
        (a, da), (b, db) = pairs
        tally.add("position", da is not None and db is not None and _same_relation(a, b, da, db))


def _same_relation(a: ShapeObject, b: ShapeObject, da: DetectedObject, db: DetectedObject) -> bool:
    """Whether the detected objects stand in the relation the caption states for a and b."""
    try:
        return relation(da, db) == relation(a, b)
    except ValueError:  # both detected in one cell: no relation at all
        return False


# ----------------------------------------------------------------------------------------------
# 2. Heatmap localisation: a word's map against its object's mask.


def scale_to_peak(heatmap: np.ndarray) -> np.ndarray:
    """A float32 (H, W) map divided by its maximum, so it lies in [0, 1] (negatives clipped to 0).
    A map with no positive value carries no location and becomes uniform (all ones)."""
    m = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, None)
    peak = m.max() if m.size else 0.0
    return m / peak if peak > 0 else np.ones_like(m)


def iou_curve(maps: np.ndarray, masks: np.ndarray, taus: Sequence[float] = TAUS) -> np.ndarray:
    """IoU of each normalised map thresholded at each tau (map >= tau) with its mask.

    maps: float (N, H, W) in [0, 1]; masks: bool (N, H, W). Returns (len(taus), N)."""
    maps, masks = np.asarray(maps, dtype=np.float32), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W), got {maps.shape} and {masks.shape}")
    taus = np.asarray(taus, dtype=np.float32)
    on = maps[None] >= taus[:, None, None, None]                      # (T, N, H, W)
    inter = (on & masks[None]).sum((-2, -1))
    union = (on | masks[None]).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)     # (T, N); both empty: a perfect match


def pointing(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) pointing score of each map: 1 when its maximum lies inside the mask, else 0. When several
    pixels share the maximum (a flat map), the share of them inside the mask: the expected hit under a
    random tie-break, so a uniform map scores the mask's area fraction (chance)."""
    maps, masks = np.asarray(maps, dtype=np.float32), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W), got {maps.shape} and {masks.shape}")
    peak = maps.max((-2, -1), keepdims=True)
    top = maps >= peak - 1e-6 * np.abs(peak)                         # (N, H, W) the argmax set
    return (top & masks).sum((-2, -1)) / top.sum((-2, -1))


def calibrate_tau(maps: np.ndarray, masks: np.ndarray, taus: Sequence[float] = TAUS) -> tuple[float, np.ndarray]:
    """The tau in `taus` with the highest mean IoU over the (N, H, W) maps and masks (DAAM's choice of
    tau, made on a calibration split), and the mean IoU at every tau. With N = 0: DAAM_TAU and NaNs."""
    if len(taus) == 0:
        raise ValueError("calibrate_tau needs at least one threshold")
    if len(maps) == 0:
        return DAAM_TAU, np.full(len(taus), np.nan)
    mean = iou_curve(maps, masks, taus).mean(1)                        # (T,)
    return float(taus[int(mean.argmax())]), mean


# ----------------------------------------------------------------------------------------------
# 3. Baseline maps, scored with the same code.


def uniform_map(height: int, width: int) -> np.ndarray:
    """A map that says nothing: all ones. At any tau it covers the image, so IoU = the mask's area fraction."""
    return np.ones((height, width), dtype=np.float32)


def centre_prior_map(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian at the image centre, std `sigma` times the image side, peak 1: objects sit near the middle
    more often than not, a prior any map should beat."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    y = (np.arange(height) + 0.5 - height / 2) / height
    x = (np.arange(width) + 0.5 - width / 2) / width
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 4. Faithfulness: a word's effect map (the change when it is silenced) against its object's mask
#    and its attention map.


def mass_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) share of each non-negative (H, W) map's total inside its mask (negatives clipped to 0). A map
    with no mass carries no location and counts as uniform: it scores the mask's area fraction."""
    maps, masks = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W), got {maps.shape} and {masks.shape}")
    total = maps.sum((-2, -1))
    inside = (maps * masks).sum((-2, -1))
    return np.where(total > 0, inside / np.where(total > 0, total, 1), masks.mean((-2, -1)))


def effect_share(effect: np.ndarray, mask: np.ndarray) -> float:
    """The share of an (H, W) effect map's change that falls inside the object's mask (H, W): 1 when
    reweighting a word changes only its object's pixels, the mask's area fraction for a change spread evenly."""
    return float(mass_share(np.asarray(effect)[None], np.asarray(mask)[None])[0])


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Pearson correlation over the pixels of each pair of (N, H, W) maps; 0 where either is constant
    (a uniform map says nothing about where the other one is high)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"both map stacks must be (N, H, W), got {a.shape} and {b.shape}")
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(norm > 1e-12, (a * b).sum(1) / np.where(norm > 1e-12, norm, 1), 0.0)
