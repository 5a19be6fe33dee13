"""Stable Diffusion 1.x, 2.x and XL folders in every t2i tool: the same image as diffusers' own pipeline, and each
tool once on each kind (tiny components in diffusers' test sizes, random weights, built and saved here)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sd_models
from t2i.cli import main
from t2i.pipeline import load_pipeline
from t2i.settings import generators

PROMPT = "a red circle above a blue square"
SIZE = dict(height=64, width=96)          # non-square: latents 32 x 48 (the tiny VAEs halve)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    """{kind: a tiny diffusers folder of that kind}, saved once per module."""
    root = tmp_path_factory.mktemp("sd")
    return {kind: sd_models.save(kind, root / kind) for kind in sd_models.KINDS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: load_pipeline(path) for kind, path in folders.items()}


def same_image(ref, pipe, **kwargs) -> float:
    """max |difference| between diffusers' image and t2i's, same components, prompt, seed and settings."""
    a = ref(**kwargs, generator=generators([3, 4][:len(kwargs["prompt"])]), output_type="np").images
    b = pipe(**kwargs, generator=generators([3, 4][:len(kwargs["prompt"])]), output_type="np").images
    assert a.shape == b.shape and a.std() > 0.01
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("kind", sd_models.KINDS)
def test_the_same_image_as_diffusers_own_pipeline(kind, folders, pipes):
    """Two prompts with negative prompts, 64x96, guided: t2i's image is diffusers' (float32 CPU)."""
    ref, pipe = sd_models.diffusers_pipeline(folders[kind]), pipes[kind]
    assert type(pipe.scheduler) is type(ref.scheduler)                          # the folder's own scheduler
    kwargs = dict(prompt=[PROMPT, "a green triangle"], negative_prompt=["blurry", "low quality"],
                  num_inference_steps=4, guidance_scale=5.0, **SIZE)
    assert same_image(ref, pipe, **kwargs) <= 1e-3
    if kind == "sdxl":  # no negative prompt: zeros (force_zeros_for_empty_prompt), at the native square size
        assert same_image(ref, pipe, prompt=[PROMPT], num_inference_steps=3, guidance_scale=4.0) <= 1e-3
    if kind == "sd1":   # clip skip, and a scheduler chosen by name: DPM-Solver++ without x0 thresholding
        # diffusers 0.42's own clip_skip reads text_encoder.text_model, which transformers 5 no longer has: give
        # it the states clip skip 1 means (the layer before the last, through the final layer norm) instead
        ids = ref.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            states = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            embeds = ref.text_encoder.final_layer_norm(states)
        kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", **SIZE)
        a = ref(prompt_embeds=embeds, generator=generators([3]), **kw).images
        b = pipe(PROMPT, clip_skip=1, generator=generators([3]), **kw).images
        assert np.abs(a - b).max() <= 1e-3
        from diffusers import DPMSolverMultistepScheduler
        ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config, algorithm_type="dpmsolver++")
        a = ref(prompt=PROMPT, num_inference_steps=3, guidance_scale=4.0, generator=generators([5]), output_type="np").images
        b = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, generator=generators([5]), output_type="np",
                 scheduler="dpm").images
        assert np.abs(a - b).max() <= 1e-3


def test_clip_skip_and_the_negative_prompt_change_the_image(pipes):
    pipe = pipes["sd1"]
    run = lambda **k: pipe(PROMPT, num_inference_steps=2, generator=generators([0]), output_type="np", **k).images  # noqa: E731
    plain = run()
    assert np.abs(plain - run(clip_skip=1)).max() > 1e-3
    assert np.abs(plain - run(negative_prompt="blurry")).max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip must be from 1 to"):
        run(clip_skip=5)


def test_folders_t2i_cannot_open_are_one_line(folders, tmp_path, capsys):
    """An inpainting UNet, SD3 and Flux folders, a missing component: what it is, and what t2i opens."""
    inpaint = Path(shutil.copytree(folders["sd1"], tmp_path / "inpaint"))
    config = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    no_vae = Path(shutil.copytree(folders["sd1"], tmp_path / "no-vae"))
    shutil.rmtree(no_vae / "vae")
    cases = {inpaint: "an inpainting UNet with 9 input channels", no_vae: "StableDiffusionPipeline folder without vae"}
    for cls, what in [("StableDiffusion3Pipeline", "Stable Diffusion 3"), ("FluxPipeline", "a Flux folder")]:
        other = tmp_path / cls
        other.mkdir()
        (other / "model_index.json").write_text(json.dumps({"_class_name": cls, "transformer": ["diffusers", "X"]}))
        cases[other] = what
    for path, what in cases.items():
        assert main(["generate", PROMPT, "--model", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert what in err and "t2i opens" in err or "copy the whole folder" in err
        assert len(err.strip().splitlines()) == 1, err
