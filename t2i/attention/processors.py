"""Explicit cross-attention: softmax(q k^T / sqrt(d) + mask) computed in the open, so that it can be read
(the recorder sums it into heatmaps, beside the module's own attention, whose output it leaves untouched;
training captures it, with its graph, for the grounding loss) and
edited (word weights scale a token's column: prompt-to-prompt's reweighting, Hertz et al. 2022, sec. 3.2).
One processor per module holds all roles, so a recorder and a reweighting can be on the same module at
once, in either order, and neither undoes the other. The processors are swapped in by module name through
the UNet's own `set_attn_processor`, for t2i's T2IUNet and diffusers' UNet2DConditionModel, and each falls
back to the module's original (fused SDPA) processor whenever it has nothing to read or edit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from ..unet import Attention as T2IAttention
from ..unet import SDPAProcessor

ROLES = ("recorder", "weights", "capture")


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                         scale: float | None = None, weights: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention, what F.scaled_dot_product_attention computes but with its probabilities.
    q (B, heads, N, d), k and v (B, heads, T, d), bias additive (or boolean keep-mask) broadcastable
    to (B, heads, N, T). `weights` (B, T), if given, multiply each row's probabilities token by token
    after the softmax, without renormalising (prompt-to-prompt's reweighting); a token of weight 0 is left out
    of the softmax too, so that nothing of it (not even its share of the sum) reaches the output. Returns the output
    (B, heads, N, d) in v's dtype and the probabilities used, p (B, heads, N, T) float32."""
    if weights is not None:
        if weights.shape != (q.shape[0], k.shape[-2]):
            raise ValueError(f"word weights are {tuple(weights.shape)} but the attention has {q.shape[0]} rows "
                             f"and {k.shape[-2]} tokens")
        weights = weights.to(q.device, torch.float32)[:, None, None, :]
    p = attention_probs(q, k, bias, scale, shut=None if weights is None else weights == 0)  # 0: out of the sum too
    if weights is not None:
        p = p * weights
    return torch.matmul(p.to(v.dtype), v), p


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None,
                    scale: float | None = None, shut: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) in float32, p (B, heads, N, T); shapes as in attention_with_probs.
    `shut` (bool, broadcastable to p): keys left out of the softmax (their probability 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale                 # (B, heads, N, T)
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=logits.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
        logits = logits + bias
    if shut is not None:
        logits = logits.masked_fill(shut, float("-inf"))
    return logits.softmax(dim=-1, dtype=torch.float32)


class _Explicit:
    """The roles of an explicit processor: a recorder reading p, word weights (rows, T) editing it, and a
    capture list taking each forward's head-averaged p (B, N, T) with its autograd graph."""

    def __init__(self, name: str, original):
        self.name, self.original = name, original
        self.recorder = None                  # an AttentionRecorder: `_grid_to_record(N)` and `_add(name, grid, p)`
        self.weights: torch.Tensor | None = None
        self.capture: list[torch.Tensor] | None = None
        self.quiet = False                    # recorder and weights paused (guidance's own passes), see `suspended`

    def _plan(self, N: int):
        """(whether to attend explicitly, grid to record or None); False: nothing to read or edit, run the original."""
        grid = self.recorder._grid_to_record(N) if self.recorder is not None and not self.quiet else None
        weights = self.weights is not None and not self.quiet
        return grid is not None or weights or self.capture is not None, grid

    def _reads_only(self, grid) -> bool:
        """Only a recorder reads this forward: the output stays the original processor's, bit for bit."""
        return grid is not None and self.capture is None and (self.weights is None or self.quiet)

    def _attend(self, grid, q, k, v, bias, scale):
        o, p = attention_with_probs(q, k, v, bias, scale, None if self.quiet else self.weights)
        if grid is not None:
            self.recorder._add(self.name, grid, p)
        if self.capture is not None:
            self.capture.append(p.mean(dim=1))
        return o


class T2IExplicitProcessor(_Explicit):
    """For t2i.unet.Attention: processor(attn, x (B, N, C), context (B, T, D), mask (B, 1, 1, T))."""

    def __call__(self, attn: T2IAttention, x: torch.Tensor, context: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        explicit, grid = self._plan(x.shape[1])
        if not explicit:
            return self.original(attn, x, context, mask)
        q, k, v = attn.project(x, context)                                # (B, heads, N|T, d)
        if self._reads_only(grid):
            self.recorder._add(self.name, grid, attention_probs(q, k, mask, attn.scale))
            return self.original(attn, x, context, mask)
        return attn.merge(self._attend(grid, q, k, v, mask, attn.scale))


class DiffusersExplicitProcessor(_Explicit):
    """For diffusers' Attention (attn2 of a UNet2DConditionModel), mirroring AttnProcessor2_0. The
    UNet hands `encoder_attention_mask` over as `attention_mask`, already an additive bias (B, 1, T)."""

    def __init__(self, name: str, original, scale: float | None):
        super().__init__(name, original)
        self.scale = scale

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        x = hidden_states
        spatial = x.ndim == 4
        N = x.shape[2] * x.shape[3] if spatial else x.shape[1]
        explicit, grid = self._plan(N) if encoder_hidden_states is not None else (False, None)
        if not explicit:
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
        if self._reads_only(grid):
            self.recorder._add(self.name, grid, attention_probs(q, k, bias, self.scale))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        o = self._attend(grid, q, k, v, bias, self.scale)
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * d).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))                               # linear, dropout
        if spatial:
            o = o.transpose(-1, -2).reshape(B, C, H, W)
        return o


EXPLICIT = (T2IExplicitProcessor, DiffusersExplicitProcessor)


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{module name: cross-attention module} of a T2IUNet or a diffusers UNet2DConditionModel."""
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    found = {}
    for name, m in unet.named_modules():
        if (isinstance(m, T2IAttention) and m.is_cross) or \
                (isinstance(m, DiffusersAttention) and getattr(m, "is_cross_attention", False)):
            found[name] = m
    return found


def explicit_processor(name: str, module: nn.Module) -> _Explicit:
    """The explicit processor for one module, or a ValueError if its setup cannot be mirrored exactly."""
    original = module.processor
    if isinstance(module, T2IAttention):
        if not isinstance(original, SDPAProcessor):
            raise ValueError(f"{name} uses a custom processor {type(original).__name__}; reset it with "
                             "unet.set_attn_processor(SDPAProcessor()) or leave it out with layers=...")
        return T2IExplicitProcessor(name, original)
    kind = type(original).__name__
    if kind not in ("AttnProcessor2_0", "AttnProcessor"):
        raise ValueError(f"{name} uses {kind}, which t2i's attention processors cannot mirror; call "
                         "unet.set_default_attn_processor() first or leave it out with layers=...")
    unsupported = [opt for opt, on in [
        ("spatial_norm", module.spatial_norm is not None), ("group_norm", module.group_norm is not None),
        ("residual_connection", module.residual_connection), ("rescale_output_factor", module.rescale_output_factor != 1),
        ("added_kv_proj_dim", getattr(module, "add_k_proj", None) is not None)] if on]
    if unsupported:
        raise ValueError(f"{name} uses {', '.join(unsupported)}, which t2i's attention processors do not "
                         "support; leave it out with layers=...")
    # AttnProcessor2_0 lets SDPA use 1/sqrt(d); AttnProcessor uses attn.scale
    return DiffusersExplicitProcessor(name, original, module.scale if kind == "AttnProcessor" else None)


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


@contextmanager
def attached(unet: nn.Module, names: Iterable[str], role: str, value) -> Iterator[dict[str, _Explicit]]:
    """Give the named cross-attention modules' explicit processors `role` ('recorder', 'weights', 'capture') =
    `value`, installing one over a module's own processor where it has none yet. On exit the role is
    cleared, and a module whose processor has no role left gets its original processor back."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    modules = cross_attention_modules(unet)
    current = {name: modules[name].processor for name in names}
    busy = [name for name, p in current.items() if isinstance(p, EXPLICIT) and getattr(p, role) is not None]
    if busy:
        raise ValueError(f"{busy[0]} already has a {role}: nest no two AttentionRecorder.record() blocks "
                         "(or two word reweightings) on one UNet")
    new = {name: explicit_processor(name, modules[name]) for name, p in current.items() if not isinstance(p, EXPLICIT)}
    processors = {**{name: p for name, p in current.items() if isinstance(p, EXPLICIT)}, **new}
    for p in processors.values():
        setattr(p, role, value)
    try:
        if new:
            _install(unet, new)
        yield processors
    finally:
        for p in processors.values():
            setattr(p, role, None)
        idle = {name: p.original for name, p in processors.items() if all(getattr(p, r) is None for r in ROLES)}
        if idle:
            _install(unet, idle)


@contextmanager
def suspended(unet: nn.Module) -> Iterator[None]:
    """Within the block, the explicit processors installed on `unet` neither record nor reweight (their
    roles stay set, so nothing is uninstalled): for passes that are not part of the image's denoising."""
    processors = [m.processor for m in cross_attention_modules(unet).values() if isinstance(m.processor, EXPLICIT)]
    refiner = getattr(unet, "context_refiner", None)
    refiner_weights = getattr(refiner, "key_weights", None)
    for p in processors:
        p.quiet = True
    if refiner_weights is not None:
        refiner.key_weights = None
    try:
        yield
    finally:
        for p in processors:
            p.quiet = False
        if refiner_weights is not None:
            refiner.key_weights = refiner_weights
