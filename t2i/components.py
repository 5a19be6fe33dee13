"""What a run trains and what stays frozen beside it: the UNet (T2IUNet, a diffusers UNet2DConditionModel of
a preset's size, or a Stable Diffusion folder's own), the text encoder and tokenizer, the image space (pixels, or
a frozen VAE's latents), the noise schedule, and the folder the run exports. Three starts:
- from scratch, in pixels or in the latents of `model.vae`;
- `train.init_from` a t2i pipeline folder (its UNet, tokenizer and text encoder);
- `train.init_from` a Stable Diffusion 1.x, 2.x or XL folder: its UNet is fine-tuned, its CLIP and VAE stay frozen, its
  scheduler gives the noise schedule and prediction type, and the export is a folder of its own kind.
A run exports a StableDiffusionPipeline folder (diffusers opens it as it is) whenever its UNet is a diffusers UNet
in a VAE's latents; it then trains with Stable Diffusion's text conditioning (padding not masked).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .config import RunConfig
from .image_space import LatentSpace, PixelSpace, image_space, size_multiple
from .stable_diffusion import check_folder, is_diffusers_folder, local_folder, quiet_third_party
from .text import TextStates
from .unet import PRESETS, build_diffusers_unet, build_unet, unet_config

START = "start"  # in the run folder: what a Stable Diffusion fine-tune keeps of its folder (all but UNet weights)


@dataclass
class RunComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: torch.nn.Module
    space: PixelSpace                # pixels, or a frozen VAE's latents
    sd_export: bool                  # export a StableDiffusionPipeline folder (else a T2IPipeline folder)
    start: object | None = None      # the init_from pipeline (a t2i start), for load_start
    scheduler: object | None = None  # a Stable Diffusion start's own sampling scheduler, exported as it is
    sdxl: dict | None = None         # an SDXL start's tokenizer_2, text_encoder_2 and force_zeros_for_empty_prompt

    @property
    def mask_padding(self) -> bool:
        """t2i's text conditioning masks padding in cross-attention; Stable Diffusion's does not."""
        return not self.sd_export

    def text_states(self, text_encoder, trainable: bool, size: int, device):
        """Captions -> the UNet's conditioning (UNetConditioning) in training: t2i's TextStates of `text_encoder`
        (the prepared one, when it trains), or a Stable Diffusion start's own text conditioning, frozen and cached
        per caption (its encoders moved to `device`; SDXL's size conditioning says `size`)."""
        from .conditioning import CLIPText, FrozenConditioning, SDXLText, UNetConditioning
        if self.scheduler is None:
            states = TextStates(self.tokenizer, text_encoder, trainable, mask_padding=self.mask_padding)
            return lambda captions, device: UNetConditioning(*states(captions, device))
        self.text_encoder.to(device)
        text = (SDXLText(self.tokenizer, self.text_encoder, self.sdxl["tokenizer_2"],
                         self.sdxl["text_encoder_2"].to(device), self.sdxl["force_zeros_for_empty_prompt"]) if self.sdxl
                else CLIPText(self.tokenizer, self.text_encoder))
        return FrozenConditioning(text, size)


def sd_start(cfg: RunConfig, resume: str | None = None) -> str | None:
    """The local folder of a Stable Diffusion `train.init_from` (a resumed run: the copy it keeps), or None when it
    names a t2i folder (or none)."""
    name, kept = cfg.train.init_from, Path(cfg.train.output_dir) / START
    if not name or name == "default":
        return None
    if resume and (kept / "model_index.json").is_file():
        return str(kept)
    path = local_folder(name)
    index = Path(path, "model_index.json")
    try:
        listed = json.loads(index.read_text())
    except (OSError, ValueError):
        return None  # not a folder: load_pipeline says what is wrong with it
    if not is_diffusers_folder(listed):
        return None
    check_folder(path, listed)  # one line for a folder t2i cannot open (SD3, inpainting, ...)
    return path


def resolve(cfg: RunConfig, path: str | None) -> RunConfig:
    """The run config with what a Stable Diffusion start (`path`, sd_start's folder; None: not one) decides
    written in: its noise schedule's prediction type, beta schedule and number of timesteps, and a diffusers UNet.
    Settings it cannot honour are refused."""
    if path is None:
        if cfg.model.vae and cfg.train.grounding_weight > 0:
            raise ValueError("train.grounding_weight with model.vae is not supported (its masks are in pixels): "
                             "set train.grounding_weight=0")
        return cfg
    name = cfg.train.init_from
    refused = [(cfg.model.vae, "model.vae (the folder brings its own VAE)"),
               (cfg.text.train, "text.train=true (its CLIP stays frozen)"),
               (cfg.text.grow, "text.grow (its tokenizer is kept as it is)"),
               (cfg.noise.snr_shift != 1.0, "noise.snr_shift (its noise schedule is kept as it is)"),
               (cfg.train.grounding_weight > 0, "train.grounding_weight")]
    for given, what in refused:
        if given:
            raise ValueError(f"train.init_from={name} fine-tunes a Stable Diffusion folder; leave {what} unset")
    scheduler = json.loads(Path(path, "scheduler", "scheduler_config.json").read_text())
    if scheduler.get("trained_betas") is not None:
        raise ValueError(f"train.init_from={name}: its scheduler gives trained_betas, which t2i does not fine-tune "
                         "with; use a folder with a beta_schedule")
    noise = dataclasses.replace(cfg.noise, prediction_type=scheduler.get("prediction_type", "epsilon"),
                                beta_schedule=scheduler.get("beta_schedule", "linear"),
                                num_train_timesteps=scheduler.get("num_train_timesteps", 1000))
    return dataclasses.replace(cfg, noise=noise, model=dataclasses.replace(cfg.model, unet="diffusers"),
                               text=dataclasses.replace(cfg.text, train=False)).validate()


def load_vae(name_or_path: str, what: str = "model.vae"):
    """A frozen VAE (AutoencoderKL or AutoencoderTiny, as its config.json says) from a local folder or a hub name
    (offline: from the cache alone, as text.pretrained)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from .text import hub_reachable
    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    if not local and (name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~"))):
        raise ValueError(f"{what}={name_or_path}: no such folder (nor a hub name, owner/name): pass a VAE folder, "
                         "e.g. `t2i train-vae`'s OUT/vae")
    config = path / "config.json"
    if local and not config.is_file():
        raise ValueError(f"{what}={name_or_path} has no config.json: pass a folder saved by a VAE's save_pretrained "
                         "(e.g. `t2i train-vae`'s output) or a hub name")
    kinds = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    kind = json.loads(config.read_text()).get("_class_name", "AutoencoderKL") if local else "AutoencoderKL"
    if kind not in kinds:
        raise ValueError(f"{what}={name_or_path} is a {kind}; t2i trains in the latents of an AutoencoderKL or an "
                         "AutoencoderTiny")
    kwargs = {} if local else {"local_files_only": not hub_reachable()}
    try:
        with quiet_third_party():
            vae = kinds[kind].from_pretrained(os.fspath(path) if local else name_or_path, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise ValueError(f"could not load the VAE {what}={name_or_path}: {first}") from None
    return vae.requires_grad_(False).eval()


def build_components(cfg: RunConfig, corpus: list[str], out: Path, resume: str | None, main: bool,
                     path: str | None) -> RunComponents:
    """The run's components, identically initialised on every process (the caller seeds). A fresh start keeps
    in the run folder what a resume needs without its init_from folder: the tokenizer and text encoder of a t2i
    start, all but the UNet weights of a Stable Diffusion start (`start/`)."""
    from .pipeline import load_pipeline
    from .text import build_text, grow_text, load_pretrained_clip
    tc = cfg.train

    # 1. a Stable Diffusion start (`path`, sd_start's folder): its UNet is trained, the rest frozen
    if path is not None:
        from diffusers import UNet2DConditionModel

        from .stable_diffusion import load_components
        kept = out / START
        if path == str(kept):
            parts = load_components(str(kept), torch.float32, skip=("unet",))
            with quiet_third_party():
                parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(kept / "unet"))
        else:
            parts = load_components(path, torch.float32)
            if main:
                keep_start(parts, path, kept)
        for frozen in (parts["text_encoder"], parts["vae"], parts.get("text_encoder_2")):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        space = LatentSpace(parts["vae"])
        check_size(cfg.data.size, parts["unet"], space, tc.init_from)
        sdxl = ({k: parts[k] for k in ("tokenizer_2", "text_encoder_2", "force_zeros_for_empty_prompt")}
                if "text_encoder_2" in parts else None)
        return RunComponents(parts["tokenizer"], parts["text_encoder"], parts["unet"], space,
                             sd_export=True, scheduler=parts["scheduler"], sdxl=sdxl)

    # 2. text: a t2i start's, its copy in a resumed run, a pretrained CLIP, or the offline one
    start = None
    if tc.init_from and resume and (out / "text_encoder").is_dir():
        tokenizer, text_encoder = load_pretrained_clip(str(out))
    elif tc.init_from:
        start = load_pipeline(None if tc.init_from == "default" else tc.init_from)
        tokenizer, text_encoder = start.tokenizer, start.text_encoder
        if cfg.text.grow:  # words the start's vocabulary lacks, and a longer max length
            tokenizer, text_encoder = grow_text(tokenizer, text_encoder.float(), corpus, cfg.text.max_length)
    else:
        tokenizer, text_encoder = build_text(cfg.text, corpus, out if resume or not main else None)
    if tc.init_from:
        text_encoder.requires_grad_(cfg.text.trainable)
    if main and not cfg.text.pretrained:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / "tokenizer")
    if main and start is not None:  # a resume needs no init_from folder
        text_encoder.save_pretrained(out / "text_encoder")

    # 3. the image space and a UNet of its channels and size
    space = image_space(load_vae(cfg.model.vae) if cfg.model.vae else None)
    size, levels = cfg.data.size, cfg.model.block_channels or PRESETS.get(cfg.model.preset, {}).get("block_channels")
    if levels:
        check_size(size, len(levels) - 1, space, cfg.model.vae)
    shape = dict(sample_size=size // space.factor, in_channels=space.channels, out_channels=space.channels,
                 cross_attention_dim=text_encoder.config.hidden_size)
    build = build_diffusers_unet if cfg.model.unet == "diffusers" else build_unet
    unet = build(**dataclasses.asdict(cfg.model) | shape)
    return RunComponents(tokenizer, text_encoder, unet, space,
                         sd_export=cfg.model.unet == "diffusers" and space.kind == "latents", start=start)


def check_size(size: int, unet, space: PixelSpace, what: str | None) -> None:
    """data.size must be a whole number of the UNet's smallest cells (its downsampling times the VAE's factor);
    `unet`: the UNet, or how many times it halves its input."""
    multiple = size_multiple(unet, space) if isinstance(unet, torch.nn.Module) else 2 ** unet * space.factor
    if size % multiple:
        by = f" (its downsampling times the VAE's {space.factor}x of {what})" if space.kind == "latents" else ""
        raise ValueError(f"data.size={size} must be a multiple of {multiple} for this UNet{by}: try "
                         f"data.size={max(multiple, round(size / multiple) * multiple)}")


def check_shape(cfg: RunConfig) -> None:
    """A bad data.size or model.* fails before any work (a VAE's factor is checked once it is loaded)."""
    if not cfg.model.vae and not (cfg.model.unet == "diffusers" and cfg.train.init_from):  # else: known once loaded
        unet_config(**dataclasses.asdict(cfg.model), sample_size=cfg.data.size)


def sd_pipeline(parts: dict):
    """Stable Diffusion components as the pipeline diffusers opens without remote code: a StableDiffusionXLPipeline
    (two text encoders), else a StableDiffusionPipeline without a safety checker (t2i does not run one)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    with quiet_third_party():  # diffusers' notes on older scheduler configs
        if parts.get("text_encoder_2") is not None:
            return StableDiffusionXLPipeline(**parts)
        parts = {k: v for k, v in parts.items() if k not in ("text_encoder_2", "tokenizer_2",
                                                             "force_zeros_for_empty_prompt")}
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def keep_start(parts: dict, path: str, kept: Path) -> None:
    """A Stable Diffusion start's folder without its UNet weights, in the run folder: what a resume builds from."""
    staged = kept.with_name(f".{START}.tmp")
    with quiet_third_party():
        sd_pipeline(parts).save_pretrained(staged)
    (staged / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(staged, kept)
