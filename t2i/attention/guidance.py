"""Attention guidance: steer where words go and make every named object appear, at sampling time, with no
training, on any UNet whose cross-attention t2i's processors can read.

Before the UNet's denoising pass of each early step, the latents take a few gradient steps against an energy
on the conditional branch's cross-attention maps, captured with their autograd graph (processors' capture
role):
- layout (Chen, Laina and Vedaldi, WACV 2024, backward guidance): for each word and its box,
  (1 - the share of the word's attention mass inside the box)^2, averaged over layers;
- presence (Chefer et al., SIGGRAPH 2023, Attend-and-Excite): the attention over the prompt's tokens without
  its start token, each chosen word's map smoothed, its peak taken and averaged over layers; the energy is
  1 minus the smallest peak, so the most neglected word is raised. A step stops exciting once every peak
  passes `threshold`.
The energies are summed; a step moves each image's latents against the energy's gradient, scaled to an RMS of
`step_size` times the noise level sqrt(1 - alpha_bar_t): in the units of the latents whatever the model, and
smaller as the image settles. Images whose energy is already 0 do not move.

From a shapes-world prompt (`layout=True`, `--guide`), `prompt_guidance` reads the boxes: a position phrase
("in the top left", "in the upper left") puts its object in that grid cell, "A above B" puts A in the top half
and B in the bottom half (left of, right of, and their mixes alike).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..conditioning import UNetConditioning, unet_prediction
from ..layout import BatchLayout, query_grid
from ..settings import Box, GuideSettings, check_box, one_box_each
from .heatmaps import prompt_text, resolve_word
from .processors import attached, cross_attention_modules, suspended


def box_mask(box: Box, h: int, w: int) -> torch.Tensor:
    """(h, w) float mask of the grid cells whose centres lie inside the box; a box smaller than a cell keeps
    the cell under its centre, so no box is empty on any grid."""
    x0, y0, x1, y1 = box
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    mask = (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]).float()
    if not mask.any():
        mask[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = 1.0
    return mask


def layout_energy(maps: Sequence[torch.Tensor], image_size: tuple[int, int],
                  targets: list[list[tuple[list[int], Box]]]) -> torch.Tensor:
    """(B,) energy: for each row b and each (token indices, box) of targets[b], (1 - the share of the word's
    attention inside its box)^2, summed over words and averaged over the layers' maps p (B, N, T)."""
    total = 0.0
    for p in maps:
        h, w = query_grid(p.shape[1], image_size)
        rows = []
        for b, words in enumerate(targets):
            e = p.new_zeros(())
            for idx, box in words:
                a = p[b, :, idx].sum(-1)                                   # (N,) the word's attention
                inside = (a * box_mask(box, h, w).to(a).flatten()).sum() / a.sum().clamp_min(1e-8)
                e = e + (1 - inside) ** 2
            rows.append(e)
        total = total + torch.stack(rows)
    return total / len(maps)


def _smooth(a: torch.Tensor) -> torch.Tensor:
    """(K, h, w) maps blurred by a 3x3 Gaussian (sigma 0.5), edges replicated."""
    g = torch.tensor([math.exp(-2.0), 1.0, math.exp(-2.0)])
    k = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    x = F.pad(a[:, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, k.to(a)[None, None])[:, 0]


def peak_attention(maps: Sequence[torch.Tensor], image_size: tuple[int, int],
                   words: list[list[list[int]]], lengths: list[int]) -> list[torch.Tensor]:
    """For each row b, (K_b,) the smoothed peak of each word's attention among the prompt's real tokens
    without the start token (renormalised over tokens 1 .. lengths[b] - 1), averaged over layers."""
    peaks = [0.0] * len(words)
    for p in maps:
        h, w = query_grid(p.shape[1], image_size)
        for b, idxs in enumerate(words):
            if not idxs:
                continue
            q = p[b, :, 1:lengths[b]]
            q = q / q.sum(-1, keepdim=True).clamp_min(1e-8)                # (N, L-1): the start token left out
            a = torch.stack([q[:, [i - 1 for i in idx]].sum(-1) for idx in idxs]).view(len(idxs), h, w)
            peaks[b] = peaks[b] + _smooth(a).flatten(1).amax(-1)
    return [pk / len(maps) if torch.is_tensor(pk) else None for pk in peaks]


def excite_energy(peaks: torch.Tensor | None, threshold: float, like: torch.Tensor) -> torch.Tensor:
    """1 - the smallest peak while it is below `threshold`, else 0 (no word to excite: 0)."""
    if peaks is None or not bool(peaks.min() < threshold):
        return like.new_zeros(())
    return 1 - peaks.min()


@dataclass
class GuideTargets:
    """What to guide, resolved against the encoded prompts: per prompt, each layout word's token indices and
    box, and each excited word's token indices; `lengths` counts each prompt's real tokens."""

    layout: list[list[tuple[list[int], Box]]]
    excite: list[list[list[int]]]
    lengths: list[int]

    def __bool__(self) -> bool:
        return any(self.layout) or any(self.excite)


def resolve_targets(tokens: list[list[str]], layout: bool | dict | list[dict] | None,
                    excite: bool | list[str] | list[list[str]] | None) -> GuideTargets:
    """Resolve words ('circle', 'circle#2') in each prompt's tokens; a word not in a prompt is a ValueError.
    True (layout or excite): from the prompt's own words (prompt_guidance)."""
    B = len(tokens)

    def per_prompt(x, kind: str) -> list:
        if x is None:
            return [None] * B
        x = one_prompts(x, kind)
        if isinstance(x, dict) or (kind == "excite" and x and isinstance(x[0], str)):
            return [x] * B
        x = [one_prompts(entry, kind) for entry in x]
        if len(x) != B:
            raise ValueError(f"got {len(x)} {kind} entries for {B} prompt(s): pass one, or one per prompt")
        return x

    if layout is True or excite is True:                     # from the prompts' own words
        parsed = [prompt_guidance(prompt_text(toks), for_layout=layout is True) for toks in tokens]
        layout = [boxes for boxes, _ in parsed] if layout is True else layout
        excite = [words for _, words in parsed] if excite is True else excite
    boxes, excited = [], []
    for toks, lay, exc in zip(tokens, per_prompt(layout, "layout"), per_prompt(excite, "excite")):
        boxes.append([(resolve_word(toks, word)[1], check_box(word, box)) for word, box in (lay or {}).items()])
        excited.append([resolve_word(toks, word)[1] for word in (exc or [])])
    return GuideTargets(boxes, excited, [len(t) for t in tokens])


def one_prompts(x, kind: str):
    """One prompt's guidance as resolve_targets reads it: (word, box) pairs as {word: box}; a string of excited
    words ("red, circle") as their list. Anything else as it came."""
    if kind == "excite" and isinstance(x, str):
        return [w.strip() for w in x.split(",") if w.strip()]
    if kind == "layout" and isinstance(x, (list, tuple)) and x and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) for pair in x):
        return dict(one_box_each(x))
    return x


def guided_latents(unet, x: torch.Tensor, t, layout: BatchLayout, cond: UNetConditioning,
                   targets: GuideTargets, settings: GuideSettings, scale_input, autocast,
                   noise_level: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The latents x (B*n, C, h, w) after up to `settings.iterations` gradient steps against the guidance
    energy of the conditional branch at timestep t, and the energies seen ({'layout': [...], 'excite': [...]},
    before each step). `cond` is the UNet batch's conditioning; `scale_input(x, t)` the scheduler's
    model-input scaling. Recording and word weights are off during these passes (they see the guided pass)."""
    n, image_size = layout.images_per_prompt, layout.image_size
    c = cond.rows(layout.branch_rows("cond"))
    per_row = GuideTargets([lay for lay in targets.layout for _ in range(n)],
                           [exc for exc in targets.excite for _ in range(n)],
                           [ln for ln in targets.lengths for _ in range(n)])
    seen: dict[str, list[float]] = {"layout": [], "excite": []}
    names = list(cross_attention_modules(unet))
    for _ in range(settings.iterations):
        captured: list[torch.Tensor] = []
        with torch.enable_grad(), suspended(unet), attached(unet, names, "capture", captured):
            xg = x.detach().requires_grad_(True)
            with autocast:
                unet_prediction(unet, scale_input(xg, t), t, c)
            maps = [p.float() for p in captured]
            energy = xg.new_zeros(x.shape[0], dtype=torch.float32)
            if any(per_row.layout):
                e = layout_energy(maps, image_size, per_row.layout)
                seen["layout"].append(float(e.detach().mean()))
                energy = energy + e
            if any(per_row.excite):
                e = torch.stack([excite_energy(pk, settings.threshold, energy) for pk in
                                 peak_attention(maps, image_size, per_row.excite, per_row.lengths)])
                seen["excite"].append(float(e.detach().mean()))
                energy = energy + e
            if not bool((energy > 0).any()):
                break
            grad, = torch.autograd.grad(energy.sum(), xg)
        grad = grad.float()
        rms = grad.pow(2).flatten(1).mean(-1).sqrt().clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        step = settings.step_size * noise_level * (grad / rms) * (energy > 0).view_as(rms)
        x = x - step.to(x.dtype)
    return x.detach(), seen


# ----------------------------------------------------------------------------------------------
# From a shapes-world prompt: boxes from the positions and relations it states, and its objects' words.

_RELATIONS = {"above": (0, 0, 1, 0.5), "below": (0, 0.5, 1, 1), "left of": (0, 0, 0.5, 1), "right of": (0.5, 0, 1, 1)}
_OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_FILLERS = {"is", "are", "the", "there", "placed", "that", "a", "an", "just", "and", "also"}


def _position_phrases() -> dict[tuple[str, ...], str]:
    """{words of a phrase: grid cell} for the templates' phrases and the paraphrases', longest first."""
    from ..data.paraphrase import _POSITIONS
    from ..data.shapes import POSITION_PHRASES
    phrases = {tuple(p.split()): cell for cell, p in POSITION_PHRASES.items()}
    phrases |= {tuple(p.split()): cell for cell, options in _POSITIONS.items() for p in options}
    return dict(sorted(phrases.items(), key=lambda kv: -len(kv[0])))


def _cell_box(cell: str) -> Box:
    from ..data.shapes import POSITIONS
    i = POSITIONS.index(cell)
    row, col = divmod(i, 3)
    return col / 3, row / 3, (col + 1) / 3, (row + 1) / 3


def _intersect(a: Box, b: Box) -> Box:
    return max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])


def prompt_guidance(prompt: str, for_layout: bool = True) -> tuple[dict[str, Box], list[str]]:
    """({word label: box}, words to excite) from a shapes-world prompt: each object (a shape noun and the
    colour and size words before it) goes into the grid cell a position phrase beside it names, and "A above
    B", "A to the left of B" (and their mixes) put A and B in the two halves; every object's colour and noun
    is excited. Both the colour and the noun get the box: in models trained without grounding the colour
    word's map finds the object far more often than the noun's (docs/results.md). Labels count repeats
    ('circle#2'). `for_layout`: the boxes are wanted (else only the words), which a prompt's error suggests."""
    from ..data.shapes import PALETTE, SHAPES, SIZES
    words = re.findall(r"[a-z]+", prompt.lower())
    labels, seen = [], {}
    for w in words:
        seen[w] = seen.get(w, 0) + 1
        labels.append(w if seen[w] == 1 else f"{w}#{seen[w]}")
    objects = []                                            # (first word index, noun index)
    for i, w in enumerate(words):
        if w in SHAPES:
            start = i
            while start > 0 and words[start - 1] in PALETTE.keys() | SIZES.keys():
                start -= 1
            objects.append((start, i))
    if not objects and for_layout:
        raise ValueError(f"found no object ({', '.join(SHAPES)}) in {prompt!r}: guidance from the prompt reads "
                         "shapes-world prompts; give the boxes instead (--layout WORD=X0,Y0,X1,Y1, or layout={word: box} "
                         "in Python)")
    if not objects:
        raise ValueError(f"found no object ({', '.join(SHAPES)}) in {prompt!r}: --excite all reads shapes-world "
                         "prompts; name the words instead (--excite WORD,WORD, or excite=[word, ...] in Python)")
    boxes: list[Box | None] = [None] * len(objects)
    phrases, i = _position_phrases(), 0
    while i < len(words):                                   # position phrases, each to the object beside it
        match = next((p for p in phrases if tuple(words[i:i + len(p)]) == p), None)
        end = i + len(match or ())
        if match is None or words[end:end + 1] == ["of"]:   # "to the left of": a relation
            i += 1
            continue
        before = [k for k, (_, noun) in enumerate(objects) if noun < i and
                  all(w in _FILLERS for w in words[noun + 1:i])]
        after = [k for k, (start, _) in enumerate(objects) if start >= end and
                 all(w in _FILLERS for w in words[end:start])]
        k = before[-1] if before else after[0] if after else None
        if k is not None and boxes[k] is None:
            boxes[k] = _cell_box(phrases[match])
        i = end
    for k in range(len(objects) - 1):                       # relations between neighbours
        between = " ".join(words[objects[k][1] + 1:objects[k + 1][0]])
        rels = [r for r in _RELATIONS if re.search(rf"\b{r}\b", between)]
        if rels:
            a, b = (0, 0, 1, 1), (0, 0, 1, 1)
            for r in rels:
                a, b = _intersect(a, _RELATIONS[r]), _intersect(b, _RELATIONS[_OPPOSITE[r]])
            if a[0] >= a[2] or a[1] >= a[3]:  # "above and below": no box is both
                raise ValueError(f"{prompt!r} puts {words[objects[k][1]]} both {' and '.join(rels)} "
                                 f"{words[objects[k + 1][1]]}: guidance from the prompt needs relations that agree; "
                                 "drop one, or give the boxes with --layout WORD=X0,Y0,X1,Y1")
            boxes[k], boxes[k + 1] = boxes[k] or a, boxes[k + 1] or b
    layout, excite = {}, []
    for (start, noun), box in zip(objects, boxes):
        chosen = [j for j in range(start, noun + 1) if words[j] not in SIZES]
        excite += [labels[j] for j in chosen]
        if box is not None:
            layout |= {labels[j]: box for j in chosen}
    return layout, excite
