"""Stable Diffusion folders in diffusers' layout, opened as T2IPipelines by t2i.pipeline.load_pipeline: a
StableDiffusionPipeline folder (SD 1.x; SD 2.x, v-prediction included) or a StableDiffusionXLPipeline folder,
recognised by the `_class_name` in its model_index.json. The components are loaded one by one (the safety checker and its image processor
are not: t2i does not run them), with the folder's own scheduler; third-party warnings are kept from the user.
A folder t2i cannot use (an inpainting UNet, SD3, Flux, a component missing) is one line saying what it is and
what t2i opens.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

OPENED = {"StableDiffusionPipeline": "Stable Diffusion 1.x/2.x", "StableDiffusionXLPipeline": "Stable Diffusion XL"}
NEEDS = {"StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
         "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                       "scheduler")}
WHAT_T2I_OPENS = ("t2i opens its own pipeline folders, StableDiffusionPipeline folders (SD 1.x, 2.x) and "
                  "StableDiffusionXLPipeline folders")
KNOWN = {  # pipelines people will try, and what they are
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 folder (an MMDiT transformer with flow matching, not a UNet)",
    "FluxPipeline": "a Flux folder (a transformer with flow matching, not a UNet)",
    "StableDiffusionInpaintPipeline": "an inpainting folder (its UNet reads a mask and a masked image too)",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting folder (its UNet reads a mask and a masked image too)",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL image-to-image folder (the refiner has no first text encoder)",
    "StableDiffusionUpscalePipeline": "an upscaler folder (its UNet reads a low-resolution image too)",
    "StableDiffusionDepth2ImgPipeline": "a depth-to-image folder (its UNet reads a depth map too)",
    "PixArtAlphaPipeline": "a PixArt folder (a transformer, not a UNet)",
}
LIBRARIES = ("diffusers", "transformers")  # components are classes of these, by name, nothing else


# the files of a Stable Diffusion repository t2i reads: configs, tokenizers, float32 safetensors weights
HUB_FILES = ["model_index.json", "*/*.json", "*/*.txt", "unet/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder*/model.safetensors"]


def local_folder(name_or_path: str) -> str:
    """A local folder as it is; a hub name ('stable-diffusion-v1-5/stable-diffusion-v1-5') as its copy in the
    Hugging Face cache, downloaded when the hub answers, read from the cache alone when it does not (as
    `text.pretrained` is): a quick error instead of minutes of retries."""
    if os.path.isdir(name_or_path) or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        return name_or_path
    from huggingface_hub import snapshot_download

    from .text import hub_reachable
    offline = not hub_reachable()
    try:
        with quiet_third_party():
            return snapshot_download(name_or_path, allow_patterns=HUB_FILES, local_files_only=offline)
    except Exception as e:  # not found, no network, gated: one line
        why = ("the Hugging Face hub is unreachable and the local cache has no copy" if offline
               else next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200])
        raise ValueError(f"no pipeline folder at {name_or_path!r}, and as a hub name: {why}. Pass a local folder "
                         "(a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline folder)") from None


def class_name(index: dict) -> str:
    """model_index.json's pipeline class: a name, or [module, name] for a custom pipeline."""
    name = index.get("_class_name", "")
    return name[-1] if isinstance(name, (list, tuple)) else str(name)


def is_diffusers_folder(index: dict) -> bool:
    """Whether a model_index.json is a diffusers pipeline's other than t2i's own."""
    return class_name(index) not in ("T2IPipeline", "")


def check_folder(path: str, index: dict) -> str:
    """The pipeline class of a Stable Diffusion folder t2i opens, or one ValueError line saying what the folder is
    and what t2i opens."""
    cls = class_name(index)
    if cls not in OPENED:
        what = KNOWN.get(cls, f"a {cls} folder")
        raise ValueError(f"{path!r} is {what}; {WHAT_T2I_OPENS}")
    missing = [c for c in NEEDS[cls] if not index.get(c) or index[c][0] is None or not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ValueError(f"{path!r} is a {cls} folder without {', '.join(missing)}: copy the whole folder "
                         f"(a {cls} folder has {', '.join(NEEDS[cls])})")
    for c in NEEDS[cls]:
        library = index[c][0]
        if library not in LIBRARIES:
            raise ValueError(f"{path!r}: component {c} is from {library!r}; t2i loads diffusers and transformers "
                             "components only")
    unet = _json(Path(path, "unet", "config.json"))
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{path!r} has a {unet['_class_name']} where a UNet2DConditionModel should be; "
                         f"{WHAT_T2I_OPENS}")
    if unet.get("in_channels", 4) != 4:
        kind = "an inpainting UNet" if unet.get("in_channels") == 9 else "a UNet"
        raise ValueError(f"{path!r} has {kind} with {unet.get('in_channels')} input channels (text-to-image UNets "
                         f"have 4: the latents); {WHAT_T2I_OPENS}")
    return cls


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {path}: {e}") from None


@contextmanager
def quiet_third_party():
    """transformers' and diffusers' warnings and progress bars off, then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    levels = [lib.get_verbosity() for lib in (diffusers_logging, transformers_logging)]
    bars = [lib.is_progress_bar_enabled() for lib in (diffusers_logging, transformers_logging)]
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity(logging.ERROR)
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for module in ("transformers", "diffusers", "huggingface_hub", "torch"):
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        for lib, level, bar in zip((diffusers_logging, transformers_logging), levels, bars):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def load_components(path: str, dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> dict:
    """A StableDiffusionPipeline or StableDiffusionXLPipeline folder's components as T2IPipeline's arguments,
    each loaded by the class model_index.json names (weights in `dtype`, else as diffusers and transformers
    load them); the components in `skip` are left out."""
    index = _json(Path(path, "model_index.json"))
    cls = check_folder(path, index)
    components = {}
    with quiet_third_party():
        for name in (n for n in NEEDS[cls] if n not in skip):
            library, class_ = index[name]
            loader = getattr(importlib.import_module(library), class_, None)
            if loader is None:
                raise ValueError(f"{path!r}: {library} has no class {class_} (component {name}); update {library}")
            kwargs = {"dtype": dtype} if dtype is not None and not name.startswith(("tokenizer", "scheduler")) else {}
            try:
                components[name] = loader.from_pretrained(os.path.join(path, name), **kwargs)
            except (OSError, ValueError, RuntimeError) as e:
                first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
                raise ValueError(f"could not load {name} of {path!r}: {first}") from None
    extra = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)} \
        if cls == "StableDiffusionXLPipeline" else {}
    return {**components, **extra}
