# Records per-token cross-attention probabilities during sampling, the maps behind DAAM (Tang et al.
# 2023) and prompt-to-prompt (Hertz et al. 2022): softmax(q k^T / sqrt(d) + mask) of the selected
# cross-attention layers, reduced on the fly in float32 (summed over heads, layers and steps) so the
# memory kept does not grow with the number of steps. Works on t2i's T2IUNet and on diffusers'
# UNet2DConditionModel; hooks are keyed by module name and by the step index the sampler sets.
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..unet import Attention as T2IAttention
from ..unet import SDPAProcessor
from .heatmaps import Heatmaps, prompt_text

if TYPE_CHECKING:
    from ..pipeline import BatchLayout

BRANCHES = ("cond", "uncond")


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention, what F.scaled_dot_product_attention computes but with its probabilities.
    q (B, heads, N, d), k and v (B, heads, T, d), bias additive (or boolean keep-mask) broadcastable
    to (B, heads, N, T). Returns the output (B, heads, N, d) in v's dtype and p (B, heads, N, T) float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale                 # (B, heads, N, T)
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=logits.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
        logits = logits + bias
    p = logits.softmax(dim=-1, dtype=torch.float32)
    return torch.matmul(p.to(v.dtype), v), p


# ----------------------------------------------------------------------------------------------
# Processors. Each wraps one module's original processor and falls back to it (the fast SDPA path)
# whenever the current step or the layer's query grid is not recorded.


class T2IRecordingProcessor:
    """For t2i.unet.Attention: processor(attn, x (B, N, C), context (B, T, D), mask (B, 1, 1, T))."""

    def __init__(self, recorder: "AttentionRecorder", name: str, original):
        self.recorder, self.name, self.original = recorder, name, original

    def __call__(self, attn: T2IAttention, x: torch.Tensor, context: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.recorder._grid_to_record(x.shape[1])
        if grid is None:
            return self.original(attn, x, context, mask)
        q, k, v = attn.project(x, context)                                # (B, heads, N|T, d)
        o, p = attention_with_probs(q, k, v, mask, attn.scale)
        self.recorder._add(self.name, grid, p)
        return attn.merge(o)


class DiffusersRecordingProcessor:
    """For diffusers' Attention (attn2 of a UNet2DConditionModel), mirroring AttnProcessor2_0. The
    UNet hands `encoder_attention_mask` over as `attention_mask`, already an additive bias (B, 1, T)."""

    def __init__(self, recorder: "AttentionRecorder", name: str, original, scale: float | None):
        self.recorder, self.name, self.original, self.scale = recorder, name, original, scale

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        x = hidden_states
        spatial = x.ndim == 4
        N = x.shape[2] * x.shape[3] if spatial else x.shape[1]
        grid = self.recorder._grid_to_record(N) if encoder_hidden_states is not None else None
        if grid is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if spatial:
            B, C, H, W = x.shape
            x = x.view(B, C, H * W).transpose(1, 2)                           # (B, N, C)
        B, T = x.shape[0], encoder_hidden_states.shape[1]
        bias = None
        if attention_mask is not None:                                      # (B, 1, T) -> (B, heads, 1, T)
            bias = attn.prepare_attention_mask(attention_mask, T, B)
            bias = bias.view(B, attn.heads, -1, bias.shape[-1])
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))   # (B, heads, L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        o, p = attention_with_probs(q, k, v, bias, self.scale)
        self.recorder._add(self.name, grid, p)
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * d).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))                               # linear, dropout
        if spatial:
            o = o.transpose(-1, -2).reshape(B, C, H, W)
        return o


def _diffusers_attention_class():
    from diffusers.models.attention_processor import Attention
    return Attention


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{module name: cross-attention module} of a T2IUNet or a diffusers UNet2DConditionModel."""
    DiffusersAttention = _diffusers_attention_class()
    found = {}
    for name, m in unet.named_modules():
        if (isinstance(m, T2IAttention) and m.is_cross) or \
                (isinstance(m, DiffusersAttention) and getattr(m, "is_cross_attention", False)):
            found[name] = m
    return found


def _recording_processor(recorder: "AttentionRecorder", name: str, module: nn.Module):
    """The recording processor for one module, or a ValueError if its setup cannot be mirrored exactly."""
    original = module.processor
    if isinstance(original, (T2IRecordingProcessor, DiffusersRecordingProcessor)):
        raise ValueError(f"{name} is already being recorded: nest no AttentionRecorder.record() blocks")
    if isinstance(module, T2IAttention):
        if not isinstance(original, SDPAProcessor):
            raise ValueError(f"{name} uses a custom processor {type(original).__name__}; reset it with "
                             "unet.set_attn_processor(SDPAProcessor()) or leave it out with layers=...")
        return T2IRecordingProcessor(recorder, name, original)
    kind = type(original).__name__
    if kind not in ("AttnProcessor2_0", "AttnProcessor"):
        raise ValueError(f"{name} uses {kind}, which the recorder cannot mirror; call "
                         "unet.set_default_attn_processor() first or leave it out with layers=...")
    unsupported = [opt for opt, on in [
        ("spatial_norm", module.spatial_norm is not None), ("group_norm", module.group_norm is not None),
        ("residual_connection", module.residual_connection), ("rescale_output_factor", module.rescale_output_factor != 1),
        ("added_kv_proj_dim", getattr(module, "add_k_proj", None) is not None)] if on]
    if unsupported:
        raise ValueError(f"{name} uses {', '.join(unsupported)}, which the recorder does not support; "
                         "leave it out with layers=...")
    # AttnProcessor2_0 lets SDPA use 1/sqrt(d); AttnProcessor uses attn.scale
    return DiffusersRecordingProcessor(recorder, name, original, module.scale if kind == "AttnProcessor" else None)


def _install(unet: nn.Module, processors: dict[str, object]) -> None:
    """Set {module name: processor} through the UNet's own `set_attn_processor` where it has one (t2i's
    is keyed by module name; diffusers' by '<module name>.processor' and wants every layer's), else on
    each module."""
    if hasattr(unet, "set_attn_processor"):
        current = dict(unet.attn_processors)
        suffix = "" if all(name in current for name in processors) else ".processor"
        unet.set_attn_processor({**current, **{name + suffix: p for name, p in processors.items()}})
        return
    for name, processor in processors.items():
        module = unet.get_submodule(name)
        if hasattr(module, "set_processor"):
            module.set_processor(processor)  # diffusers: keeps its _modules bookkeeping right
        else:
            module.processor = processor


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
    where `layout` is the t2i.pipeline.BatchLayout of the UNet's batch (pipe(..., record_attention=rec)
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
        self._timeline: dict[int, list] = {}              # step -> [coarse sum (rows, T, hc, wc), count]
        self._step: int | None = None
        self._step_set: set[int] | None = None            # steps to record, None = all
        self._active = False
        self._grids: dict[int, tuple[int, int]] = {}
        self._layers_seen: dict[str, None] = {}
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
            H, W = self._image_size
            f = max(1, round(math.sqrt(H * W / N)))
            h, w = -(-H // f), -(-W // f)
            if h * w != N:
                raise ValueError(f"cannot lay {N} queries on a grid for a {H}x{W} image: give record() a layout "
                                 "with the image size the UNet is sampling")
            self._grids[N] = (h, w)
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
        """Install recording processors on the selected cross-attention modules of `unet`, and always
        restore the original ones on exit. `layout` says which texts the UNet's rows hold (the branch's
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
        processors = {k: _recording_processor(self, k, m) for k, m in chosen.items()}

        # 3. install, run, always restore
        originals = {k: m.processor for k, m in chosen.items()}
        try:
            _install(unet, processors)
            yield self
        finally:
            _install(unet, originals)
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
        self._layers_seen[name] = None
        self._steps_seen.add(self._step)

    def _fold_step(self) -> None:
        """Timeline mode: move the current step's sums into the totals and keep a coarse map of it."""
        if not self.timeline or not self._current:
            return
        step, current = self._step, self._current
        coarse = min(current, key=lambda g: g[0] * g[1])
        frame = sum(F.adaptive_avg_pool2d(_to_image(s, g), coarse) for g, (s, _) in current.items())
        count = sum(c for _, c in current.values())
        slot = self._timeline.setdefault(step, [torch.zeros_like(frame), 0])
        slot[0].add_(frame)
        slot[1] += count
        for g, (s, c) in current.items():
            if g in self._sums:
                self._sums[g][0].add_(s)
                self._sums[g][1] += c
            else:
                self._sums[g] = [s, c]
        self._current = {}

    @property
    def bytes_kept(self) -> int:
        """Bytes of the running sums (and timeline) held now."""
        held = [s for s, _ in self._sums.values()] + [s for s, _ in self._timeline.values()]
        if self.timeline:
            held += [s for s, _ in self._current.values()]
        return sum(t.numel() * t.element_size() for t in held)

    # -- result ----------------------------------------------------------------------------------
    def heatmaps(self) -> Heatmaps:
        """Average the sums into Heatmaps: (images, tokens, h, w) at the finest recorded grid."""
        self._fold_step()
        if not self._sums:
            seen = sorted(set(self._grids.values()))
            raise ValueError("no cross-attention was recorded: check that record() wrapped the sampling loop, "
                             f"and that steps={self.steps!r} and resolutions={self.resolutions!r} select something"
                             + (f" (query grids seen: {seen})" if seen else ""))
        grids = sorted(self._sums, key=lambda g: g[0] * g[1])
        finest = grids[-1]
        total = sum(c for _, c in self._sums.values())
        maps = sum(_resize(_to_image(s, g), finest) for g, (s, _) in self._sums.items()) / total  # (rows, T, h, w)
        timeline = None
        if self.timeline and self._timeline:
            timeline = torch.stack([s / c for _, (s, c) in sorted(self._timeline.items())])      # (S, rows, T, hc, wc)
        return self._to_heatmaps(maps, timeline)

    def _to_heatmaps(self, maps: torch.Tensor, timeline: torch.Tensor | None) -> Heatmaps:
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
                        image_size=self._image_size, layers=list(self._layers_seen), steps=sorted(self._steps_seen),
                        num_inference_steps=layout.num_inference_steps, branch=self.branch, heads=self.heads,
                        prompt_index=[r // n for r in range(len(text_of_row))],
                        timeline=None if tl is None else tl.float().cpu())


def _to_image(s: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(rows, N, T) -> (rows, T, h, w)."""
    return s.transpose(1, 2).reshape(s.shape[0], s.shape[2], *grid)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False: convex weights, so per-pixel token distributions stay distributions)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
