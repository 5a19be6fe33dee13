"""Faithfulness of heatmaps for `t2i evaluate`: does a word's attention map show what the word does? Each
object word of a prompt is silenced in turn (prompt-to-prompt reweighting to 0, same seed and settings)
and its effect map, the per-pixel change of the image, is set against the object's mask (pointing,
Zhang et al. 2018, and the share of the change inside the mask) and against the word's attention map
(Pearson correlation over pixels), beside uniform and centre-prior maps scored with the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .attention.effects import effect_map
from .attention.heatmaps import has_word
from .data.shapes import ShapeScene
from .metrics import centre_prior_map, correlation, mass_share, pointing, to_uint8, uniform_map
from .scoring import WORD_CLASSES, EvalConfig, MapSet, found_words, image_seed, object_words, pct, sample_scenes, table
from .segment import match_objects, segment

FAITH_SOURCES = ("effect", "attention", "uniform", "centre prior")


@dataclass
class EffectSet(MapSet):
    """MapSet's attention maps, masks and skips, and for each word its effect map (H, W)."""

    effects: dict = field(default_factory=lambda: {c: [] for c in WORD_CLASSES})

    def arrays(self, word_class: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, H, W) effect maps, attention maps and bool masks."""
        maps, masks = super().arrays(word_class, size)
        effects = np.stack(self.effects[word_class]) if self.effects[word_class] else np.zeros_like(maps)
        return effects, maps, masks


def sample_effects(pipe, scenes: list[ShapeScene], config: EvalConfig, split_id: int, bar=None) -> EffectSet:
    """For each scene, its image (seeded as the localisation pass seeds sample 0) and, in the same batch
    and from the same seed, one image per object word with that word silenced (words the tokenizer cut
    off are not silenced, and counted as no_token); segment the image and keep each found object's
    words' effect maps, attention maps and mask. Batches hold whole scenes, up to config.batch_size rows."""
    batches: list[list[tuple[int, list[str]]]] = [[]]
    rows = 0
    for p, scene in enumerate(scenes):
        tokens = pipe.prompt_tokens(scene.caption)[0]
        words = [w for labels in object_words(scene) for w in labels.values() if has_word(tokens, w)]
        if batches[-1] and rows + 1 + len(words) > config.batch_size:
            batches.append([])
            rows = 0
        batches[-1].append((p, words))
        rows += 1 + len(words)
    found = EffectSet()
    for batch in batches:
        _score_batch(pipe, scenes, batch, config, split_id, found)
        if bar is not None:
            bar.update(len(batch))                                      # scenes, each with its variants
    return found


def _score_batch(pipe, scenes: list[ShapeScene], batch: list[tuple[int, list[str]]], config: EvalConfig,
                 split_id: int, found: EffectSet) -> None:
    """Sample one batch of scenes with their silenced variants and add the found objects' words to `found`."""
    prompts, weights, seeds = [], [], []
    for p, words in batch:
        variants = [{}] + [{w: 0.0} for w in words]
        prompts += [scenes[p].caption] * len(variants)
        weights += variants
        seeds += [image_seed(config.seed, split_id, p, 0)] * len(variants)
    out = sample_scenes(pipe, prompts, seeds, config, scenes[0].image.shape[0], word_weights=weights)
    base = 0
    for p, words in batch:
        scene, image = scenes[p], out.images[base]
        silenced = {w: out.images[base + 1 + k] for k, w in enumerate(words)}
        pairs = match_objects(scene.objects, segment(to_uint8(image)))
        for word_class, word, heat, mask in found_words(scene, pairs, out.attention, base, found):
            found.effects[word_class].append(effect_map(image, silenced[word]).numpy())  # it has tokens: silenced
            found.maps[word_class].append(heat)
            found.masks[word_class].append(mask)
        base += 1 + len(words)


def score_faithfulness(found: EffectSet, size: int) -> dict:
    """Per word class: the counts, and for each of FAITH_SOURCES its pointing into the object's mask, the
    share of its mass inside the mask and (but for the effect map itself) its correlation with the effect map."""
    baselines = {"uniform": uniform_map(size, size), "centre prior": centre_prior_map(size, size)}
    result = {}
    for word_class in WORD_CLASSES:
        effects, maps, masks = found.arrays(word_class, size)
        entry = {"scored": len(effects), "not_found": found.not_found[word_class],
                 "no_token": found.no_token[word_class]}
        for source in FAITH_SOURCES:
            m = {"effect": effects, "attention": maps}.get(source)
            if m is None:
                m = np.broadcast_to(baselines[source], masks.shape)
            scored = len(m) > 0
            entry[source] = {
                "pointing": float(pointing(m, masks).mean()) if scored else None,
                "share": float(mass_share(m, masks).mean()) if scored else None,
                "correlation": float(correlation(m, effects).mean()) if scored and source != "effect" else None}
        result[word_class] = entry
    return result


def faithfulness_table(faithfulness: dict) -> list[str]:
    """The report's section: one row per split, word class and map source."""
    rows = []
    for split, classes in faithfulness.items():
        for word_class, e in classes.items():
            for source in FAITH_SOURCES:
                r = e[source]
                corr = "–" if r["correlation"] is None else f"{r['correlation']:.2f}"
                rows.append([split, "noun" if word_class == "noun" else "colour adj.", str(e["scored"]),
                             "effect of silencing" if source == "effect" else source, pct(r["pointing"]),
                             pct(r["share"]), corr])
    return table(["split", "word", "scored", "map", "pointing", "share in mask", "corr. with effect"], rows)
