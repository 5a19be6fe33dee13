"""The model card written beside an exported pipeline: README.md with YAML front matter (library, tags,
the recipe it was trained from, the resolved training config, the data) as the Hugging Face Hub reads
it, and the evaluation table once `t2i evaluate` has scored the folder.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import RunConfig, config_to_dict

CARD = "README.md"
EVAL_HEADING = "## Evaluation"
NOT_EVALUATED = "Not evaluated yet: `t2i evaluate --model {path}` adds the table here."


def data_description(cfg: RunConfig) -> str:
    """One sentence on what the model was trained on."""
    d = cfg.data
    if d.kind in ("folder", "shards"):
        source = "the image folder" if d.kind == "folder" else "the shards in"
        return (f"{source} {d.root} (captions from `{d.caption_column}`), {d.crop}-cropped to "
                f"{d.size}x{d.size}{', flipped' if d.flip else ''}")
    held = [*d.holdout_pairs, *d.holdout_positions]
    return (f"t2i's procedural shapes world at {d.size}x{d.size}, {d.min_objects}-{d.max_objects} objects per "
            f"image, seed {d.seed}" + (f", never showing {', '.join(held)}" if held else ""))


def recipe(cfg: RunConfig, stable_diffusion: bool = False) -> dict:
    """The base recipe: what the model is, before the details of the full config. A Stable Diffusion start's
    UNet and text encoders are the folder's own."""
    start = cfg.train.init_from
    if stable_diffusion and start:
        unet = {"unet": f"the UNet2DConditionModel of {start}"}
        text = f"the CLIP of {start} (frozen)"
    else:
        unet = {"unet": cfg.model.unet, "unet_preset": cfg.model.preset}
        text = cfg.text.pretrained or (f"the text encoder of {start}" if start else
                                       "offline CLIP (tokenizer learned from the captions)")
    return {**unet, "resolution": cfg.data.size, **({"vae": cfg.model.vae} if cfg.model.vae else {}),
            "text_encoder": text, "prediction_type": cfg.noise.prediction_type, "steps": cfg.train.max_steps,
            **({"fine_tuned_from": start} if start else {})}


def write_model_card(folder: str | Path, cfg: RunConfig, final: str | Path | None = None,
                     stable_diffusion: bool = False) -> Path:
    """Write `{folder}/README.md` for an exported pipeline trained with `cfg`; `final`: where the folder will
    be once renamed into place (default: `folder`); `stable_diffusion`: the folder is a StableDiffusionPipeline's."""
    folder = Path(folder)
    latent = stable_diffusion or bool(cfg.model.vae)
    meta = {"library_name": "t2i", "pipeline_tag": "text-to-image",
            "tags": ["t2i", "text-to-image", "diffusers", "latent-space" if latent else "pixel-space",
                     *(["stable-diffusion"] if stable_diffusion else [])],
            "t2i_recipe": recipe(cfg, stable_diffusion), "t2i_data": data_description(cfg), "t2i_config": config_to_dict(cfg)}
    how = (f"fine-tuned from {cfg.train.init_from}" if cfg.train.init_from else "trained from scratch") + " with t2i"
    if stable_diffusion:
        what = [f"A Stable Diffusion pipeline (diffusers' StableDiffusionPipeline) {how}. Load it with",
                "`StableDiffusionPipeline.from_pretrained(PATH)` or `t2i.load_pipeline(PATH)`."]
    else:
        space = f"latent-space (in the latents of {cfg.model.vae})" if latent else "pixel-space"
        what = [f"A {space} text-to-image diffusion model {how}. Load it with",
                "`t2i.load_pipeline(PATH)` or `DiffusionPipeline.from_pretrained(PATH, trust_remote_code=True)`."]
    body = [f"# {Path(cfg.train.output_dir).name or 't2i'}", "", *what, "",
            f"Data: {data_description(cfg)}.", "",
            "The resolved training config is `t2i_config` above (and `train_config.yaml`).", "",
            EVAL_HEADING, "", NOT_EVALUATED.format(path=final or folder), ""]
    path = folder / CARD
    path.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body))
    return path


def add_evaluation(folder: str | Path, table: str) -> bool:
    """Put `table` under the card's evaluation heading (replacing an earlier one); False when the folder
    has no t2i model card."""
    path = Path(folder) / CARD
    if not path.is_file() or "library_name: t2i" not in path.read_text():
        return False
    text = path.read_text()
    head = text.split(EVAL_HEADING)[0] if EVAL_HEADING in text else text.rstrip() + "\n\n"
    path.write_text(f"{head}{EVAL_HEADING}\n\n{table.strip()}\n")
    return True
