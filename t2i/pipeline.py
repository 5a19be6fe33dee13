"""The text-to-image pipeline: prompt -> text conditioning -> guided denoising with any diffusers scheduler in
an image space (pixels, or a VAE's latents) -> images. Classifier-free guidance (Ho & Salimans 2022) by
batching [uncond, cond]. t2i's own models and Stable Diffusion 1.x, 2.x and XL run through the same loop:
t2i.conditioning says what the UNet is told, t2i.image_space what it denoises.
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from .checkpoint import safetensors_damage, weights_mismatch
from .conditioning import CLIPText, SDXLText, T2IText, UNetConditioning, cat_encodings, unet_prediction
from .diffusion import alpha_bar_at, predict_x0
from .image_space import PixelSpace, image_space, native_size, size_multiple
from .layout import BatchLayout
from .stable_diffusion import check_folder, is_diffusers_folder, load_components, local_folder, quiet_third_party
from .settings import DEFAULTS, SCHEDULERS, GuideSettings, max_inference_steps, min_inference_steps
from .text import PromptEncoding, PromptTruncated, token_strings, tokenize
from .unet import T2IUNet  # noqa: F401  (diffusers loads saved "t2i.unet" components only once imported)

if TYPE_CHECKING:
    from .attention import AttentionRecorder

DEFAULT_MODEL = Path(__file__).parent / "default_model"
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
# DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) finds T2IPipeline through this
# file, named with the class in model_index.json's `_class_name` (diffusers' custom-pipeline convention)
SHIM_MODULE = "t2i_pipeline"
SHIM_CODE = "from t2i.pipeline import T2IPipeline  # noqa: F401  (needs `pip install t2i`)\n"


def make_scheduler(name: str, config: dict, space: PixelSpace = PixelSpace()):
    """A diffusers scheduler by short name, sharing the noise schedule and prediction type in `config`, with
    the options that suit the image space (no x0 thresholding for latents)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **space.scheduler_options(extra))


def scheduler_name(scheduler, space: PixelSpace = PixelSpace()) -> str:
    """The short name of a scheduler instance (the inverse of make_scheduler), else its class name."""
    for name, (cls, extra) in SCHEDULERS.items():
        extra = {k: v for k, v in space.scheduler_options(extra).items() if k in extra}
        if type(scheduler) is getattr(diffusers, cls) and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return type(scheduler).__name__


@dataclass
class T2IPipelineOutput(BaseOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor
    attention: Any = None  # the recorder's Heatmaps when record_attention is set
    previews: torch.Tensor | None = None  # (steps, images, 3, H, W) in [0, 1]: the predicted x0 at each step
    guidance: list[dict] | None = None  # attention guidance: per guided step, its energies ({'layout': [...], ...})


class T2IPipeline(DiffusionPipeline):
    """unet (T2IUNet or any diffusers UNet2DConditionModel), CLIP text_encoder and tokenizer, and a diffusers
    scheduler; with a `vae`, the UNet denoises its latents (Stable Diffusion), and with `text_encoder_2` and
    `tokenizer_2` it is conditioned as SDXL is. `caption_dropout` records the caption dropout used in
    training (None: unknown); guidance on a model trained without it warns. `mask_padding` says whether the
    UNet was trained with padding masked in cross-attention (t2i's text conditioning) or not (Stable
    Diffusion's); None: masked without a VAE, not with one (a Stable Diffusion folder)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: the UNet computes in it, latents stay float32

    def __init__(self, unet, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler,
                 caption_dropout: float | None = None, vae=None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True, mask_padding: bool | None = None):
        super().__init__()
        check_unet(unet, sdxl=text_encoder_2 is not None, vae=vae)
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(caption_dropout=caption_dropout)
        if text_encoder_2 is not None:
            self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        if mask_padding is not None:  # a t2i model in a VAE's latents (model.vae) is masked as t2i's own are
            self.register_to_config(mask_padding=mask_padding)

    # -- what the UNet denoises and what it is told ----------------------------------------------
    @property
    def image_space(self) -> PixelSpace:
        """Pixels, or the VAE's latents."""
        return image_space(self.vae, self.unet)

    @property
    def conditioning(self) -> T2IText:
        """t2i's own text conditioning; Stable Diffusion 1.x/2.x's (a VAE, one encoder); SDXL's (two encoders)."""
        if self.text_encoder_2 is not None:
            return SDXLText(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                            self.config.get("force_zeros_for_empty_prompt", True))
        masked = self.config.get("mask_padding")
        masked = self.vae is None if masked is None else masked
        return (T2IText if masked else CLIPText)(self.tokenizer, self.text_encoder)

    @property
    def native_size(self) -> int:
        """The image side in pixels the model was made for (its UNet's sample size times the VAE's factor)."""
        return native_size(self.unet, self.image_space)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return size_multiple(self.unet, self.image_space)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """model_index.json -> __init__ arguments; a folder saved before caption dropout had its name
        calls it `uncond_dropout`."""
        if "uncond_dropout" in config_dict:
            config_dict = dict(config_dict)
            config_dict.setdefault("caption_dropout", config_dict.pop("uncond_dropout"))
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "T2IPipeline":
        """Load a pipeline folder written by `save_pretrained`, with clear errors for broken folders."""
        path = os.fspath(path)
        if os.path.isdir(path):
            check_pipeline_folder(path)
            shim = Path(path) / f"{SHIM_MODULE}.py"
            if shim.is_file() and shim.read_text() == SHIM_CODE:  # our own one-line import: safe to run
                kwargs.setdefault("trust_remote_code", True)
        try:
            return super().from_pretrained(path, **kwargs)
        except (ValueError, RuntimeError, OSError, SafetensorError) as e:
            if not os.path.isdir(path):
                raise ValueError(f"no pipeline folder at {path!r}: pass a folder written by "
                                 "T2IPipeline.save_pretrained or `t2i train`") from None
            raise ValueError(f"could not load the pipeline in {path!r}: {_first_line(e).rstrip('.')}. If a component's "
                             "weights do not match its config.json, re-export the folder from its run.") from e

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' save_pretrained, with the weights given the file mode of the configs beside them
        (safetensors writes them 0600, unreadable to the group and others)."""
        super().save_pretrained(save_directory, **kwargs)
        index = Path(save_directory) / "model_index.json"
        listed = json.loads(index.read_text())
        listed["_class_name"] = [SHIM_MODULE, type(self).__name__]
        index.write_text(json.dumps(listed, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / f"{SHIM_MODULE}.py").write_text(SHIM_CODE)
        mode = index.stat().st_mode & 0o777
        for weights in Path(save_directory).rglob("*.safetensors"):
            weights.chmod(mode)

    # -- the steps of __call__ -------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, guidance_scale, num_images_per_prompt, num_inference_steps,
                     scheduler=None):
        if not prompt:
            raise ValueError("the prompt list is empty: pass at least one prompt")
        if not all(isinstance(p, str) for p in prompt):
            raise ValueError("prompts must be strings")
        f = self.size_multiple
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f} for this UNet, "
                             f"got {height}x{width}; try {max(f, round(height / f) * f)}x{max(f, round(width / f) * f)}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        scheduler = scheduler or self.scheduler
        least, most = min_inference_steps(scheduler), max_inference_steps(scheduler)
        if not least <= num_inference_steps <= most:
            raise ValueError(f"num_inference_steps must be between {least} and {most} for {type(scheduler).__name__} "
                             f"(fewer give a flat grey or noisy image; more than its training timesteps fail), got "
                             f"{num_inference_steps}")
        if guidance_scale > 1.0 and self.config.caption_dropout == 0:
            warnings.warn("this model was trained without caption dropout, so it has no unconditional "
                          "prediction to guide against; use guidance_scale=1.0", stacklevel=3)

    def encode_prompt(self, prompt: list[str] | None, negative_prompt: list[str] | None, guided: bool,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      prompt_attention_mask: torch.Tensor | None = None,
                      negative_prompt_attention_mask: torch.Tensor | None = None,
                      clip_skip: int | None = None) -> PromptEncoding:
        """(uncond ++ cond) text states when guided, else cond only. Given embeddings (B, T, width),
        with their masks (B, T) (default: all tokens real), stand in for the texts they encode. SDXL with
        force_zeros_for_empty_prompt: no negative prompt is zeros, as in diffusers."""
        text = self.conditioning
        if prompt_embeds is None and negative_prompt_embeds is None:
            if guided and negative_prompt is None and text.zeros_for_empty_prompt:
                cond = text.encode(prompt, clip_skip=clip_skip)
                return cat_encodings(text.zeros(text.encode([""] * len(prompt), cond.hidden_states.shape[1],
                                                            negative=True)), cond)
            if guided and clip_skip:  # the prompt with clip skip, the negative without (diffusers)
                cond = text.encode(prompt, clip_skip=clip_skip)
                return cat_encodings(text.encode(negative_prompt or [""] * len(prompt), cond.hidden_states.shape[1],
                                                 negative=True), cond)
            texts = (negative_prompt or [""] * len(prompt)) + prompt if guided else prompt
            return text.encode(texts)
        if isinstance(text, SDXLText):
            raise ValueError("prompt_embeds are not supported for SDXL folders (they need pooled text): pass prompts")
        cond = (given_encoding(prompt_embeds, prompt_attention_mask) if prompt_embeds is not None
                else text.encode(prompt, negative_prompt_embeds.shape[1], clip_skip=clip_skip))
        if not guided:
            return cond
        B, T = cond.hidden_states.shape[:2]
        uncond = (given_encoding(negative_prompt_embeds, negative_prompt_attention_mask)
                  if negative_prompt_embeds is not None
                  else text.encode(negative_prompt or [""] * B, T, negative=True))
        if uncond.hidden_states.shape != cond.hidden_states.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(uncond.hidden_states.shape)} must have the shape of "
                             f"prompt_embeds {tuple(cond.hidden_states.shape)}")
        return cat_encodings(uncond, cond)

    def prompt_tokens(self, prompt: str | list[str]) -> list[list[str]]:
        """The real tokens of each prompt as `__call__` encodes them (start, words, end; cut at the
        tokenizer's max length), without running the text encoder. Too-long prompts warn in `__call__`."""
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncated)
            batch = tokenize(self.tokenizer, prompt)
        return token_strings(self.tokenizer, batch["input_ids"], batch["attention_mask"])

    def word_labels(self, prompt: str, words: list[str]) -> list[str]:
        """The label of each word ('circle', 'circle#2') in `prompt` as `__call__` encodes it, or a ValueError
        before any sampling that names a word not in the prompt, or one the tokenizer's length limit cuts off."""
        from .attention.heatmaps import check_words
        uncut = self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"]
        return check_words(self.prompt_tokens(prompt)[0], words, all_tokens=self.tokenizer.convert_ids_to_tokens(uncut))

    def sampling_hooks(self, batch: BatchLayout, scheduler, autocast, record_attention, word_weights, layout, excite,
                       guide: GuideSettings, reweight_text: bool = True) -> tuple[list, Any, list | None]:
        """The hooks of one call, in the order they act: [(a context installed around the sampling loop,
        before_step(i, t, x, cond) -> x)], the recorder (None: not recording), and the list attention guidance
        fills with each guided step's energies (None: no guidance)."""
        hooks, recorder, energies = [], None, None
        if word_weights:
            from .attention.effects import reweighting
            hooks.append((reweighting(self.unet, batch, word_weights, text=reweight_text), lambda i, t, x, cond: x))
        if layout or excite:
            from .attention.guidance import guided_latents, resolve_targets
            guide = guide.check()
            targets = resolve_targets([batch.encoding.tokens[k] for k in batch.texts("cond")], layout, excite)
            guided_steps, energies = round(guide.fraction * batch.num_inference_steps), []

            def guided(i, t, x, cond):
                if not targets or i >= guided_steps:
                    return x
                x, seen = guided_latents(self.unet, x, t, batch, cond, targets, guide, scheduler.scale_model_input,
                                         autocast, float(1 - alpha_bar_at(scheduler, t)) ** 0.5)
                energies.append(seen)
                return x
            hooks.append((nullcontext(), guided))
        if record_attention:
            recorder = record_attention
            if recorder is True:
                from .attention import AttentionRecorder
                recorder = AttentionRecorder()

            def step_index(i, t, x, cond):
                recorder.set_step(i)
                return x
            hooks.append((recorder.record(self.unet, batch), step_index))
        return hooks, recorder, energies

    def run_step_end(self, callback, names, i, t, latents, prompt_embeds):
        """diffusers' callback_on_step_end: the named tensors in, replacements for any of them out."""
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
        out = callback(self, i, t, {k: tensors[k] for k in names}) or {}
        return out.get("latents", latents), out.get("prompt_embeds", prompt_embeds)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULTS.steps,
        guidance_scale: float = DEFAULTS.guidance,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        record_attention: bool | AttentionRecorder = False,
        word_weights: dict[str, float] | list[dict[str, float]] | None = None,
        reweight_text: bool = True,
        previews: bool = False,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        scheduler: str | None = None,
        layout: bool | dict[str, tuple[float, float, float, float]] | list[dict] | None = None,
        excite: bool | list[str] | list[list[str]] | None = None,
        guide: GuideSettings = DEFAULTS.guide,
        clip_skip: int | None = None,
    ):
        """Generate images. `callback(i, t, x_t)` runs after each step. Images come back as a list of
        PIL images, a float array (B, H, W, 3) in [0, 1] ('np') or a tensor (B, 3, H, W) in [0, 1] ('pt').
        `record_attention`: True, or an AttentionRecorder that chooses layers, steps and heads, also
        returns the cross-attention heatmaps as `.attention` (of the probabilities as reweighted).
        `word_weights`: {word: weight} for every prompt, or one dict per prompt, scales each word's
        cross-attention probabilities on the conditional branch at every layer and step (prompt-to-prompt's
        reweighting; 0 silences a word, 2 doubles it; see t2i.attention.effects), and with `reweight_text`
        (default) scales its keys in the text encoder's self-attention and t2i's context layer as well, so a
        word at 0 is in no other word's state either (False: the cross-attention alone). `previews`: also return
        the predicted clean image x0 after each step as `.previews` (steps, B, 3, H, W) in [0, 1].
        `scheduler`: a t2i.settings.SCHEDULERS name to sample with in this call only (a fresh one built
        from the pipeline's scheduler config; None: the pipeline's own).
        `layout` {word: (x0, y0, x1, y1)} (boxes as fractions of the image, y down; one dict for every prompt or
        one per prompt) and `excite` (words) turn on attention guidance; True takes them from a shapes-world
        prompt's own positions, relations and objects. Guidance (t2i.attention.guidance) acts on the first
        `guide.fraction` of the steps; without it nothing changes. `.guidance` then holds each guided step's energies.

        As in diffusers: `latents` (B*n, C, H, W) is the initial noise before the scheduler's
        init_noise_sigma; `prompt_embeds` (B, T, width) with `prompt_attention_mask` (B, T) replaces
        `prompt` (and `negative_prompt_embeds` the negative prompt); `callback_on_step_end(pipe, i, t,
        kwargs)` gets the tensors named in `callback_on_step_end_tensor_inputs` ('latents', and
        'prompt_embeds': the UNet's batch of text states) and may return replacements for them.
        `clip_skip` (Stable Diffusion folders): the prompt's text states from that many layers before the last.
        With a VAE, `latents` are the VAE's (B*n, 4, H / 8, W / 8) and `height`/`width` stay in pixels."""
        # 1. check inputs
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt or prompt_embeds, not both or neither")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs can hold {self._callback_tensor_inputs}, got {sorted(bad)}")
        if prompt is None:
            prompt = [""] * len(prompt_embeds)  # only counted and checked: the embeddings stand in for the texts
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        space, text = self.image_space, self.conditioning
        height, width = (self.native_size if s is None else s for s in (height, width))
        scheduler = self.scheduler if scheduler is None else make_scheduler(scheduler, self.scheduler.config, space)
        self.check_inputs(prompt, height, width, guidance_scale, num_images_per_prompt, num_inference_steps, scheduler)
        guided = guidance_scale != 1.0
        device, dtype = self.unet.device, self.unet.dtype

        # 2. encode the prompt, repeated for each image: rows as BatchLayout says, [uncond x B*n, cond x B*n]
        enc = self.encode_prompt(prompt, negative_prompt, guided, prompt_embeds, negative_prompt_embeds,
                                 prompt_attention_mask, negative_prompt_attention_mask, clip_skip)
        if not torch.isfinite(enc.hidden_states).all():
            raise ValueError("the text encoder returned NaN or inf for these prompts: its weights are damaged; copy "
                             "the pipeline folder again, or export it again from its run")
        n = num_images_per_prompt
        B = len(prompt) * n
        if word_weights and reweight_text and prompt_embeds is None:  # the words out of the text path's mixing too
            from .attention.effects import reweighted_encoding
            enc = reweighted_encoding(text, prompt, BatchLayout(enc, (height, width), n, guided), word_weights, clip_skip)
        cond = text.unet_conditioning(enc, len(enc.tokens) * n, height, width)
        cond = UNetConditioning(cond.states.to(dtype), cond.mask, cond.added and {k: v.to(device, dtype)
                                                                                 for k, v in cond.added.items()})

        # 3. prepare the initial noise, in the image space
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = space.sample_shape(B, height, width)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (images, channels, height, width), got {tuple(latents.shape)}")
        x = (randn(shape, generator, device, dtype) if latents is None else latents.to(device, dtype)) \
            * scheduler.init_noise_sigma

        # 4. denoise. What the call asks for is hooked into the loop, not branched in it: each hook is a context
        #    installed around the loop (word weights and the recorder sit on the cross-attention processors) and a
        #    function run before each step's UNet pass (the recorder's step index; attention guidance moves x)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        timesteps = scheduler.timesteps
        autocast = torch.autocast(device.type, self.autocast_dtype) if self.autocast_dtype else nullcontext()
        batch = BatchLayout(enc, (height, width), n, guided, len(timesteps))
        hooks, recorder, energies = self.sampling_hooks(batch, scheduler, autocast, record_attention, word_weights,
                                                        layout, excite, guide, reweight_text)
        x0_previews = [] if previews else None
        with ExitStack() as installed:
            for context, _ in hooks:
                installed.enter_context(context)
            for i, t in enumerate(self.progress_bar(timesteps)):
                for _, before_step in hooks:
                    x = before_step(i, t, x, cond)
                x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
                with autocast:
                    pred = unet_prediction(self.unet, x_in, t, cond).to(x.dtype)
                if guided:
                    uncond, cond_pred = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond_pred - uncond)
                if x0_previews is not None:
                    x0 = predict_x0(x_in[:B].float(), pred.float(), alpha_bar_at(scheduler, t),
                                    scheduler.config.prediction_type)
                    x0_previews.append(space.decode(x0).cpu())
                x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
                if callback is not None:
                    callback(i, t, x)
                if callback_on_step_end is not None:
                    x, states = self.run_step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, x,
                                                  cond.states)
                    cond = cond.with_states(states)

        # 5. decode: to images in [0, 1]; NaN would pass for black
        broken = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()
        if broken:
            raise ValueError(f"sampling returned NaN or inf for image{'s' * (len(broken) > 1)} "
                             f"{', '.join(map(str, broken))} of {B}: lower the guidance scale or take another "
                             "scheduler; if it persists, the UNet's weights are damaged")
        images = space.decode(x)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = images[..., 0] if images.shape[-1] == 1 else images  # one channel: grayscale ("L")
                images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        attention = recorder.heatmaps() if recorder is not None else None
        x0_previews = torch.stack(x0_previews) if x0_previews else None
        self.maybe_free_model_hooks()
        return T2IPipelineOutput(images, attention, x0_previews, energies) if return_dict else (images, attention)


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `generator` (one per image, or one for all), so a seed
    gives the same image on every device."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images")
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        x = torch.randn(shape, generator=generator)
    return x.to(device=device, dtype=dtype)


def given_encoding(embeds: torch.Tensor, mask: torch.Tensor | None) -> PromptEncoding:
    """Text states passed in (B, T, width) with their mask (B, T); their tokens are unknown ('?')."""
    if embeds.dim() != 3:
        raise ValueError(f"prompt embeddings must be (batch, tokens, width), got shape {tuple(embeds.shape)}")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"an attention mask must be (batch, tokens) = {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.long()
    return PromptEncoding(embeds, mask, torch.zeros_like(mask), [["?"] * int(m.sum()) for m in mask])


def check_unet(unet, sdxl: bool = False, vae=None) -> None:
    """Refuse a UNet that needs conditioning the pipeline does not give: SDXL's pooled text and time ids
    without SDXL's second text encoder, class labels, image embeddings, LCM's guidance embedding; or that
    denoises what no image space decodes: other channels out than in, neither 1 nor 3 without a VAE."""
    config = getattr(unet, "config", {})
    given = {"addition_embed_type": "text_time"} if sdxl else {}
    extra = [f"{k}={config[k]!r}" for k in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim")
             if config.get(k) is not None and config.get(k) != given.get(k)]
    if extra:
        given = "text states and SDXL's pooled text and time ids" if sdxl else "text states only"
        raise ValueError(f"T2IPipeline gives this UNet {given}, and it has {', '.join(extra)}, which needs more "
                         "(SDXL's pooled text and time ids come with a StableDiffusionXLPipeline folder, "
                         "t2i.load_pipeline(folder)): use a UNet without it")
    if sdxl and config.get("addition_embed_type") != "text_time":
        raise ValueError("an SDXL pipeline needs a UNet with addition_embed_type='text_time'")
    channels_in, channels_out = config.get("in_channels"), config.get("out_channels")
    if channels_in != channels_out:
        raise ValueError(f"the UNet predicts {channels_out} channel{'s' * (channels_out != 1)} for an input of "
                         f"{channels_in}: a denoiser predicts as many channels as it takes (out_channels=in_channels)")
    image_space(vae, unet)  # pixels of 1 or 3 channels, or a VAE's latents


def check_pipeline_folder(path: str) -> None:
    """Fail fast, naming what is missing, before diffusers tries to load a broken folder."""
    if not os.path.isdir(path):
        raise ValueError(f"no pipeline folder at {path!r}: pass a folder written by T2IPipeline.save_pretrained "
                         "or `t2i train`")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path!r} has no model_index.json: pass a folder written by T2IPipeline.save_pretrained")
    try:
        with open(index) as f:
            listed = json.load(f)
    except ValueError as e:  # not JSON, or not text
        raise ValueError(f"{index} is not valid JSON ({str(e).splitlines()[0]}): copy the pipeline folder again, or "
                         "export it again from its run") from None
    if not isinstance(listed, dict):
        raise ValueError(f"{index} holds no components (a JSON object naming them is expected): copy the pipeline "
                         "folder again, or export it again from its run")
    if is_diffusers_folder(listed):  # Stable Diffusion in diffusers' layout, or a folder t2i says it cannot open
        check_folder(path, listed)
        return
    missing = [c for c in COMPONENTS if c not in listed or not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ValueError(f"pipeline folder {path!r} is missing component(s) {missing}; "
                         "re-export it with save_pretrained")
    has_vae = bool((listed.get("vae") or [None])[0])  # model_index.json: [library, class], or [null, null]
    for c in ("unet", "text_encoder", *(["vae"] if has_vae else [])):
        files = os.listdir(os.path.join(path, c))
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            raise ValueError(f"{os.path.join(path, c)!r} needs a config.json and .safetensors weights")
        for weights in sorted(f for f in files if f.endswith(".safetensors")):
            problem = safetensors_damage(Path(path, c, weights))
            if problem:
                raise ValueError(f"{os.path.join(path, c, weights)} {problem}: copy the pipeline folder again, or "
                                 "export it again from its run")
        mismatch = weights_mismatch(Path(path, c), *(listed.get(c) or [None, None]))
        if mismatch:
            raise ValueError(mismatch)
    if not has_vae:  # pixels: a UNet whose channels make no image, said before loading
        try:
            PixelSpace(json.loads(Path(path, "unet", "config.json").read_text()).get("in_channels", 3))
        except (json.JSONDecodeError, AttributeError):  # a broken config: the loader says what is wrong
            pass
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def load_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> T2IPipeline:
    """Load a pipeline folder; with no path or "default", the default model shipped inside the package. Weights
    come in float32 on the CPU (half precision is slow there) and as stored elsewhere, unless `dtype`."""
    if path is None or os.fspath(path) == "default":  # "default": what a PNG of the shipped model records
        path = DEFAULT_MODEL
        if not (DEFAULT_MODEL / "model_index.json").exists():
            raise ValueError(f"no default model is shipped in {DEFAULT_MODEL}; pass --model PATH/TO/PIPELINE")
    device = torch.device(device)
    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    path = local_folder(os.fspath(path))  # a hub name: its copy in the Hugging Face cache
    check_pipeline_folder(path)
    with open(os.path.join(path, "model_index.json")) as f:
        diffusers_folder = is_diffusers_folder(json.load(f))
    with quiet_third_party():  # loading needs no bars and no third-party warnings, from the CLI or from Python
        pipe = (T2IPipeline(**load_components(path, dtype)) if diffusers_folder else
                T2IPipeline.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {})))
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(memory_format=torch.channels_last)  # 1.1-1.2x faster sampling on CPU (bench/sample.py)
    return pipe.to(device)
