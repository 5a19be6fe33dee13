"""A small text-conditioned UNet (Ho et al. 2020; Rombach et al. 2022, sec. 3.3) with
cross-attention from image features (queries) to per-token text states (keys, values).
It knows nothing of noise schedules or tokenisation: (x_t, t, text states) -> prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

PRESETS: dict[str, dict] = {
    # tests: < 0.5M parameters
    "tiny": dict(sample_size=16, block_channels=(16, 32), layers_per_block=1,
                 attention_levels=(False, True), num_heads=2, cross_attention_dim=32, norm_groups=8),
    # 32x32, trainable on a laptop CPU (~1.7M parameters)
    "small": dict(sample_size=32, block_channels=(32, 64, 64), layers_per_block=1,
                  attention_levels=(False, True, True), num_heads=4, cross_attention_dim=128, norm_groups=8),
    # 64x64, for a GPU
    "base": dict(sample_size=64, block_channels=(64, 128, 256, 256), layers_per_block=2,
                 attention_levels=(False, False, True, True), num_heads=8, cross_attention_dim=256,
                 norm_groups=32),
}


@dataclass
class UNetOutput(BaseOutput):
    sample: torch.Tensor  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------
# Attention. Every attention layer delegates its core to a swappable `processor`, the seam that
# the attention recorder uses (keyed by module name, like diffusers' `set_attn_processor`).


class SDPAProcessor:
    """Default processor: fused scaled dot-product attention, probabilities never materialised."""

    def __call__(self, attn: "Attention", x: torch.Tensor, context: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = attn.project(x, context)                       # (B, heads, N, d), (B, heads, T, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.merge(o)


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `context_dim` is None, else cross-attention
    with queries from `x` (B, N, C) and keys/values from `context` (B, T, context_dim).
    `mask` is an additive bias broadcastable to (B, heads, N, T), or None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={heads}")
        self.heads, self.is_cross = heads, context_dim is not None
        self.scale = (dim // heads) ** -0.5
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.processor: Callable = SDPAProcessor()

    def _heads(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        B, L, _ = t.shape                                        # (B, L, n * C) -> n x (B, heads, L, d)
        return t.view(B, L, n, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Queries, keys and values, each (B, heads, length, head_dim)."""
        if not self.is_cross:
            return self._heads(self.to_qkv(x), 3)
        (q,) = self._heads(self.to_q(x), 1)
        k, v = self._heads(self.to_kv(context), 2)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> (B, N, C), through the output projection."""
        B, _, N, _ = o.shape
        return self.to_out(o.transpose(1, 2).reshape(B, N, -1))

    def forward(self, x, context=None, mask=None):
        return self.processor(self, x, context, mask)


def sincos_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position features (Vaswani et al. 2017, per axis as in MAE), (height * width, dim).
    Coordinates are fractions of the image side, so a grid cell means the same place at every resolution."""
    quarter = dim // 4
    freqs = 2.0 ** torch.arange(quarter, device=device, dtype=torch.float32) * math.pi   # 1/2 .. cycles per side
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")                                           # (H, W) each
    args = torch.cat([y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs], dim=1)        # (HW, dim / 2)
    feats = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(feats, (0, dim - feats.shape[1]))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 in [-> + learned projection of 2D sin-cos positions] -> [self-attn, cross-attn, MLP]
    on HW tokens -> 1x1 out (zero init) -> + x. The position term (zero init) lets cross-attention queries
    know where they are, so "top left" can be matched to a place (issue #8's ablation in docs/results.md)."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, ff_mult: int = 4,
                 pos_embed: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.pos_proj = nn.Linear(ch, ch) if pos_embed else None
        if self.pos_proj is not None:
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.norm1, self.self_attn = nn.LayerNorm(ch), Attention(ch, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(ch), Attention(ch, heads, context_dim)
        self.norm3 = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, ff_mult * ch), nn.GELU(approximate="tanh"), nn.Linear(ff_mult * ch, ch))
        self.proj_out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)      # (B, HW, C)
        if self.pos_proj is not None:
            h = h + self.pos_proj(sincos_2d(H, W, C, x.device).to(h.dtype))
        h = h + self.self_attn(self.norm1(h))
        h = h + self.cross_attn(self.norm2(h), context, mask)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class ContextRefiner(nn.Module):
    """Bidirectional pre-norm transformer layers over the text states, applied once per forward. CLIP's
    text transformer is causal, so a noun's state cannot see the position words after it; these layers
    let every token see the whole prompt (padding masked) before cross-attention reads it."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(layers))

        self.key_weights: torch.Tensor | None = None  # (B, T) word weights (t2i.attention.effects), or None

    def forward(self, ctx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        pad = None if keep is None else ~keep.to(torch.bool)                  # (B, T), True where padding
        if self.key_weights is not None and self.key_weights.shape == ctx.shape[:2]:
            # reweighted words: log-weights added to every query's logits for their keys (0 takes a word out)
            pad = self.key_weights.to(ctx.device, torch.float32).log()
            if keep is not None:
                pad = pad.masked_fill(~keep.to(torch.bool), float("-inf"))
            pad = pad.to(ctx.dtype)
        for layer in self.layers:
            ctx = layer(ctx, src_key_padding_mask=pad)
        return ctx


class ResBlock(nn.Module):
    """Pre-activation residual block with an additive timestep embedding."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Level(nn.Module):
    """The resnets (and transformers) of one resolution, plus the resampler leaving it."""

    def __init__(self, resnets: list[ResBlock], transformers: list[SpatialTransformer] | None,
                 resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.transformers = nn.ModuleList(transformers) if transformers else None
        self.resample = resample


class Downsample(nn.Conv2d):
    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class T2IUNet(ModelMixin, ConfigMixin):
    """UNet eps/v-predictor conditioned on per-token text states.

    forward(sample (B, C, H, W), timestep (B,) or scalar, encoder_hidden_states (B, T, D),
    encoder_attention_mask (B, T) with 1 for real tokens) -> (B, C, H, W).
    H and W may be any multiple of `downsample_factor`, not only `sample_size`.
    """

    _supports_gradient_checkpointing = True  # enable_gradient_checkpointing(): blocks recompute in backward

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3,
                 block_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention_levels: tuple[bool, ...] = (False, True, True), num_heads: int = 4,
                 cross_attention_dim: int = 128, norm_groups: int = 8, ff_mult: int = 4, dropout: float = 0.0,
                 pos_embed: bool = False, context_layers: int = 0):
        super().__init__()
        self.gradient_checkpointing = False  # diffusers' switch, set by enable_gradient_checkpointing()
        chs = list(block_channels)
        if len(attention_levels) != len(chs):
            raise ValueError(f"attention_levels has {len(attention_levels)} entries but block_channels has "
                             f"{len(chs)}: give one True/False per level")
        if any(c % norm_groups for c in chs):
            raise ValueError(f"every block channel {chs} must be divisible by norm_groups={norm_groups}")
        temb_dim = 4 * chs[0]
        self.time_mlp = nn.Sequential(nn.Linear(chs[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)

        def res(cin, cout):
            return ResBlock(cin, cout, temb_dim, norm_groups, dropout)

        def tfm(ch):
            return SpatialTransformer(ch, num_heads, cross_attention_dim, norm_groups, ff_mult, pos_embed)

        self.context_refiner = ContextRefiner(cross_attention_dim, context_layers, num_heads) if context_layers else None

        # 1. down path; remember the channels of every skip connection
        skips, ch, self.down = [chs[0]], chs[0], nn.ModuleList()
        for i, (cout, attn) in enumerate(zip(chs, attention_levels)):
            resnets, transformers = [], []
            for _ in range(layers_per_block):
                resnets.append(res(ch, cout))
                if attn:
                    transformers.append(tfm(cout))
                ch = cout
                skips.append(ch)
            last = i == len(chs) - 1
            self.down.append(Level(resnets, transformers, None if last else Downsample(ch)))
            if not last:
                skips.append(ch)

        # 2. middle
        self.mid = Level([res(ch, ch), res(ch, ch)], [tfm(ch)], None)

        # 3. up path, consuming the skips in reverse
        self.up = nn.ModuleList()
        for i, (cout, attn) in reversed(list(enumerate(zip(chs, attention_levels)))):
            resnets, transformers = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(res(ch + skips.pop(), cout))
                if attn:
                    transformers.append(tfm(cout))
                ch = cout
            self.up.append(Level(resnets, transformers, Upsample(ch) if i > 0 else None))

        self.norm_out = nn.GroupNorm(norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_channels) - 1)

    # -- the processor seam, keyed by module name ---------------------------------------------
    @property
    def attn_processors(self) -> dict[str, Callable]:
        """Processor of every attention module, by module name (e.g. 'down.1.transformers.0.cross_attn')."""
        return {name: m.processor for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor: Callable | dict[str, Callable]) -> None:
        """Set one processor everywhere, or a dict {module name: processor} for some modules."""
        modules = {name: m for name, m in self.named_modules() if isinstance(m, Attention)}
        if not isinstance(processor, dict):
            processor = dict.fromkeys(modules, processor)
        unknown = sorted(set(processor) - set(modules))
        if unknown:
            raise ValueError(f"no attention module named {unknown[:3]}; see `unet.attn_processors` for names")
        for name, proc in processor.items():
            modules[name].processor = proc

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        B, _, H, W = sample.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"height and width must be multiples of {f} for this UNet, got {H}x{W}")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(B) if t.ndim == 0 else t
        temb = self.time_mlp(timestep_embedding(t, self.config.block_channels[0]).to(sample.dtype))
        ctx = encoder_hidden_states.to(sample.dtype)
        if self.context_refiner is not None:
            ctx = self.context_refiner(ctx, encoder_attention_mask)
        bias = None
        if encoder_attention_mask is not None:                   # (B, T) keep-mask -> (B, 1, 1, T) additive bias
            keep = encoder_attention_mask.to(torch.bool)[:, None, None, :]
            bias = torch.zeros(keep.shape, dtype=sample.dtype, device=sample.device).masked_fill(~keep, float("-inf"))

        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        block = self._gradient_checkpointing_func if checkpointed else (lambda module, *args: module(*args))

        # 1. down path, keeping every intermediate for the skip connections
        h = self.conv_in(sample)
        hs = [h]
        for level in self.down:
            for j, resnet in enumerate(level.resnets):
                h = block(resnet, h, temb)
                if level.transformers:
                    h = block(level.transformers[j], h, ctx, bias)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)
        # 2. middle: resnet -> transformer -> resnet
        h = block(self.mid.resnets[0], h, temb)
        h = block(self.mid.transformers[0], h, ctx, bias)
        h = block(self.mid.resnets[1], h, temb)
        # 3. up path, concatenating skips in reverse
        for level in self.up:
            for j, resnet in enumerate(level.resnets):
                h = block(resnet, torch.cat([h, hs.pop()], dim=1), temb)
                if level.transformers:
                    h = block(level.transformers[j], h, ctx, bias)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return UNetOutput(sample=out) if return_dict else (out,)


def unet_config(preset: str = "small", **overrides) -> dict:
    """T2IUNet's keyword arguments: a named preset ('tiny', 'small', 'base') updated with the overrides that
    are not None (a run config's model section leaves unset fields None). The one place presets are merged."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r} (model.preset); choose one of {sorted(PRESETS)}")
    for key in ("unet", "vae"):  # model.unet and model.vae choose the class and the image space, not the shape
        overrides.pop(key, None)
    kwargs = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    levels = len(kwargs["block_channels"])
    if kwargs["sample_size"] % 2 ** (levels - 1):
        raise ValueError(f"data.size={kwargs['sample_size']} must be a multiple of {2 ** (levels - 1)}: the UNet "
                         f"({levels} levels) halves the image {levels - 1} times")
    chs, heads = kwargs["block_channels"], kwargs["num_heads"]
    widths = sorted({c for c, attn in zip(chs, kwargs["attention_levels"]) if attn} | {chs[-1]})  # and the middle
    if heads < 1 or any(w % heads for w in widths):
        raise ValueError(f"model.num_heads={heads} must divide every attention width ({', '.join(map(str, widths))}): "
                         f"choose a common divisor, e.g. model.num_heads={max(d for d in range(1, 9) if math.gcd(*widths) % d == 0)}")
    return kwargs


def build_unet(preset: str = "small", **overrides) -> T2IUNet:
    """A T2IUNet from a named preset with keyword overrides, e.g. build_unet(**asdict(run_config.model),
    sample_size=32, cross_attention_dim=128)."""
    return T2IUNet(**unet_config(preset, **overrides))


def build_diffusers_unet(preset: str = "small", **overrides):
    """model.unet=diffusers: a diffusers UNet2DConditionModel of a t2i preset's size (levels, widths, attention
    levels, heads, norm groups), so that a model trained from scratch is a plain diffusers UNet. Cross-attention
    follows the preset's attention levels; diffusers' middle block always attends. T2IUNet's own additions
    (model.pos_embed, model.context_layers) have no diffusers counterpart and are refused."""
    from diffusers import UNet2DConditionModel
    given = [k for k in ("pos_embed", "context_layers") if overrides.get(k)]
    if given:
        raise ValueError(f"model.{given[0]} is T2IUNet's; a diffusers UNet2DConditionModel has none: leave it unset "
                         "with model.unet=diffusers, or use model.unet=t2i")
    kw = unet_config(preset, **overrides)
    levels = kw["attention_levels"]
    return UNet2DConditionModel(
        sample_size=kw["sample_size"], in_channels=kw.get("in_channels", 3), out_channels=kw.get("out_channels", 3),
        block_out_channels=tuple(kw["block_channels"]), layers_per_block=kw["layers_per_block"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        cross_attention_dim=kw["cross_attention_dim"], norm_num_groups=kw["norm_groups"],
        attention_head_dim=kw["num_heads"],  # diffusers' name for the number of heads (its naming issue)
        dropout=kw.get("dropout") or 0.0)
