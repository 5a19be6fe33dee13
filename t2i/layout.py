"""The rows of the UNet's batch while sampling: the contract between the pipeline, which makes a
BatchLayout for each call, and the hooks that read it (the attention recorder, word reweighting)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .text import PromptEncoding


@dataclass(frozen=True)
class BatchLayout:
    """The rows of the UNet's batch while sampling: [uncond x B*n, cond x B*n] when guided, else
    [cond x B*n], each text's n images in a row. The pipeline makes it; the attention recorder reads it."""

    encoding: PromptEncoding              # the encoded texts: [uncond (B), cond (B)] when guided, else [cond (B)]
    image_size: tuple[int, int]           # (H, W) the UNet samples at
    images_per_prompt: int = 1            # n
    guided: bool = False
    num_inference_steps: int | None = None

    def __post_init__(self):
        if self.guided and len(self.encoding.tokens) % 2:
            raise ValueError(f"a guided batch needs [uncond, cond] texts, got an odd number ({len(self.encoding.tokens)})")

    @property
    def num_prompts(self) -> int:
        """B, the number of prompts."""
        return len(self.encoding.tokens) // (2 if self.guided else 1)

    @property
    def rows(self) -> int:
        """Rows of the UNet's batch: B * n, twice that when guided."""
        return len(self.encoding.tokens) * self.images_per_prompt

    def texts(self, branch: str = "cond") -> range:
        """Indices into `encoding` of the branch's texts: 'cond' (the prompts) or 'uncond' (guided only)."""
        first = self.num_prompts if self.guided and branch == "cond" else 0
        return range(first, first + self.num_prompts)

    def branch_rows(self, branch: str = "cond") -> slice:
        """The UNet batch rows of a branch."""
        texts, n = self.texts(branch), self.images_per_prompt
        return slice(texts.start * n, texts.stop * n)


def query_grid(N: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) query grid of a cross-attention layer with N = h * w queries for an image of `image_size`
    (H, W): (H/f, W/f) for the layer's downsampling f."""
    H, W = image_size
    f = max(1, round(math.sqrt(H * W / N)))
    h, w = -(-H // f), -(-W // f)
    if h * w != N:
        raise ValueError(f"cannot lay {N} queries on a grid for a {H}x{W} image")
    return h, w
