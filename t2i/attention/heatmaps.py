"""Per-token cross-attention heatmaps of generated images, and their reading by word: sub-tokens of a
word merged, repeated words told apart ("circle#2"), normalised and upsampled to the image in torch;
and their file format: the maps as safetensors with the metadata as JSON in its header.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from tokenizers.decoders import ByteLevel

from ..text import BOS, END_OF_WORD, EOS

METADATA_KEY = "t2i.heatmaps"
FORMAT_VERSION = 1
NORMALIZE = ("token", "shared", None)
_BYTES = ByteLevel()


# ----------------------------------------------------------------------------------------------
# Words from CLIP tokens: a word is a run of sub-tokens closed by one ending in '</w>'.


def word_spans(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """[(word, indices of its sub-tokens in `tokens`)], skipping the start/end tokens.
    ['<|startoftext|>', 'caf', 'Ã', '©</w>', '<|endoftext|>'] -> [('café', [1, 2, 3])]."""
    spans, pieces, idx = [], [], []
    for i, tok in enumerate(tokens):
        if tok in (BOS, EOS):
            continue
        pieces.append(tok.removesuffix(END_OF_WORD))
        idx.append(i)
        if tok.endswith(END_OF_WORD):
            spans.append((_BYTES.decode(pieces), idx))
            pieces, idx = [], []
    if idx:  # a word cut by truncation has no '</w>'
        spans.append((_BYTES.decode(pieces), idx))
    return spans


def word_labels(tokens: list[str]) -> list[str]:
    """One label per word; the k-th repeat (k >= 2) of a word is 'word#k'."""
    seen: dict[str, int] = {}
    labels = []
    for word, _ in word_spans(tokens):
        seen[word] = seen.get(word, 0) + 1
        labels.append(word if seen[word] == 1 else f"{word}#{seen[word]}")
    return labels


def prompt_text(tokens: list[str]) -> str:
    """The (normalised, lower-case) prompt the tokens spell."""
    return " ".join(word for word, _ in word_spans(tokens))


def resolve_word(tokens: list[str], word: str) -> tuple[str, list[int]]:
    """'circle' (first occurrence) or 'circle#2' -> (label, token indices). Unknown -> ValueError."""
    m = re.fullmatch(r"(.+?)(?:#(\d+))?", word.strip().lower())
    name, k = m.group(1).strip(), int(m.group(2) or 1)
    spans = [idx for w, idx in word_spans(tokens) if w == name]
    if not spans:
        words = ", ".join(dict.fromkeys(w for w, _ in word_spans(tokens))) or "(none)"
        raise ValueError(f"{word!r} is not a word of the prompt {prompt_text(tokens)!r}; its words are: {words}")
    if not 1 <= k <= len(spans):
        choices = [name] + [f"{name}#{j}" for j in range(2, len(spans) + 1)]
        raise ValueError(f"the prompt {prompt_text(tokens)!r} has {len(spans)} {name!r}, not {k}; "
                         f"ask for one of: {', '.join(choices)}")
    return (name if k == 1 else f"{name}#{k}"), spans[k - 1]


def check_words(tokens: list[str], words: list[str], all_tokens: list[str] | None = None) -> list[str]:
    """The label of each word (resolve_word's), or a ValueError, before sampling, when a word is not in the
    tokenised prompt. `all_tokens`, the prompt tokenised without the length limit, tells a word the limit cut
    off from one that was never there."""
    labels = []
    for w in words:
        try:
            labels.append(resolve_word(tokens, w)[0])
        except ValueError:
            if all_tokens is None or not has_word(all_tokens, w):
                raise
            raise ValueError(f"{w!r} was cut off by the text encoder's {len(tokens)}-token limit: the model sees "
                             f"only {prompt_text(tokens)!r}; shorten the prompt to keep it") from None
    return labels


def has_word(tokens: list[str], word: str) -> bool:
    """Whether `word` ('circle', 'circle#2') is a word of the tokens."""
    try:
        resolve_word(tokens, word)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# Map operations, all on (K, h, w) float32 stacks.


def resize_maps(maps: torch.Tensor, size: tuple[int, int] | None, mode: str = "bilinear") -> torch.Tensor:
    """(K, h, w) -> (K, *size) by bilinear or bicubic interpolation (bicubic overshoot clamped at 0)."""
    if size is None or tuple(size) == tuple(maps.shape[-2:]):
        return maps
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"upsampling mode must be 'bilinear', 'bicubic' or 'nearest', got {mode!r}")
    kw = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(maps[None].float(), size=tuple(size), mode=mode, **kw)[0]
    return out.clamp_min(0) if mode == "bicubic" else out


def normalize_maps(maps: torch.Tensor, how: str | None = "token") -> torch.Tensor:
    """Min-max scale to [0, 1]: each map on its own ('token'), all K maps together ('shared'), or not (None)."""
    if how not in NORMALIZE:
        raise ValueError(f"normalize must be 'token', 'shared' or None, got {how!r}")
    if how is None or maps.numel() == 0:
        return maps
    dims = (-2, -1) if how == "token" else (-3, -2, -1)
    lo, hi = maps.amin(dim=dims, keepdim=True), maps.amax(dim=dims, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Heatmaps:
    """Cross-attention of each generated image to each of its prompt's tokens.

    `maps[i, j]` is the attention of image i's pixels to token `tokens[i][j]`, averaged over the
    recorded layers, heads and steps: at each pixel the maps over an image's real tokens sum to 1.
    Rows are the pipeline's images (prompt-major: image i = prompt i // n, sample i % n)."""

    maps: torch.Tensor                         # (images, T, h, w) float32; zero beyond len(tokens[i])
    tokens: list[list[str]]                    # real tokens of each image's prompt, incl. start/end
    prompts: list[str]                         # each image's prompt text (the negative one for branch='uncond')
    image_size: tuple[int, int]                # (H, W) of the generated images
    layers: list[str]                          # cross-attention modules that contributed
    steps: list[int]                           # sampling steps that contributed
    num_inference_steps: int | None = None
    branch: str = "cond"                       # 'cond' or 'uncond' (classifier-free guidance branch)
    heads: list[int] | None = None             # head indices averaged, None = all
    prompt_index: list[int] = field(default_factory=list)  # image -> index of its prompt in the batch
    timeline: torch.Tensor | None = None       # (len(steps), images, T, hc, wc) float32, one coarse map per step

    def __post_init__(self):
        if self.maps.ndim != 4:
            raise ValueError(f"maps must be (images, tokens, h, w), got shape {tuple(self.maps.shape)}")
        if len(self.tokens) != self.maps.shape[0] or len(self.prompts) != self.maps.shape[0]:
            raise ValueError(f"{self.maps.shape[0]} maps but {len(self.tokens)} token lists and "
                             f"{len(self.prompts)} prompts: give one of each per image")
        self.image_size = tuple(int(s) for s in self.image_size)
        if not self.prompt_index:
            self.prompt_index = list(range(self.maps.shape[0]))

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.maps.shape[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the stored maps: the finest query grid recorded."""
        return tuple(self.maps.shape[-2:])

    def _check_image(self, image: int) -> int:
        if not -self.num_images <= image < self.num_images:
            raise ValueError(f"image index {image} is out of range for {self.num_images} image(s)")
        return image % self.num_images

    def _size(self, size) -> tuple[int, int] | None:
        return self.image_size if isinstance(size, str) and size == "image" else size

    # -- reading ---------------------------------------------------------------------------------
    def words(self, image: int = 0) -> list[str]:
        """Labels of image's words, in prompt order ('circle#2' for a repeat)."""
        return word_labels(self.tokens[self._check_image(image)])

    def token_maps(self, image: int = 0, normalize: str | None = None,
                   size: tuple[int, int] | str | None = None, mode: str = "bilinear") -> torch.Tensor:
        """(len(tokens[image]), h, w) maps, one per token incl. start/end. `size`: None (the recorded
        grid), 'image' (the image size) or (H, W); `normalize`: None (probabilities), 'token', 'shared'."""
        i = self._check_image(image)
        maps = self.maps[i, : len(self.tokens[i])]
        return normalize_maps(resize_maps(maps, self._size(size), mode), normalize)

    def word_maps(self, image: int = 0, words: list[str] | str | None = None, normalize: str | None = "token",
                  size: tuple[int, int] | str | None = None, mode: str = "bilinear") -> dict[str, torch.Tensor]:
        """{label: (h, w) map} for the given words (default: every word of the prompt). A word's map
        is the sum of its sub-tokens' maps; 'circle#2' is the second 'circle'. A word not in the
        prompt is a ValueError listing the prompt's words. Normalised after resizing."""
        i = self._check_image(image)
        tokens = self.tokens[i]
        words = words.split(",") if isinstance(words, str) else words
        if words is None:
            words = word_labels(tokens)
        resolved = [resolve_word(tokens, w) for w in words]
        if not resolved:
            return {}
        maps = torch.stack([self.maps[i, idx].sum(0) for _, idx in resolved])   # (K, h, w)
        maps = normalize_maps(resize_maps(maps, self._size(size), mode), normalize)
        return {label: m for (label, _), m in zip(resolved, maps)}

    def word_timeline(self, image: int, word: str, normalize: str | None = "shared",
                      size: tuple[int, int] | str | None = None, mode: str = "bilinear") -> torch.Tensor:
        """(len(steps), h, w): the word's coarse map at each recorded step (needs timeline=True)."""
        if self.timeline is None:
            raise ValueError("these heatmaps have no timeline: record with AttentionRecorder(timeline=True)")
        i = self._check_image(image)
        _, idx = resolve_word(self.tokens[i], word)
        maps = self.timeline[:, i, idx].sum(1)                                  # (S, hc, wc)
        return normalize_maps(resize_maps(maps, self._size(size), mode), normalize)

    def select(self, images: int | list[int]) -> "Heatmaps":
        """The heatmaps of a subset of the images, padded to their own longest prompt."""
        images = [self._check_image(i) for i in ([images] if isinstance(images, int) else images)]
        T = max(len(self.tokens[i]) for i in images)
        return replace(self, maps=self.maps[images, :T].clone(), tokens=[self.tokens[i] for i in images],
                       prompts=[self.prompts[i] for i in images], prompt_index=[self.prompt_index[i] for i in images],
                       timeline=None if self.timeline is None else self.timeline[:, images, :T].clone())

    @classmethod
    def concat(cls, parts: list["Heatmaps"]) -> "Heatmaps":
        """Recordings of the same layers and steps, each a batch of its own, as one: their images in order, padded
        to the longest prompt, prompt indices running on from batch to batch (the inverse of `select`)."""
        T = max(p.maps.shape[1] for p in parts)
        pad = lambda x: F.pad(x, (0, 0, 0, 0, 0, T - x.shape[-3]))  # noqa: E731  (..., T, h, w): tokens to T
        starts = [sum(max(p.prompt_index) + 1 for p in parts[:k]) for k in range(len(parts))]
        timelines = [p.timeline for p in parts]
        return replace(parts[0], maps=torch.cat([pad(p.maps) for p in parts]),
                       tokens=[t for p in parts for t in p.tokens], prompts=[t for p in parts for t in p.prompts],
                       prompt_index=[start + i for start, p in zip(starts, parts) for i in p.prompt_index],
                       timeline=None if None in timelines else torch.cat([pad(t) for t in timelines], 1))

    def metadata(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return dict(prompts=self.prompts, tokens=self.tokens, words=[self.words(i) for i in range(self.num_images)],
                    image_size=list(self.image_size), grid_size=list(self.grid_size), layers=self.layers,
                    steps=self.steps, num_inference_steps=self.num_inference_steps, branch=self.branch,
                    heads=self.heads, prompt_index=self.prompt_index)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write `maps` (images, T, h, w) and, if kept, `timeline` (S, images, T, hc, wc) to a .safetensors
        file; the metadata goes into its header as JSON under 't2i.heatmaps'."""
        tensors = {"maps": self.maps.float().contiguous()}
        if self.timeline is not None:
            tensors["timeline"] = self.timeline.float().contiguous()
        meta = {"version": FORMAT_VERSION, **self.metadata()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))  # save_file makes it 0600

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Heatmaps":
        """Read a file written by `save`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no heatmaps file at {path!r}")
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
        if header is None:
            raise ValueError(f"{path!r} is a safetensors file without t2i heatmap metadata; "
                             "write it with Heatmaps.save")
        meta = json.loads(header)
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path!r} has heatmaps format version {meta.get('version')}, this t2i reads "
                             f"{FORMAT_VERSION}")
        tensors = load_file(path)
        fields = ("tokens", "prompts", "image_size", "layers", "steps", "num_inference_steps", "branch", "heads",
                  "prompt_index")
        return cls(maps=tensors["maps"], timeline=tensors.get("timeline"), **{k: meta[k] for k in fields})

    def __repr__(self) -> str:
        return (f"Heatmaps({self.num_images} image(s), maps {tuple(self.maps.shape)}, image {self.image_size}, "
                f"branch={self.branch!r}, {len(self.layers)} layer(s), steps {self.steps}, "
                f"timeline={'yes' if self.timeline is not None else 'no'})")
