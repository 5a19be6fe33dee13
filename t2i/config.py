"""Run configuration: one frozen dataclass per component, nested into RunConfig; YAML files in
configs/ with `key=value` overrides on top; unknown keys are errors that suggest the right one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.wording import DEFAULT_HOLDOUT, check_holdout


@dataclass(frozen=True)
class DataConfig:
    kind: str = "shapes"                 # "shapes" (procedural), "folder" (a user's images) or "shards"
    root: str | None = None              # the image folder (kind=folder) or the shard folder (kind=shards)
    size: int = 32                       # training resolution (square)
    crop: str = "center"                 # "center" or "random"
    flip: bool = False                   # horizontal flips (warns when captions say left/right)
    caption_column: str = "text"
    num_workers: int = 0
    latent_cache: str = "beside"         # with a VAE (model.vae, or a Stable Diffusion train.init_from): "beside" the
                                         # data (.t2i-latents/), a folder of its own, or "off" (encode every step)
    # shapes world
    min_objects: int = 1
    max_objects: int = 2                 # the recipe's (configs/shapes32.yaml); the world holds up to 3
    holdout_pairs: tuple[str, ...] = ()      # "colour shape" never shown together in training
    holdout_positions: tuple[str, ...] = ()  # "shape@position" never shown together in training
    position_prob: float = 0.5               # share of captions that state positions or a relation
    wording: str = "templates"               # "templates" or "grammar": the same scenes in many wordings
    holdout_wording: tuple[str, ...] = DEFAULT_HOLDOUT  # grammar elements training never draws; `t2i evaluate`'s
                                                        # unseen-wording split is built from them
    grammar_share: float = 1.0               # wording=grammar: share of captions in a drawn wording (rest: templates)
    word_dropout: float = 0.0                # wording=grammar: chance that each function word ("a", "is", ...) is left out
    seed: int = 0

    def __post_init__(self):
        if self.latent_cache in ("no", "false"):  # YAML 1.1 reads `off` as false, which a str key receives as "no"
            object.__setattr__(self, "latent_cache", "off")


@dataclass(frozen=True)
class ModelConfig:
    unet: str = "t2i"                    # "t2i" (T2IUNet) or "diffusers" (a UNet2DConditionModel of the same preset)
    preset: str = "small"                # a t2i.unet preset; fields below override it when set (unet.build_unet)
    vae: str | None = None               # a VAE folder or hub name (AutoencoderKL, AutoencoderTiny), frozen: the UNet
                                         # denoises its latents; data.size stays the image side in pixels
    block_channels: tuple[int, ...] | None = None
    layers_per_block: int | None = None
    attention_levels: tuple[bool, ...] | None = None
    num_heads: int | None = None
    norm_groups: int | None = None
    dropout: float | None = None
    pos_embed: bool | None = None            # 2D sin-cos positions (learned projection) in every attention block
    context_layers: int | None = None        # bidirectional transformer layers over the text states in the UNet


@dataclass(frozen=True)
class TextConfig:
    pretrained: str | None = None        # hub name or local path of a CLIP; None builds the offline one
    train: bool | None = None            # default: True for the offline encoder, False for a pretrained one
    allow_random_frozen: bool = False    # train=false without `pretrained` freezes random weights: an ablation only
    width: int = 128                     # offline encoder only
    layers: int = 2
    heads: int = 4
    max_length: int = 24                 # tokens including start and end
    grow: bool = False                   # train.init_from: learn the tokenizer from this run's captions and grow the
                                         # start's encoder to it and to max_length (shared tokens keep their rows)

    @property
    def trainable(self) -> bool:
        return self.pretrained is None if self.train is None else self.train


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # the noise schedules diffusers offers


@dataclass(frozen=True)
class NoiseConfig:
    prediction_type: str = "epsilon"     # "epsilon" or "v_prediction"; the noise scheduler carries it from here
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    min_snr_gamma: float | None = 5.0    # min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    snr_shift: float = 1.0               # SNR(t) / snr_shift**2 (simple diffusion's shift): > 1 moves every step
                                         # toward noise; exported as the scheduler's trained_betas
    timestep_bias: float = 1.0           # t = T * u**(1/bias), u ~ U(0, 1): 1 uniform, > 1 favours high noise (layout)
    uniform_share: float = 0.0           # mixture: this share of timesteps uniform, the rest biased
    bias_steps: int | None = None        # curriculum: the bias holds for this many training steps, then eases to
    bias_ramp: int = 0                   # uniform over bias_ramp steps; None: biased for the whole run


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/shapes32"
    max_steps: int = 2000
    batch_size: int = 32                 # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    mixed_precision: str | None = None   # "no", "bf16", "fp16"; None (unset): accelerate's own setting
                                         # (`accelerate config`, `accelerate launch --mixed_precision`), else "no"
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward: less memory, more time
    report_to: str = "tensorboard"       # "tensorboard", "wandb" (needs `pip install wandb`) or "none"
    channels_last: bool = True           # 1.13x training img/s on CPU (bench/train.py)
    ema_decay: float = 0.999
    caption_dropout: float = 0.1         # share of captions replaced by "" so the model learns the unconditional
                                         # prediction that classifier-free guidance needs
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    preview_every: int = 500
    preview_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle in the top left")
    preview_steps: int = 20
    position_every: int = 500            # shapes world: log the position curve (t2i/probe.py) every N steps; 0: off
    export_dtype: str = "float32"        # "float32" or "float16" for the exported pipeline
    grounding_weight: float = 0.0        # token-grounding loss (TokenCompose-style): object words' maps -> masks
    init_from: str | None = None         # start from a pipeline folder's UNet, tokenizer and text encoder
                                         # ("default": the shipped model) instead of random weights


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        checks = [
            (self.data.kind in ("shapes", "folder", "shards"), "data.kind must be 'shapes', 'folder' or 'shards'"),
            (self.data.kind != "folder" or self.data.root, "data.kind=folder needs data.root=PATH/TO/IMAGES"),
            (self.data.kind != "shards" or self.data.root, "data.kind=shards needs data.root=PATH/TO/SHARDS"),
            (self.data.kind != "shards" or self.train.grounding_weight == 0,
             "train.grounding_weight needs per-word masks, which only image folders carry: use data.kind=folder"),
            (self.data.crop in ("center", "random"), "data.crop must be 'center' or 'random'"),
            (self.model.unet in ("t2i", "diffusers"), "model.unet must be 't2i' (T2IUNet) or 'diffusers' "
             "(a UNet2DConditionModel)"),
            (bool(self.data.latent_cache), "data.latent_cache must be 'beside', 'off' or a folder"),
            (not (self.model.vae and self.data.kind == "shapes" and self.data.latent_cache not in ("beside", "off")),
             "data.latent_cache caches an image folder's or shards' latents; the shapes world draws new images "
             "every step: leave data.latent_cache unset, or write the world as a folder (t2i make-dataset shapes)"),
            (self.noise.prediction_type in ("epsilon", "v_prediction"),
             "noise.prediction_type must be 'epsilon' or 'v_prediction'"),
            (0 <= self.train.caption_dropout < 1, "train.caption_dropout must be in [0, 1)"),
            (self.train.mixed_precision in (None, "no", "bf16", "fp16"),
             "train.mixed_precision must be no, bf16 or fp16 (or null: accelerate's setting)"),
            (not (self.train.gradient_checkpointing and self.train.grounding_weight > 0),
             "train.gradient_checkpointing recomputes the attention that grounding captures: use one of them"),
            (not (self.train.init_from and self.text.pretrained),
             "train.init_from brings its own tokenizer and text encoder: leave text.pretrained unset"),
            (self.train.report_to in ("tensorboard", "wandb", "none"), "train.report_to must be tensorboard, wandb or none"),
            (self.train.export_dtype in ("float32", "float16"), "train.export_dtype must be float32 or float16"),
            (self.train.batch_size > 0 and self.train.grad_accum > 0, "train.batch_size and grad_accum must be > 0"),
            (self.train.max_steps > 0, "train.max_steps must be > 0"),
            (self.train.log_every > 0, "train.log_every must be > 0"),
            (self.train.checkpoint_every > 0, "train.checkpoint_every must be > 0 (=train.max_steps: at the end only)"),
            (self.train.preview_every >= 0, "train.preview_every must be >= 0 (0 turns previews off)"),
            (self.train.position_every >= 0, "train.position_every must be >= 0 (0 turns the position curve off)"),
            (not self.train.preview_every or self.train.preview_prompts,
             "train.preview_prompts is empty; give prompts or set train.preview_every=0"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (0 <= self.train.ema_decay < 1, "train.ema_decay must be in [0, 1), e.g. 0.999"),
            (self.train.weight_decay >= 0 and self.train.warmup_steps >= 0 and self.train.grad_clip > 0,
             "train.weight_decay and warmup_steps must be >= 0, train.grad_clip > 0"),
            (self.text.max_length >= 3, "text.max_length must be >= 3 (start, a word, end)"),
            (self.text.pretrained or self.train.init_from or self.text.trainable or self.text.allow_random_frozen,
             "text.train=false without text.pretrained keeps the offline text encoder frozen at its random "
             "initialisation, so the UNet learns from noise-like text states: drop text.train (it then trains), set "
             "text.pretrained=PATH to a CLIP, or set text.allow_random_frozen=true if that is the experiment"),
            (self.noise.timestep_bias > 0, "noise.timestep_bias must be > 0 (1 is uniform)"),
            (0 <= self.noise.uniform_share <= 1, "noise.uniform_share must be in [0, 1] (0: every timestep biased)"),
            (self.noise.bias_steps is None or self.noise.bias_steps >= 0,
             "noise.bias_steps must be >= 0 (or null: biased for the whole run)"),
            (self.noise.bias_ramp >= 0, "noise.bias_ramp must be >= 0"),
            (0.1 <= self.noise.snr_shift <= 100,
             "noise.snr_shift must be from 0.1 to 100 (1: the beta schedule as it is; at 0.01 the schedule no longer "
             "ends in noise and sampling returns NaN or grey)"),
            (0 <= self.data.position_prob <= 1, "data.position_prob must be in [0, 1]"),
            (self.data.wording in ("templates", "grammar"), "data.wording must be 'templates' or 'grammar'"),
            (0 <= self.data.grammar_share <= 1, "data.grammar_share must be in [0, 1]"),
            (0 <= self.data.word_dropout < 1, "data.word_dropout must be in [0, 1)"),
            (self.train.grounding_weight >= 0, "train.grounding_weight must be >= 0 (0 turns it off)"),
            (not _infinite(self), f"{' and '.join(_infinite(self))} must be a finite number"),
            (self.noise.beta_schedule in BETA_SCHEDULES,
             f"noise.beta_schedule must be {', '.join(BETA_SCHEDULES[:-1])} or {BETA_SCHEDULES[-1]}"),
            (self.noise.num_train_timesteps >= 2, "noise.num_train_timesteps must be >= 2 (1000 is usual)"),
            (self.noise.min_snr_gamma is None or self.noise.min_snr_gamma > 0,
             "noise.min_snr_gamma must be > 0 (5 is usual), or null for plain MSE"),
            (self.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1 (the newest N are kept)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_holdout(self.data.holdout_wording)
        return self


def _infinite(config: RunConfig) -> list[str]:
    """The keys of `config` whose number is inf or nan (YAML reads `.inf` and `.nan`)."""
    return [k for k, v in flatten(config_to_dict(config)).items() if isinstance(v, float) and not math.isfinite(v)]


# Settings that may change when a run resumes: how long, how fast, how often, where it writes. Any other
# difference from the checkpoint's config changes the model or what it learns, and --resume refuses it.
RESUMABLE = ("data.num_workers", "data.latent_cache", "train.output_dir", "train.max_steps", "train.lr", "train.grad_clip",
             "train.mixed_precision", "train.channels_last", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.preview_every", "train.preview_prompts", "train.preview_steps",
             "train.position_every",
             "train.export_dtype", "train.report_to", "train.gradient_checkpointing")


def resume_changes(saved: dict, config: RunConfig) -> list[str]:
    """'key: saved -> now' for every setting outside RESUMABLE in which `config` differs from `saved`, the
    config dict a checkpoint holds (keys it lacks take their defaults)."""
    before, now = flatten(config_to_dict(_build(RunConfig, saved))), flatten(config_to_dict(config))
    return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now if k not in RESUMABLE and before[k] != now[k]]


# ----------------------------------------------------------------------------------------------


def _coerce(value, tp, key: str):
    """Check and convert a YAML value to the dataclass field type (lists become tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} takes a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads no/yes (off/on) as booleans: mixed_precision: no
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads '3e-4' as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} takes a {tp.__name__}, got {value!r}")
    return value


RENAMED = {"noise.uncond_prob": "train.caption_dropout"}  # old key -> its name now


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if prefix + key in RENAMED:
            raise ValueError(f"config key {prefix + key!r} is now {RENAMED[prefix + key]!r}; rename it")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"unknown config key {prefix + key!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix + key!r} is a section; give it as a mapping")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.lr=3e-4', 'data.flip=true'] -> nested dict, values parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML file (or the defaults) with `key=value` overrides."""
    values: dict = {}
    if path is not None:
        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder; pass a YAML file, e.g. configs/shapes32.yaml")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                raise ValueError(f"{path} is not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of sections (data, model, text, noise, train)")
    values = _merge(values, parse_overrides(list(overrides)))
    return _build(RunConfig, values).validate()


def config_to_dict(obj):
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(x) for x in obj]
    return obj


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.001}} -> {"train.lr": 0.001}."""
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
