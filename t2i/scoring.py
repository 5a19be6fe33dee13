"""What `t2i evaluate` and its faithfulness pass share: the evaluation's settings, the words of a scene's
objects, their attention maps and detected masks, the seed of each image, one seeded pipeline call, and the
report's table cells."""
from __future__ import annotations

import re

import warnings
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from .data.shapes import ShapeScene
from .metrics import scale_to_peak
from .settings import GUIDES, QUICK, GuideSettings, SamplingSettings, generators
from .text import PromptTruncated

WORD_CLASSES = ("noun", "colour")


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` generates. The defaults run in a few minutes on a 2-core CPU with the 32 px model."""

    num_prompts: int = 48            # per split (seen, held-out)
    images_per_prompt: int = 4       # K samples per prompt, each with its own seed
    steps: int = QUICK.steps
    guidance: float = QUICK.guidance
    scheduler: str | None = QUICK.scheduler  # a t2i.settings.SCHEDULERS name; None: the model's own
    seed: int = 12345                # draws the prompts and the sampling noise; not the training seed
    calibration_prompts: int = 32    # one image each, to choose tau; 0: DAAM's tau (DAAM_TAU)
    batch_size: int = 64             # images per pipeline call
    effect_prompts: int = 16         # per split: one image each, its object words silenced in turn; 0: none
    guide: str | None = None         # attention guidance from each prompt's own words (t2i.attention.guidance):
                                     # "layout" (boxes), "excite" (presence) or "both"; None: none
    guide_settings: GuideSettings = GuideSettings()  # its strengths

    def __post_init__(self):
        for name in ("num_prompts", "images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.guide not in (None, *GUIDES):
            raise ValueError(f"EvalConfig.guide must be one of {', '.join(GUIDES)} or None, got {self.guide!r}")
        if self.calibration_prompts < 0 or self.seed < 0 or self.effect_prompts < 0:
            raise ValueError("EvalConfig.calibration_prompts, effect_prompts and seed must be >= 0")
        self.sampling.check(names={k: f"EvalConfig.{k}" for k in ("steps", "guidance")})

    @property
    def sampling(self) -> SamplingSettings:
        """The settings of every pipeline call (the seeds are drawn per image: image_seed)."""
        return replace(QUICK, steps=self.steps, guidance=self.guidance, scheduler=self.scheduler,
                       layout=self.guide in ("layout", "both"), excite=self.guide in ("excite", "both"),
                       guide=self.guide_settings)


def object_words(scene: ShapeScene) -> list[dict[str, str]]:
    """For each of scene.objects, the labels of its words in the caption: {"noun": "circle" or "circle#2"
    (a repeated noun, counted in caption order), "colour": "red"} (colours are unique within a scene)."""
    words = re.findall(r"\w+", scene.caption.lower())  # a grammar caption has case and punctuation
    order = sorted(range(len(scene.objects)), key=lambda k: words.index(scene.objects[k].colour))
    labels: list[dict[str, str]] = [{} for _ in scene.objects]
    seen: dict[str, int] = {}
    for k in order:
        shape = scene.objects[k].shape
        seen[shape] = seen.get(shape, 0) + 1
        labels[k] = {"noun": shape if seen[shape] == 1 else f"{shape}#{seen[shape]}", "colour": scene.objects[k].colour}
    return labels


def word_map(heatmaps, image_index: int, word: str) -> np.ndarray | None:
    """The word's raw attention map (H, W) for image `image_index`, upsampled to the image size; None when
    the word is not among the image's tokens (cut by the tokenizer's max length). The one place that reads
    the attention package."""
    try:
        maps = heatmaps.word_maps(image_index, [word], normalize=None, size="image")
    except ValueError:
        return None
    return next(iter(maps.values())).float().cpu().numpy()


def image_seed(seed: int, split: int, prompt: int, sample: int) -> int:
    """The noise seed of one image: fixed by (seed, split, prompt, sample), whatever the batching."""
    return int(np.random.SeedSequence([seed, split, prompt, sample]).generate_state(1)[0])


@dataclass
class MapSet:
    """Normalised word maps of found objects with their detected masks, per word class, and the skips."""

    maps: dict = field(default_factory=lambda: {c: [] for c in WORD_CLASSES})
    masks: dict = field(default_factory=lambda: {c: [] for c in WORD_CLASSES})
    not_found: dict = field(default_factory=lambda: {c: 0 for c in WORD_CLASSES})
    no_token: dict = field(default_factory=lambda: {c: 0 for c in WORD_CLASSES})

    def arrays(self, word_class: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) float maps and bool masks."""
        maps, masks = self.maps[word_class], self.masks[word_class]
        if not maps:
            return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), bool)
        return np.stack(maps), np.stack(masks)


def found_words(scene: ShapeScene, pairs: list, heatmaps, row: int,
                skipped: MapSet) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(word class, word, normalised attention map, detected mask) for each word of each object of `scene`
    found in image `row` (`pairs`: segment.match_objects); the words of objects not found, and words the
    tokenizer cut off, are counted in `skipped.not_found` and `skipped.no_token`."""
    for (_, det), labels in zip(pairs, object_words(scene)):
        for word_class, word in labels.items():
            if det is None:
                skipped.not_found[word_class] += 1
                continue
            raw = word_map(heatmaps, row, word)
            if raw is None:
                skipped.no_token[word_class] += 1
                continue
            yield word_class, word, scale_to_peak(raw), det.mask


def sample_scenes(pipe, captions: list[str], seeds: list[int], config: EvalConfig, size: int,
                  word_weights: list[dict[str, float]] | None = None):
    """One pipeline call: image i of `captions[i]` from `seeds[i]`, at `size` px with config's sampling
    settings, as float arrays, recording cross-attention. Words the tokenizer cuts are counted by the
    callers (found_words: no_token), so the truncation warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncated)
        return pipe(captions, **{**config.sampling.pipeline_kwargs(), "height": size, "width": size},
                    output_type="np", record_attention=True, word_weights=word_weights, generator=generators(seeds))


def pct(rate: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal, "–" for None (the report tables' cells)."""
    return "–" if rate is None else f"{100 * rate:.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
