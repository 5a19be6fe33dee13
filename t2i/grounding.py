# Token grounding during training, in the spirit of TokenCompose (Wang et al. CVPR 2024, eq. 3, L_token):
# each object word's cross-attention map, normalised over pixels, should put its mass inside the object's
# mask: L = mean over words and layers of (1 - sum_{p in mask} A_p / sum_p A_p)^2. A model trained with it
# localises partly by construction; the model card and docs/results.md say which kind a model is.
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .attention.processors import attention_with_probs, cross_attention_modules


class _ProbsProcessor:
    """For t2i.unet.Attention: explicit attention that keeps its head-averaged probabilities (B, N, T),
    with their autograd graph, in `store`."""

    def __init__(self, store: list, original):
        self.store, self.original = store, original

    def __call__(self, attn, x, context=None, mask=None):
        q, k, v = attn.project(x, context)                      # (B, heads, N|T, d)
        o, p = attention_with_probs(q, k, v, mask, attn.scale)  # p: (B, heads, N, T) float32
        self.store.append(p.mean(dim=1))
        return attn.merge(o)


@contextmanager
def capture_cross_attention(unet) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `unet` (a T2IUNet) appends each cross-attention layer's
    probabilities (B, N, T) to the yielded list. The original processors are always restored."""
    modules = cross_attention_modules(unet)
    if not modules:
        raise ValueError("the grounding loss needs a UNet with cross-attention layers (t2i's T2IUNet)")
    store: list[torch.Tensor] = []
    originals = {name: m.processor for name, m in modules.items()}
    unet.set_attn_processor({name: _ProbsProcessor(store, p) for name, p in originals.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)


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
