"""Token grounding during training, in the spirit of TokenCompose (Wang et al. CVPR 2024, eq. 3, L_token):
each object word's cross-attention map, normalised over pixels, should put its mass inside the object's
mask: L = mean over words and layers of (1 - sum_{p in mask} A_p / sum_p A_p)^2. A model trained with it
localises partly by construction; the model card and docs/results.md say which kind a model is.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .attention.processors import attached, cross_attention_modules


@contextmanager
def capture_cross_attention(unet) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `unet` (t2i's or a diffusers UNet) appends each cross-attention
    layer's head-averaged probabilities (B, N, T), with their autograd graph, to the yielded list. The
    original processors are always restored."""
    modules = cross_attention_modules(unet)
    if not modules:
        raise ValueError("the grounding loss needs a UNet with cross-attention layers")
    store: list[torch.Tensor] = []
    with attached(unet, modules, "capture", store):
        yield store


def token_indices(tokenizer, captions: list[str], spans: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each character span, (B, K) long; -1 for padding spans (-1, -1), empty
    captions (caption dropout) and words the tokenizer's max length cut off. spans: (B, K, 2)."""
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_offsets_mapping=True)
    out = torch.full(spans.shape[:2], -1, dtype=torch.long)
    for b, (caption, offsets) in enumerate(zip(captions, enc["offset_mapping"])):
        if not caption:
            continue
        first = {}
        for i, (a, e) in enumerate(offsets):
            if e > a and a not in first:
                first[a] = i
        for k, (a, _) in enumerate(spans[b].tolist()):
            if a >= 0 and a in first:
                out[b, k] = first[a]
    return out


def grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """L_token over layers. probs: per layer (B, N, T) with N = h * w of a grid of the image's aspect;
    masks: (B, K, H, W) in [0, 1]; tokens: (B, K) token index of each word, -1 to skip. Zero when no word
    is grounded, so a batch of dropped captions adds nothing."""
    valid = tokens >= 0                                                   # (B, K)
    if not probs or not valid.any():
        return masks.new_zeros(())
    B, K, H, W = masks.shape
    idx = tokens.clamp(min=0)
    losses = []
    for p in probs:
        N = p.shape[1]
        h = round((N * H / W) ** 0.5)
        m = F.adaptive_avg_pool2d(masks.float(), (h, N // h)).flatten(2)  # (B, K, N) share of each cell covered
        a = p.gather(2, idx[:, None, :].expand(B, N, K)).transpose(1, 2)  # (B, K, N)
        inside = (a * m).sum(-1) / a.sum(-1).clamp(min=1e-8)              # (B, K)
        losses.append((1 - inside)[valid].pow(2).mean())
    return torch.stack(losses).mean()
