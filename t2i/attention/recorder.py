"""Records per-token cross-attention probabilities during sampling, the maps behind DAAM (Tang et al.
2023) and prompt-to-prompt (Hertz et al. 2022): softmax(q k^T / sqrt(d) + mask) of the selected
cross-attention layers, reduced on the fly in float32 (summed over heads, layers and steps) so the
memory kept does not grow with the number of steps. Works on t2i's T2IUNet and on diffusers'
UNet2DConditionModel; hooks are keyed by module name and by the step index the sampler sets.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import query_grid
from .heatmaps import Heatmaps, prompt_text
from .processors import attached, cross_attention_modules

if TYPE_CHECKING:
    from ..layout import BatchLayout

BRANCHES = ("cond", "uncond")


# ----------------------------------------------------------------------------------------------


class AttentionRecorder:
    """Which cross-attention to record, and the running float32 sums while sampling.

    layers: regex searched in module names (e.g. r'^up\\.' or 'attn2'), None = every cross-attention.
    resolutions: query grids to keep, as ints (the grid's longer side max(h, w), e.g. {8, 16}) or
        (h, w) tuples; the grid of a layer is (H/f, W/f) for an H x W image. None = all.
    steps: (start, stop) floats, a fraction window of the sampling steps ((0.0, 0.5) = first half),
        or a set/list/range of step indices. None = all.
    heads: head indices to average, None = all. branch: 'cond' (the prompts) or 'uncond' (the
    negative or empty prompts; needs classifier-free guidance). timeline: also keep one coarse map
    per recorded step (memory then grows with the steps).
    Usage: `with rec.record(unet, layout): for i ...: rec.set_step(i); unet(...)`, then `rec.heatmaps()`,
    where `layout` is the t2i.layout.BatchLayout of the UNet's batch (pipe(..., record_attention=rec)
    does all of this)."""

    def __init__(self, layers: str | None = None, resolutions: Iterable[int | tuple[int, int]] | None = None,
                 steps: tuple[float, float] | Iterable[int] | None = None, heads: Iterable[int] | None = None,
                 branch: str = "cond", timeline: bool = False):
        if branch not in BRANCHES:
            raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
        self.layers = layers
        try:
            self._layer_re = re.compile(layers) if layers is not None else None
        except re.error as e:
            raise ValueError(f"layers={layers!r} is not a valid regular expression ({e})") from None
        self.resolutions = None if resolutions is None else {tuple(r) if isinstance(r, (tuple, list)) else int(r)
                                                             for r in resolutions}
        self.steps = steps
        self.heads = None if heads is None else sorted(set(int(h) for h in heads))
        if self.heads is not None and (not self.heads or self.heads[0] < 0):
            raise ValueError(f"heads must be non-empty, non-negative indices, got {heads}")
        self.branch, self.timeline = branch, timeline
        self._layout: BatchLayout | None = None
        self._reset()

    def _reset(self):
        self._sums: dict[tuple[int, int], list] = {}      # grid -> [sum (rows, N, T) float32, count]
        self._current = {} if self.timeline else self._sums  # where the processors add (per step if timeline)
        self._timeline: dict[int, dict] = {}              # step -> {grid: [coarse sum (rows, T, hc, wc), count]}
        self._step: int | None = None
        self._step_set: set[int] | None = None            # steps to record, None = all
        self._active = False
        self._grids: dict[int, tuple[int, int]] = {}
        self._layers_seen: dict[str, tuple[int, int]] = {}  # layer -> its grid
        self._steps_seen: set[int] = set()

    # -- selection -------------------------------------------------------------------------------
    def _select_steps(self, num_steps: int | None) -> set[int] | None:
        s = self.steps
        if s is None:
            return None
        if isinstance(s, tuple) and len(s) == 2 and any(isinstance(x, float) for x in s):
            start, stop = s
            if not 0.0 <= start < stop <= 1.0:
                raise ValueError(f"steps window {s} must be (start, stop) with 0 <= start < stop <= 1")
            if not num_steps:
                raise ValueError("a fractional steps window needs the layout's num_inference_steps in record()")
            chosen = {i for i in range(num_steps) if start * num_steps <= i < stop * num_steps}
            if not chosen:
                raise ValueError(f"steps window {s} selects none of {num_steps} steps; widen it")
            return chosen
        chosen = {int(i) for i in s}
        bad = sorted(i for i in chosen if i < 0 or (num_steps and i >= num_steps))
        if not chosen or bad:
            raise ValueError(f"step indices {sorted(chosen)} must be non-empty and within 0..{(num_steps or 1) - 1}"
                             " (or pass a (start, stop) window of floats)")
        return chosen

    def _grid(self, N: int) -> tuple[int, int]:
        """Query grid (h, w) of a layer with N = h * w queries: (H/f, W/f) for the H x W image."""
        if N not in self._grids:
            try:
                self._grids[N] = query_grid(N, self._image_size)
            except ValueError as e:
                raise ValueError(f"{e}: give record() a layout with the image size the UNet is sampling") from None
        return self._grids[N]

    def _grid_to_record(self, N: int) -> tuple[int, int] | None:
        """The layer's grid if this call is to be recorded, else None (fast path)."""
        if self._step is None:
            raise RuntimeError("call recorder.set_step(i) before each UNet call inside recorder.record()")
        if not self._active:
            return None
        grid = self._grid(N)
        if self.resolutions is not None and grid not in self.resolutions and max(grid) not in self.resolutions:
            return None
        return grid

    # -- recording -------------------------------------------------------------------------------
    @contextmanager
    def record(self, unet: nn.Module, layout: BatchLayout) -> Iterator["AttentionRecorder"]:
        """Record the selected cross-attention modules of `unet` through their explicit processors
        (processors.attached), and always restore the original ones on exit. `layout` says which texts the UNet's rows hold (the branch's
        rows are kept), the image size and the number of steps."""
        # 1. check the request against the batch
        if self.branch == "uncond" and not layout.guided:
            raise ValueError("branch='uncond' needs classifier-free guidance (guidance_scale != 1): "
                             "without it there is no unconditional branch")
        self._reset()
        self._layout = layout
        self._image_size = tuple(int(s) for s in layout.image_size)
        self._step_set = self._select_steps(layout.num_inference_steps)

        # 2. pick the modules
        modules = cross_attention_modules(unet)
        if not modules:
            raise ValueError(f"{type(unet).__name__} has no cross-attention modules to record")
        chosen = {k: m for k, m in modules.items() if self._layer_re is None or self._layer_re.search(k)}
        if not chosen:
            raise ValueError(f"layers={self.layers!r} matches no cross-attention module; the names are: "
                             + ", ".join(modules))
        if self.heads is not None:
            fewest = min(m.heads for m in chosen.values())
            if self.heads[-1] >= fewest:
                raise ValueError(f"heads {self.heads} out of range: the selected layers have {fewest} heads")
        self._head_index = None

        # 3. attach to the modules' explicit processors (installed if need be), run, always restore
        try:
            with attached(unet, chosen, "recorder", self):
                yield self
        finally:
            self._fold_step()
            self._step, self._active = None, False

    def set_step(self, i: int) -> None:
        """Tell the recorder which sampling step (0-based) the next UNet calls belong to."""
        if self.timeline and self._step is not None and i != self._step:
            self._fold_step()
        self._step = int(i)
        self._active = self._step_set is None or self._step in self._step_set

    def _add(self, name: str, grid: tuple[int, int], p: torch.Tensor) -> None:
        """Add one layer's probabilities p (rows, heads, N, T) float32 to the running sums (detached, so
        memory does not grow with the steps when gradients are on)."""
        layout = self._layout
        if p.shape[0] != layout.rows:
            raise ValueError(f"the UNet ran {p.shape[0]} rows but record() was told {layout.rows} "
                             f"({layout.num_prompts} prompt(s) x {layout.images_per_prompt} image(s)"
                             f"{' x 2 for guidance' if layout.guided else ''})")
        p = p[layout.branch_rows(self.branch)].detach()                    # (B*n, heads, N, T), no graph kept
        if self.heads is not None:
            if self._head_index is None or self._head_index.device != p.device:
                self._head_index = torch.tensor(self.heads, device=p.device)
            p = p.index_select(1, self._head_index)
        acc = self._current.get(grid)
        if acc is None:
            self._current[grid] = [p.sum(1), p.shape[1]]                  # (B*n, N, T)
        else:
            acc[0].add_(p.sum(1))
            acc[1] += p.shape[1]
        self._layers_seen[name] = grid
        self._steps_seen.add(self._step)

    def _fold_step(self) -> None:
        """Timeline mode: move the current step's sums into the totals and keep a coarse map of each grid."""
        if not self.timeline or not self._current:
            return
        step, current = self._step, self._current
        coarse = min(current, key=lambda g: g[0] * g[1])
        slots = self._timeline.setdefault(step, {})
        for g, (s, c) in current.items():
            frame = F.adaptive_avg_pool2d(_to_image(s, g), coarse)
            if g in slots:
                slots[g][0].add_(frame)
                slots[g][1] += c
            else:
                slots[g] = [frame, c]
            if g in self._sums:
                self._sums[g][0].add_(s)
                self._sums[g][1] += c
            else:
                self._sums[g] = [s, c]
        self._current = {}

    @property
    def bytes_kept(self) -> int:
        """Bytes of the running sums (and timeline) held now."""
        held = [s for s, _ in self._sums.values()] + [s for slots in self._timeline.values() for s, _ in slots.values()]
        if self.timeline:
            held += [s for s, _ in self._current.values()]
        return sum(t.numel() * t.element_size() for t in held)

    # -- result ----------------------------------------------------------------------------------
    @property
    def grids(self) -> list[tuple[int, int]]:
        """The query grids (h, w) recorded so far, coarsest first."""
        return sorted(set(self._sums) | set(self._current), key=lambda g: g[0] * g[1])

    def heatmaps(self, resolutions: Iterable[int | tuple[int, int]] | None = None) -> Heatmaps:
        """Average the sums into Heatmaps: (images, tokens, h, w) at the finest grid kept. `resolutions`
        keeps only some of the recorded grids (ints: the grid's longer side, or (h, w)), None: all."""
        self._fold_step()
        if not self._sums:
            seen = sorted(set(self._grids.values()))
            raise ValueError("no cross-attention was recorded: check that record() wrapped the sampling loop, "
                             f"and that steps={self.steps!r} and resolutions={self.resolutions!r} select something"
                             + (f" (query grids seen: {seen})" if seen else ""))
        grids = self.grids
        if resolutions is not None:
            wanted = {tuple(r) if isinstance(r, (tuple, list)) else int(r) for r in resolutions}
            grids = [g for g in grids if g in wanted or max(g) in wanted]
            if not grids:
                raise ValueError(f"resolutions {sorted(wanted, key=str)} match none of the recorded grids {self.grids}")
        finest = grids[-1]
        total = sum(self._sums[g][1] for g in grids)
        maps = sum(_resize(_to_image(self._sums[g][0], g), finest) for g in grids) / total  # (rows, T, h, w)
        timeline = None
        if self.timeline and self._timeline:
            frames = [[slots[g] for g in grids if g in slots] for _, slots in sorted(self._timeline.items())]
            timeline = torch.stack([sum(s for s, _ in f) / sum(c for _, c in f) for f in frames])  # (S, rows, T, hc, wc)
        return self._to_heatmaps(maps, timeline, grids)

    def _to_heatmaps(self, maps: torch.Tensor, timeline: torch.Tensor | None, grids: list) -> Heatmaps:
        """Keep each image's real tokens, padded to the longest prompt."""
        layout = self._layout
        enc, texts, n = layout.encoding, layout.texts(self.branch), layout.images_per_prompt
        text_of_row = [texts[r // n] for r in range(len(texts) * n)]
        keep = enc.attention_mask.detach().bool().cpu()
        tokens = [list(enc.tokens[t]) for t in text_of_row]
        L = max(len(t) for t in tokens)
        out = maps.new_zeros((len(text_of_row), L) + maps.shape[2:])
        tl = None if timeline is None else timeline.new_zeros(timeline.shape[:2] + (L,) + timeline.shape[3:])
        for r, t in enumerate(text_of_row):
            idx = keep[t].nonzero().squeeze(1).to(maps.device)
            out[r, : len(idx)] = maps[r].index_select(0, idx)
            if tl is not None:
                tl[:, r, : len(idx)] = timeline[:, r].index_select(1, idx)
        return Heatmaps(maps=out.float().cpu(), tokens=tokens, prompts=[prompt_text(t) for t in tokens],
                        image_size=self._image_size, steps=sorted(self._steps_seen),
                        layers=[name for name, g in self._layers_seen.items() if g in grids],
                        num_inference_steps=layout.num_inference_steps, branch=self.branch, heads=self.heads,
                        prompt_index=[r // n for r in range(len(text_of_row))],
                        timeline=None if tl is None else tl.float().cpu())


def _to_image(s: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(rows, N, T) -> (rows, T, h, w)."""
    return s.transpose(1, 2).reshape(s.shape[0], s.shape[2], *grid)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False: convex weights, so per-pixel token distributions stay distributions)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
