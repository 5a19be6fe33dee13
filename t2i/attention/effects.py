"""Word effects: what a word does, not only where it looks. Prompt-to-prompt's attention reweighting
(Hertz et al. 2022, sec. 3.2, "fader control"): a word's cross-attention probabilities are multiplied
by its weight, on the conditional branch only, at every cross-attention layer and step, without
renormalising (0 silences the word, 2 doubles it; the unconditional branch that guidance subtracts is
left alone). A word's effect map is the per-pixel change between the image and the image with that
word reweighted, same seed and settings.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..settings import DEFAULTS, SamplingSettings, check_word_weight, generators
from .heatmaps import Heatmaps, resolve_word
from .processors import attached, cross_attention_modules

if TYPE_CHECKING:
    from ..layout import BatchLayout

WordWeights = dict[str, float]


def word_weight_matrix(layout: BatchLayout, word_weights: WordWeights | list[WordWeights]) -> torch.Tensor | None:
    """(rows, T) multipliers of the UNet batch's cross-attention probabilities: in the conditional rows,
    the columns of each weighted word's tokens get its weight (every sub-token of the word; 'circle#2' is
    the second circle); every other entry is 1. `word_weights`: one {word: weight} for every prompt, or
    a list with one per prompt. None when no weight differs from 1. Unknown words -> ValueError."""
    B, n, enc = layout.num_prompts, layout.images_per_prompt, layout.encoding
    per_prompt = [word_weights] * B if isinstance(word_weights, dict) else list(word_weights)
    if len(per_prompt) != B:
        raise ValueError(f"got {len(per_prompt)} word-weight dicts for {B} prompt(s): pass one dict, or one per prompt")
    weights = torch.ones(layout.rows, enc.attention_mask.shape[1])
    first = layout.branch_rows("cond").start
    for b, (text, chosen) in enumerate(zip(layout.texts("cond"), per_prompt)):
        positions = enc.attention_mask[text].bool().nonzero().squeeze(1).cpu()  # real token j sits at positions[j]
        for word, weight in (chosen or {}).items():
            weight = check_word_weight(word, weight)
            _, idx = resolve_word(enc.tokens[text], word)
            weights[first + b * n: first + (b + 1) * n, positions[idx]] = weight
    return None if bool((weights == 1).all()) else weights


@contextmanager
def reweighting(unet: nn.Module, layout: BatchLayout, word_weights: WordWeights | list[WordWeights],
                text: bool = True) -> Iterator[torch.Tensor | None]:
    """Within the block, every cross-attention module of `unet` scales the words' attention as
    word_weight_matrix says (through the same explicit processors as the recorder, so the two compose),
    and with `text` so does t2i's context layer (log-weights on its keys); the original processors come back
    on exit. Weights that are all 1 change nothing and install nothing."""
    weights = word_weight_matrix(layout, word_weights)
    if weights is None:
        yield None
        return
    weights = weights.to(unet.device)
    refiner = getattr(unet, "context_refiner", None) if text else None
    if refiner is not None:  # t2i's context layer mixes the words before cross-attention reads them
        refiner.key_weights = weights
    try:
        with attached(unet, cross_attention_modules(unet), "weights", weights):
            yield weights
    finally:
        if refiner is not None:
            refiner.key_weights = None


def text_key_weights(layout: BatchLayout, word_weights: WordWeights | list[WordWeights]) -> torch.Tensor | None:
    """(texts, T) weights of each encoded text's tokens (1 in the unconditional texts): word_weight_matrix
    by text rather than by UNet row; None when no weight differs from 1."""
    weights = word_weight_matrix(layout, word_weights)
    return None if weights is None else weights[::layout.images_per_prompt]


def reweighted_encoding(text, prompts: list[str], layout: BatchLayout, word_weights: WordWeights | list[WordWeights],
                        clip_skip: int | None = None):
    """layout.encoding with the prompts re-encoded by `text` (a t2i.conditioning encoder) so that each weighted
    word's key is scaled in every self-attention of the text encoder(s) too (t2i.text.weighted_mask): a word at
    0 then reaches no other word's state, nor SDXL's pooled text, whatever the encoder mixes."""
    from dataclasses import replace as replace_fields
    enc, weights = layout.encoding, text_key_weights(layout, word_weights)
    if weights is None:
        return enc
    cond = slice(layout.texts("cond").start, layout.texts("cond").stop)
    weighted = text.encode(prompts, enc.hidden_states.shape[1], clip_skip=clip_skip, key_weights=weights[cond])
    states = enc.hidden_states.clone()
    states[cond] = weighted.hidden_states.to(states)
    pooled = enc.pooled
    if pooled is not None:
        pooled = pooled.clone()
        pooled[cond] = weighted.pooled.to(pooled)
    return replace_fields(enc, hidden_states=states, pooled=pooled)


def _pixels(image) -> torch.Tensor:
    """A PIL image, a uint8 or float [0, 1] array (H, W, 3), or a tensor (3, H, W) in [0, 1] -> (H, W, 3) float32."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu().permute(1, 2, 0)
    image = np.asarray(image)
    return torch.from_numpy(image.astype(np.float32) / (255 if image.dtype == np.uint8 else 1))


def effect_map(image, reweighted) -> torch.Tensor:
    """(H, W) float32 in [0, 1]: the mean absolute change over RGB of each pixel between two images of
    the same size (PIL, arrays or tensors as the pipeline returns them)."""
    a, b = _pixels(image), _pixels(reweighted)
    if a.shape != b.shape:
        raise ValueError(f"the images differ in size: {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).abs().mean(-1)


@dataclass
class WordEffects:
    """One prompt's image, its attention, and for each word the image with that word reweighted and the effect."""

    image: Image.Image
    attention: Heatmaps                      # of `image` (one image)
    weight: float
    images: dict[str, Image.Image]           # word label -> the image with that word's weight set to `weight`
    effects: dict[str, torch.Tensor]         # word label -> (H, W) effect map in [0, 1]


def word_effects(pipe, prompt: str, words: list[str], weight: float = 0.0,
                 settings: SamplingSettings = DEFAULTS, reweight_text: bool = True) -> WordEffects:
    """Sample `prompt` with `settings` and, in the same batch from the same seed (settings.seed, one image
    per row), once more per word with that word's weight set to `weight` (in the text path's attention too
    unless `reweight_text` is False); return the images, the unweighted image's heatmaps and each word's
    effect map."""
    labels = pipe.word_labels(prompt, words)  # fails before sampling
    if len(set(labels)) != len(labels):
        raise ValueError(f"words {words} name the same word twice")
    rows = len(labels) + 1
    one = replace(settings, num_images=1)
    out = pipe([prompt] * rows, **one.pipeline_kwargs(), word_weights=[{}] + [{w: weight} for w in labels],
               reweight_text=reweight_text, record_attention=True, generator=generators(one.seeds(1) * rows))
    image, others = out.images[0], out.images[1:]
    return WordEffects(image=image, attention=out.attention.select(0), weight=weight,
                       images=dict(zip(labels, others)),
                       effects={w: effect_map(image, im) for w, im in zip(labels, others)})


# ----------------------------------------------------------------------------------------------
# Does a word's attention map show what the word does? On any prompt of any model (no masks needed).

STOP_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "with", "is", "are", "there", "its", "it"}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over the pixels of two (H, W) maps; 0 where either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / norm) if norm > 1e-12 else 0.0


def centre_prior(height: int, width: int, sigma: float = 0.25) -> torch.Tensor:
    """(H, W) Gaussian at the image centre, std `sigma` times each side: the map any attention map should beat."""
    y = (torch.arange(height) + 0.5 - height / 2) / height
    x = (torch.arange(width) + 0.5 - width / 2) / width
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))


def prompt_faithfulness(pipe, prompts: list[str], settings: SamplingSettings = DEFAULTS,
                        words: list[str] | None = None) -> dict:
    """For each prompt and each of its words (default: all but STOP_WORDS), silence the word (word_effects) and
    correlate its attention map with its effect map over the image's pixels, beside a centre-prior map's
    correlation: the attention part of faithfulness that needs no object masks, for any model.
    Returns {'rows': [{prompt, word, effect, attention, centre prior}], 'mean': {...}} (correlations in [-1, 1],
    effect: the mean change in [0, 1])."""
    from .heatmaps import word_labels
    rows = []
    for prompt in prompts:
        labels = words or [w for w in word_labels(pipe.prompt_tokens(prompt)[0]) if w.split("#")[0] not in STOP_WORDS]
        if not labels:
            raise ValueError(f"{prompt!r} has no word to silence beyond {', '.join(sorted(STOP_WORDS))}")
        fx = word_effects(pipe, prompt, labels, 0.0, settings)
        size = fx.image.height, fx.image.width
        prior = centre_prior(*size)
        maps = fx.attention.word_maps(0, list(fx.effects), normalize=None, size=size)
        for word, effect in fx.effects.items():
            rows.append({"prompt": prompt, "word": word, "effect": float(effect.mean()),
                         "attention": pearson(maps[word], effect), "centre prior": pearson(prior, effect)})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("effect", "attention", "centre prior")}
    return {"rows": rows, "mean": mean}


def faithfulness_lines(result: dict) -> list[str]:
    """prompt_faithfulness's result as a table: one row per word, then the mean."""
    head = "| prompt | word | mean change | corr. attention-effect | corr. centre prior-effect |"
    lines = [head, "|---|---|---|---|---|"]
    for r in result["rows"] + [{"prompt": "mean", "word": "", **result["mean"]}]:
        lines.append(f"| {r['prompt']} | {r['word']} | {r['effect']:.3f} | {r['attention']:.2f} | "
                     f"{r['centre prior']:.2f} |")
    return lines
