"""CLIP text encoding (Radford et al. 2021) through transformers: a pretrained CLIP by hub name or
local path, or an offline CLIP whose BPE vocabulary is learned from a caption corpus and whose
text transformer is built from a small CLIPTextConfig and trained with the UNet. One encode path
serves sampling (encode_prompts) and training (TextStates, with caption dropout).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from .config import TextConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"   # CLIP's start and end tokens
END_OF_WORD = "</w>"                             # closes the last sub-token of a word


class PromptTruncated(UserWarning):
    """A prompt was longer than the tokenizer's max length and its last tokens were dropped. A caller that
    counts cut words itself silences exactly this: warnings.simplefilter("ignore", PromptTruncated)."""


@dataclass
class PromptEncoding:
    """Text states for a batch of prompts, padded to the tokenizer's fixed length T."""

    hidden_states: torch.Tensor      # (B, T, width)
    attention_mask: torch.Tensor     # (B, T), 1 for real tokens (BOS, words, EOS), 0 for padding
    input_ids: torch.Tensor          # (B, T)
    tokens: list[list[str]]          # the real tokens of each prompt, e.g. ['<|startoftext|>', 'red</w>', ...]
    pooled: torch.Tensor | None = None  # (B, D) SDXL's pooled text (t2i.conditioning.SDXLText), else None


# ----------------------------------------------------------------------------------------------
# Offline tokenizer: byte-level BPE with CLIP's normalisation and word splitting, merges learned
# from the corpus until every corpus word is a single token. Every byte is in the vocabulary, so
# any other text still tokenises (into sub-words or bytes), never into <unk>.


def _split_words(text: str, tokenizer: CLIPTokenizer) -> list[str]:
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(text)
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def learn_bpe(word_counts: Counter, max_merges: int = 10_000) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair.
    Words are byte-level strings; the last symbol carries the end-of-word suffix. Ties break
    lexicographically, so the merges are deterministic."""
    words = {tuple(w[:-1]) + (w[-1] + END_OF_WORD,): c for w, c in word_counts.items() if w}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_offline_tokenizer(corpus: list[str], max_length: int = 24) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is learned from `corpus` (a list of captions)."""
    if not corpus:
        raise ValueError("the caption corpus for the offline tokenizer is empty; pass at least one caption")
    splitter = CLIPTokenizer()
    counts = Counter(w for text in corpus for w in _split_words(text, splitter))
    merges = learn_bpe(counts)
    alphabet = sorted(ByteLevel.alphabet())
    vocab_list = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_offline_text_encoder(tokenizer: CLIPTokenizer, width: int = 128, layers: int = 2, heads: int = 4,
                               seed: int | None = None) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer sized for `tokenizer` (trained with the UNet)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return CLIPTextModel(config)


def grow_text(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, corpus: list[str],
              max_length: int) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """An offline tokenizer learned from `corpus` (which should hold the old vocabulary's words too) and a copy of
    `encoder` sized for it and for `max_length` tokens: every token both vocabularies share keeps its embedding,
    the first positions keep theirs, and the transformer is the same; new rows start as CLIP initialises them."""
    grown = build_offline_tokenizer(corpus, max_length)
    config = CLIPTextConfig(**{**encoder.config.to_dict(), "vocab_size": len(grown), "max_position_embeddings": max_length,
                               "bos_token_id": grown.bos_token_id, "eos_token_id": grown.eos_token_id,
                               "pad_token_id": grown.pad_token_id})
    torch.manual_seed(0)
    out = CLIPTextModel(config).to(encoder.dtype)
    old, new = encoder.get_input_embeddings().weight, out.get_input_embeddings().weight
    old_pos = encoder.state_dict()[next(k for k in encoder.state_dict() if k.endswith("position_embedding.weight"))]
    rest = {k: v for k, v in encoder.state_dict().items() if "embeddings" not in k}
    out.load_state_dict(rest, strict=False)
    with torch.no_grad():
        before = tokenizer.get_vocab()
        for token, i in grown.get_vocab().items():
            if token in before:
                new[i] = old[before[token]]
        new_pos = dict(out.named_parameters())[next(k for k, _ in out.named_parameters()
                                                    if k.endswith("position_embedding.weight"))]
        n = min(old_pos.shape[0], max_length)
        new_pos[:n] = old_pos[:n]
    return grown, out


def load_pretrained_clip(name_or_path: str) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """Tokenizer and text encoder of a pretrained CLIP: a hub name, a local CLIP folder, or a
    Stable-Diffusion-style folder with `tokenizer/` and `text_encoder/` sub-folders. A hub name with the hub
    out of reach reads the local cache only: a quick error instead of minutes of retries."""
    local = os.path.isdir(name_or_path)
    offline = not local and not hub_reachable()
    sub = "text_encoder" if local and os.path.isdir(os.path.join(name_or_path, "text_encoder")) else ""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder=sub and "tokenizer",
                                                  local_files_only=local or offline)
        encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder=sub, local_files_only=local or offline)
    except OSError as e:
        why = (": not a local folder, the Hugging Face hub is unreachable and the local cache has no copy. Pass a "
               "local path" if offline else f" ({str(e).splitlines()[0]}). Pass a local folder")
        raise ValueError(f"could not load a CLIP text encoder from {name_or_path!r}{why} (a CLIP saved with "
                         "save_pretrained), or leave text.pretrained empty to build the offline encoder.") from None
    return tokenizer, encoder


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds; False in offline mode."""
    from huggingface_hub import constants, get_session, is_offline_mode
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if is_offline_mode() or any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # no route, no name, refused, timed out, a proxy's refusal: unreachable all the same
        return False
    return True


# ----------------------------------------------------------------------------------------------


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int | None = None) -> dict:
    """Pad/truncate to a fixed length; warn with the count of dropped tokens when a prompt is too long."""
    T = max_length or tokenizer.model_max_length
    full = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]  # verbose: transformers' own warning
    for prompt, ids in zip(prompts, full):
        if len(ids) > T:
            dropped = tokenizer.decode(ids[T - 1:-1]).lstrip("\ufffd")  # a character split across the limit
            warnings.warn(
                f"prompt {_shortened(prompt)!r} is {len(ids)} tokens with start/end, the limit is {T}: dropped the "
                f"last {len(ids) - T} tokens ({_shortened(dropped)!r}). Shorten the prompt to keep them.",
                PromptTruncated, stacklevel=4)
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=T, return_tensors="pt")


def _shortened(text: str, most: int = 60) -> str:
    """`text`, or its start and its length when longer than `most` characters."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def encode(tokenizer: CLIPTokenizer, text_encoder, texts: list[str], device: torch.device | str | None = None,
           max_length: int | None = None, key_weights: torch.Tensor | None = None, mask_padding: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texts -> (hidden states (B, T, width), attention mask (B, T), input ids (B, T)) on `device`
    (default: the encoder's). `key_weights` (B, T) scale each token's key in the encoder's self-attention
    (word weights, weighted_mask). `mask_padding=False` lets the encoder read every token, as Stable
    Diffusion's CLIP does (t2i.conditioning.CLIPText). The one encode path of sampling and training."""
    batch = tokenize(tokenizer, texts, max_length)
    device = text_encoder.device if device is None else device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if key_weights is not None:
        attention = weighted_mask(mask, key_weights, text_encoder.dtype)
    else:
        attention = mask if mask_padding else None
    return text_encoder(input_ids=ids, attention_mask=attention).last_hidden_state, mask, ids


def weighted_mask(mask: torch.Tensor, key_weights: torch.Tensor, dtype: torch.dtype,
                  mask_padding: bool = True) -> torch.Tensor:
    """CLIP's causal attention mask (B, 1, T, T), additive, with padding (mask 0) shut when `mask_padding` and
    each token's key scaled by key_weights (B, T): log(weight) added to every query's logit for it, so weight 0
    takes the token out of every later token's state and 2 doubles its odds (the softmax renormalises)."""
    T = mask.shape[1]
    causal = torch.full((T, T), float("-inf"), device=mask.device).triu(1)
    keys = key_weights.to(mask.device, torch.float32).log()                                          # (B, T)
    if mask_padding:
        keys = keys.masked_fill(mask == 0, float("-inf"))
    bias = causal[None, None] + keys[:, None, None, :]
    # the start token (weight 1, never padding) keeps every row finite
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)


def token_strings(tokenizer: CLIPTokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
    """The real tokens (start, words, end) of each row of ids (B, T) where mask (B, T) is 1."""
    return [tokenizer.convert_ids_to_tokens(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   max_length: int | None = None, key_weights: torch.Tensor | None = None) -> PromptEncoding:
    """Prompts -> per-token hidden states (B, T, width) with their mask and token strings (key_weights: see encode)."""
    hidden, mask, ids = encode(tokenizer, text_encoder, prompts, max_length=max_length, key_weights=key_weights)
    return PromptEncoding(hidden, mask, ids, token_strings(tokenizer, ids, mask))


# ----------------------------------------------------------------------------------------------
# Training: the run's tokenizer and encoder, caption dropout, and text states per batch.


def build_text(cfg: TextConfig, corpus: list[str], run_dir: Path | None = None):
    """Tokenizer and text encoder. An offline tokenizer is learned once per run and kept in
    `{run_dir}/tokenizer`, so a resumed run reads the same vocabulary even if the corpus changed."""
    if cfg.pretrained:
        tokenizer, encoder = load_pretrained_clip(cfg.pretrained)
    else:
        saved = run_dir / "tokenizer" if run_dir is not None else None
        if saved is not None and (saved / "tokenizer.json").exists():
            tokenizer = CLIPTokenizer.from_pretrained(saved)
        else:
            tokenizer = build_offline_tokenizer(corpus, cfg.max_length)
        encoder = build_offline_text_encoder(tokenizer, cfg.width, cfg.layers, cfg.heads)
    encoder.requires_grad_(cfg.trainable)
    return tokenizer, encoder


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Caption dropout for classifier-free guidance (Ho & Salimans 2022): each caption becomes the empty
    prompt with probability p, one draw from `generator` per caption."""
    return [c if torch.rand((), generator=generator) >= p else "" for c in captions]


class CaptionCache:
    """A frozen encoder's result per caption, cached. Each caption is encoded alone, so that what it gets does not
    depend on the batch it first came in (a resumed run draws other batches first); the cache is emptied when it
    would hold more than `size` captions."""

    def __init__(self, encode_one: Callable[..., object], size: int = 100_000):
        self.encode_one, self.size = encode_one, size
        self.entries: dict[str, object] = {}

    def __call__(self, captions: list[str], *args) -> list:
        """encode_one(caption, *args) of each caption, the new ones encoded now, in sorted order."""
        todo = sorted({c for c in captions if c not in self.entries})
        if len(self.entries) + len(todo) > self.size:
            self.entries.clear()
        for c in todo:
            self.entries[c] = self.encode_one(c, *args)
        return [self.entries[c] for c in captions]


class TextStates:
    """Captions -> (states (B, T, width), mask (B, T), or None when the UNet reads every token as Stable
    Diffusion's does: `mask_padding=False`). A frozen encoder's states are cached per caption."""

    def __init__(self, tokenizer, encoder, trainable: bool, cache_size: int = 100_000, mask_padding: bool = True):
        self.tokenizer, self.encoder, self.trainable = tokenizer, encoder, trainable
        self.mask_padding = mask_padding
        self.cache = CaptionCache(self._encode_one, cache_size)

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.trainable:
            states, mask, _ = encode(self.tokenizer, self.encoder, captions, device, mask_padding=self.mask_padding)
        else:
            with torch.no_grad():
                cached = self.cache(captions, device)
            states, mask = torch.stack([s for s, _ in cached]), torch.stack([m for _, m in cached])
        return states, mask if self.mask_padding else None

    def _encode_one(self, caption: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        states, masks, _ = encode(self.tokenizer, self.encoder, [caption], device, mask_padding=self.mask_padding)
        return states[0], masks[0]
