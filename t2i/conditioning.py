"""What the UNet is told besides x_t and t, and the one call of the UNet.

Three conditionings, each owned here:
- `T2IText`, t2i's own models: one CLIP text encoder, its last hidden state, padding masked in cross-attention;
- `CLIPText`, Stable Diffusion 1.x and 2.x: the CLIP encoder's last hidden state (or, with clip skip, an earlier
  layer's through the final layer norm), padding not masked, as diffusers' StableDiffusionPipeline encodes;
- `SDXLText`, Stable Diffusion XL (Podell et al. 2023): two CLIP encoders' penultimate hidden states side by
  side, the second's pooled projection as `text_embeds`, and the size conditioning as `time_ids` (original
  size, crop corner, target size); with `force_zeros_for_empty_prompt` an absent negative prompt is zeros.
Each encodes texts into a PromptEncoding and says what the UNet gets from it (`UNetConditioning`);
`unet_prediction` is the one place the UNet is called: sampling, attention guidance, the probe and training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from .text import (CaptionCache, PromptEncoding, PromptTruncated, encode_prompts, token_strings, tokenize,
                   weighted_mask)


@dataclass(frozen=True)
class UNetConditioning:
    """The UNet's inputs besides x_t and t, one row per row of its batch."""

    states: torch.Tensor                           # (R, T, width) text states for cross-attention
    mask: torch.Tensor | None = None               # (R, T) 1 for the tokens cross-attention may read; None: all
    added: dict[str, torch.Tensor] | None = None   # SDXL: {'text_embeds': (R, D), 'time_ids': (R, 6)}

    def rows(self, rows: slice) -> "UNetConditioning":
        """The conditioning of some rows of the batch (attention guidance runs the conditional rows alone)."""
        return UNetConditioning(self.states[rows], None if self.mask is None else self.mask[rows],
                                None if self.added is None else {k: v[rows] for k, v in self.added.items()})

    def with_states(self, states: torch.Tensor) -> "UNetConditioning":
        return replace(self, states=states)


def unet_prediction(unet, x_t: torch.Tensor, t, cond: UNetConditioning) -> torch.Tensor:
    """The UNet's output (eps, v or x0, as it was trained) for x_t (R, C, h, w) at timestep t: the one call of
    the UNet in t2i."""
    extra = {} if cond.added is None else {"added_cond_kwargs": cond.added}
    out = unet(x_t, t, encoder_hidden_states=cond.states, encoder_attention_mask=cond.mask, **extra)
    return out.sample if hasattr(out, "sample") else out[0]   # diffusers' output, or a tuple


def cat_encodings(a: PromptEncoding, b: PromptEncoding) -> PromptEncoding:
    """Two encodings of the same token length as one batch, a's rows first."""
    pooled = None if a.pooled is None else torch.cat([a.pooled, b.pooled.to(a.pooled.device)])
    return PromptEncoding(torch.cat([a.hidden_states, b.hidden_states.to(a.hidden_states.device)]),
                          torch.cat([a.attention_mask, b.attention_mask.to(a.attention_mask.device)]),
                          torch.cat([a.input_ids, b.input_ids.to(a.input_ids.device)]), a.tokens + b.tokens, pooled)


class T2IText:
    """t2i's own: the encoder's last hidden state, padding masked (the UNet was trained so)."""

    mask_padding = True
    zeros_for_empty_prompt = False

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def encode(self, texts: list[str], max_length: int | None = None, clip_skip: int | None = None,
               negative: bool = False, key_weights: torch.Tensor | None = None) -> PromptEncoding:
        """Texts -> PromptEncoding (B, T, width) padded to the tokenizer's length (or max_length). `key_weights`
        (B, T) scale each token's key in the encoder's self-attention (word weights, t2i.text.weighted_mask)."""
        if clip_skip:
            raise ValueError("clip_skip is for Stable Diffusion's CLIP; this model's text encoder was trained "
                             "with its last layer")
        return encode_prompts(self.tokenizer, self.text_encoder, texts, max_length, key_weights)

    def unet_conditioning(self, enc: PromptEncoding, rows: int, height: int, width: int) -> UNetConditioning:
        """The UNet batch's conditioning: each text's row repeated `rows // len(texts)` times in a row."""
        n = rows // len(enc.tokens)
        return UNetConditioning(enc.hidden_states.repeat_interleave(n, dim=0),
                                enc.attention_mask.repeat_interleave(n, dim=0) if self.mask_padding else None)

    def describe(self) -> str:
        te = self.text_encoder.config
        return f"t2i's CLIP text encoder, width {te.hidden_size}, {te.num_hidden_layers} layers, padding masked"


class CLIPText(T2IText):
    """Stable Diffusion 1.x and 2.x: CLIP's last hidden state, no padding mask (diffusers'
    StableDiffusionPipeline.encode_prompt). `clip_skip` k takes the hidden state k layers before the last,
    through the final layer norm, for the prompt only: diffusers encodes the negative prompt without it."""

    mask_padding = False

    def _states(self, text_encoder, ids: torch.Tensor, clip_skip: int | None,
                key_weights: torch.Tensor | None = None) -> torch.Tensor:
        config = text_encoder.config
        mask = None
        if getattr(config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        if key_weights is not None:  # word weights: a causal 4D mask with each token's log-weight on its key
            mask = weighted_mask(torch.ones_like(ids) if mask is None else mask, key_weights, text_encoder.dtype,
                                 mask_padding=mask is not None)
        if not clip_skip:
            return text_encoder(ids, attention_mask=mask)[0]
        states = text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if not 0 < clip_skip < len(states) - 1:
            raise ValueError(f"clip_skip must be from 1 to {len(states) - 2} for this text encoder, got {clip_skip}")
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 / 5
        return norm(states[-(clip_skip + 1)])

    def encode(self, texts, max_length=None, clip_skip=None, negative=False, key_weights=None) -> PromptEncoding:
        batch = tokenize(self.tokenizer, texts, max_length)
        ids, mask = batch["input_ids"].to(self.text_encoder.device), batch["attention_mask"].to(self.text_encoder.device)
        states = self._states(self.text_encoder, ids, None if negative else clip_skip, key_weights)
        return PromptEncoding(states, mask, ids, token_strings(self.tokenizer, ids, mask))

    def describe(self) -> str:
        te = self.text_encoder.config
        return (f"CLIP text encoder (Stable Diffusion 1.x/2.x), width {te.hidden_size}, {te.num_hidden_layers} "
                "layers, padding not masked")


class SDXLText(CLIPText):
    """Stable Diffusion XL (diffusers' StableDiffusionXLPipeline.encode_prompt): both encoders' penultimate
    hidden states (clip skip k: k layers before it), concatenated along the width; the second encoder's
    pooled projection; time ids (H, W, 0, 0, H, W): original size, crop top-left, target size."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, force_zeros_for_empty_prompt: bool = True):
        super().__init__(tokenizer, text_encoder)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def encode(self, texts, max_length=None, clip_skip=None, negative=False, key_weights=None) -> PromptEncoding:
        skip = 0 if negative or not clip_skip else clip_skip
        states, pooled, first = [], None, None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            with warnings.catch_warnings():
                if first is not None:                             # a cut prompt is said once, not per tokenizer
                    warnings.simplefilter("ignore", PromptTruncated)
                batch = tokenize(tokenizer, texts, max_length)
            ids = batch["input_ids"].to(encoder.device)
            bias = None if key_weights is None else weighted_mask(torch.ones_like(ids), key_weights, encoder.dtype,
                                                                  mask_padding=False)
            out = encoder(ids, attention_mask=bias, output_hidden_states=True)
            if not 0 <= skip < len(out.hidden_states) - 2:
                raise ValueError(f"clip_skip must be from 1 to {len(out.hidden_states) - 3} for these text encoders, "
                                 f"got {clip_skip}")
            states.append(out.hidden_states[-(skip + 2)])
            if out[0].ndim == 2:                              # CLIPTextModelWithProjection: text_embeds (B, D)
                pooled = out[0]
            first = first or (ids, batch["attention_mask"].to(encoder.device))
        if pooled is None:
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (its pooled text)")
        ids, mask = first
        return PromptEncoding(torch.cat(states, dim=-1), mask, ids, token_strings(self.tokenizer, ids, mask), pooled)

    def zeros(self, enc: PromptEncoding) -> PromptEncoding:
        """The encoding of an absent negative prompt under force_zeros_for_empty_prompt: its tokens, zero states."""
        return replace(enc, hidden_states=torch.zeros_like(enc.hidden_states), pooled=torch.zeros_like(enc.pooled))

    def unet_conditioning(self, enc, rows, height, width) -> UNetConditioning:
        n = rows // len(enc.tokens)
        states = enc.hidden_states.repeat_interleave(n, dim=0)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=states.device)
        added = {"text_embeds": enc.pooled.repeat_interleave(n, dim=0).to(states.device),
                 "time_ids": time_ids.repeat(rows, 1)}
        return UNetConditioning(states, None, added)

    def describe(self) -> str:
        a, b = self.text_encoder.config, self.text_encoder_2.config
        return (f"two CLIP text encoders (SDXL), widths {a.hidden_size} + {b.hidden_size}, pooled text "
                f"{b.projection_dim}, size conditioning; empty negative prompt as zeros: {self.zeros_for_empty_prompt}")


class FrozenConditioning:
    """Training on a Stable Diffusion start, whose text encoders stay frozen: captions -> the UNet's conditioning
    (B rows), each caption encoded once by `text` (CLIPText, SDXLText) and cached; SDXL's size conditioning says
    the training images' side (`size`: uncropped, as a center crop of a resized image is taken to be)."""

    def __init__(self, text: T2IText, size: int, cache_size: int = 100_000):
        self.text, self.size = text, size
        self.cache = CaptionCache(lambda caption: text.encode([caption]), cache_size)

    @torch.no_grad()
    def __call__(self, captions: list[str], device) -> UNetConditioning:
        parts = self.cache(captions)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        enc = PromptEncoding(*(torch.cat([getattr(p, k) for p in parts]) for k in ("hidden_states", "attention_mask",
                                                                                   "input_ids")),
                             [t for p in parts for t in p.tokens], pooled)
        cond = self.text.unet_conditioning(enc, len(captions), self.size, self.size)
        added = None if cond.added is None else {k: v.to(device) for k, v in cond.added.items()}
        return UNetConditioning(cond.states.to(device), None if cond.mask is None else cond.mask.to(device), added)
