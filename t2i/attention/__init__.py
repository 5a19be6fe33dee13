"""Cross-attention heatmaps: record per-token attention while sampling, read it per word, draw it.

    rec = AttentionRecorder(steps=(0.0, 0.5))             # or pipe(..., record_attention=True)
    out = pipe("a red circle", record_attention=rec)
    maps = out.attention.word_maps(0, ["red", "circle"], size="image")   # {word: (H, W)}
    grid_image(out.images[0], out.attention, 0).save("grid.png")
"""

from .heatmaps import Heatmaps
from .processors import attention_with_probs, cross_attention_modules
from .recorder import AttentionRecorder

__all__ = ["AttentionRecorder", "Heatmaps", "attention_with_probs", "cross_attention_modules"]
