"""Stable Diffusion 1.x, 2.x and XL folders in every t2i tool: the same image as diffusers' own pipeline, and each
tool once on each kind (tiny components in diffusers' test sizes, random weights, built and saved here)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sd_models
from t2i.attention import AttentionRecorder
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
    run = lambda **k: pipe(PROMPT, num_inference_steps=3, generator=generators([0]), output_type="np", **k).images  # noqa: E731
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


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_generate_writes_pngs_that_regenerate(kind, folders, tmp_path):
    """The PNG's metadata (non-square, the folder's own scheduler by name) regenerates the same image."""
    assert main(["generate", PROMPT, "--model", folders[kind], "--steps", "3", "--seed", "5", "--negative", "blurry",
                 "--height", "64", "--width", "96", "--upscale", "1", "--out", str(tmp_path / "a")]) == 0
    png = tmp_path / "a" / "a-red-circle-above-a-blue-square-5.png"
    meta = Image.open(png).text
    assert Image.open(png).size == (96, 64) and meta["scheduler"] == {"sd1": "pndm", "sdxl": "euler"}[kind]
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--steps", meta["steps"], "--seed", meta["seed"],
                 "--guidance", meta["guidance"], "--scheduler", meta["scheduler"], "--negative", meta["negative_prompt"],
                 "--height", meta["height"], "--width", meta["width"], "--upscale", "1",
                 "--out", str(tmp_path / "b")]) == 0
    assert Image.open(tmp_path / "b" / png.name).tobytes() == Image.open(png).tobytes()


@pytest.mark.parametrize("kind", sd_models.KINDS)
def test_heatmaps_per_word_step_and_resolution_on_batches(kind, pipes):
    """Two prompts x two images at 64x96: maps at every cross-attention resolution, per step, that sum to 1 over
    the prompt's tokens; recording leaves the image as it was."""
    pipe = pipes[kind]
    recorder = AttentionRecorder(timeline=True)
    kwargs = dict(prompt=[PROMPT, "a green triangle"], num_images_per_prompt=2, num_inference_steps=3,
                  output_type="np", **SIZE)
    out = pipe(**kwargs, generator=generators(range(4)), record_attention=recorder)
    grids = {"sd1": [(16, 24), (32, 48)], "sd2": [(16, 24)], "sdxl": [(16, 24)]}[kind]
    assert recorder.grids == grids and out.attention.image_size == (64, 96)
    maps = out.attention
    assert maps.maps.shape[0] == 4 and maps.maps.shape[-2:] == grids[-1]
    steps = len(pipe.scheduler.timesteps)                                      # PNDM (sd1) takes one more
    assert maps.timeline.shape[0] == steps and maps.steps == list(range(steps))  # one frame per step
    assert maps.prompts[2] == "a green triangle" and "circle" in maps.words(0)
    total = maps.maps.sum(1)                                                   # over the real tokens only
    assert total.max() <= 1 + 1e-4 and total.min() > 0            # padding (not masked in SD) takes the rest
    word = maps.word_maps(1, ["circle"], size="image")["circle"]
    assert word.shape == (64, 96)
    plain = pipe(**kwargs, generator=generators(range(4))).images
    assert np.abs(plain - out.images).max() < 1e-4
    if kind == "sd1":  # each resolution alone
        assert recorder.heatmaps(resolutions=[(32, 48)]).maps.shape[-2:] == (32, 48)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_heatmap_and_effect_commands(kind, folders, tmp_path):
    assert main(["heatmap", PROMPT, "--model", folders[kind], "--steps", "3", "--words", "red,square",
                 "--height", "64", "--width", "96", "--out", str(tmp_path / "h")]) == 0
    assert Image.open(tmp_path / "h" / "image.png").size[0] >= 96 and (tmp_path / "h" / "word-red.png").exists()
    assert main(["effect", PROMPT, "--model", folders[kind], "--steps", "3", "--words", "red", "--weight", "0",
                 "--out", str(tmp_path / "e")]) == 0
    effects = json.loads((tmp_path / "e" / "effects.json").read_text())
    assert effects["words"]["red"]["mean"] > 0                                 # silencing "red" changed the image


@pytest.mark.parametrize("kind", sd_models.KINDS)
def test_word_weights_change_the_image_and_weight_one_does_not(kind, pipes):
    pipe = pipes[kind]
    run = lambda w: pipe(PROMPT, num_inference_steps=3, generator=generators([1]), output_type="np",  # noqa: E731
                         word_weights=w).images
    plain = run(None)
    assert np.array_equal(plain, run({"red": 1.0}))
    assert np.abs(plain - run({"red": 0.0, "square": 2.0})).max() > 1e-4


@pytest.mark.parametrize("kind", sd_models.KINDS)
def test_layout_guidance_moves_a_word_into_its_box(kind, pipes):
    """Boxes are fractions of the image whatever its size: on a 64x96 image, guidance lowers the energy."""
    from t2i.settings import GuideSettings
    pipe = pipes[kind]
    out = pipe(PROMPT, num_inference_steps=4, generator=generators([2]), output_type="np", **SIZE,
               layout={"circle": (0.0, 0.0, 0.3, 0.5)}, excite=["square"],
               guide=GuideSettings(fraction=0.5, iterations=3, step_size=0.5))
    energies = [e for step in out.guidance for e in step["layout"]]
    assert len(out.guidance) == 2 and energies[-1] < energies[0]
    plain = pipe(PROMPT, num_inference_steps=4, generator=generators([2]), output_type="np", **SIZE).images
    assert np.abs(plain - out.images).max() > 1e-4


def test_layout_and_guide_options_on_the_command_line(folders, tmp_path):
    assert main(["generate", PROMPT, "--model", folders["sd2"], "--steps", "3", "--layout", "circle=0,0,0.5,0.5",
                 "--excite", "square", "--height", "64", "--width", "96", "--out", str(tmp_path)]) == 0
    meta = Image.open(next(tmp_path.glob("*.png"))).text
    assert json.loads(meta["layout"]) == {"circle": [0, 0, 0.5, 0.5]} and json.loads(meta["excite"]) == ["square"]


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_the_explorer_offers_the_models_sizes(kind, folders, tmp_path):
    from t2i.explorer import Explorer, Request
    explorer = Explorer([folders[kind]], files_dir=tmp_path)
    r = explorer.generate(Request(PROMPT, steps=3, num_images=1))
    assert r.images[0].size == (64, 64) and r.previews.shape == (3, 1, 3, 64, 64)   # native: 32 latents x 2
    assert r.heatmaps["all"].image_size == (64, 64) and explorer.above_native(r) == ""
    pipe = explorer.pipeline(explorer.default_model)
    assert explorer.sampling_limits(pipe).max_side == 128                     # 1.5x 64 is less than 128
    with pytest.raises(ValueError, match="multiple of 4"):
        explorer.check(Request(PROMPT, size=66))
    changed, effect, weights = explorer.reweight(r, "red", 0.0)
    assert weights == {"red": 0.0} and changed.size == effect.size


def test_info_names_the_space_and_encoders_and_no_third_party_warning_reaches_the_user(folders):
    """`t2i info` in a fresh process with every warning shown (python -W default): nothing on stderr."""
    for kind in ("sd1", "sdxl"):
        done = subprocess.run([sys.executable, "-W", "default", "-m", "t2i.cli", "info", folders[kind]],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert "latents of a VAE (AutoencoderKL), 4 channels, 2x smaller" in done.stdout
        assert ("two CLIP text encoders (SDXL)" if kind == "sdxl" else "padding not masked") in done.stdout
        assert "images: 64 px native, height and width multiples of 4" in done.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_runs_the_unet_under_autocast_and_stays_close(precision, folders, tmp_path):
    """--precision bf16/fp16: the UNet under autocast (the PNG says which), the latents and the VAE in float32."""
    images = {}
    for p in ("fp32", precision):
        assert main(["generate", PROMPT, "--model", folders["sd1"], "--steps", "3", "--precision", p, "--upscale", "1",
                     "--out", str(tmp_path / p)]) == 0
        png = Image.open(next((tmp_path / p).glob("*.png")))
        assert png.text["precision"] == p
        images[p] = np.asarray(png).astype(int)
    differ = np.abs(images["fp32"] - images[precision]).max()
    assert 0 < differ <= 8                                                   # uint8 steps


def test_an_fp16_vae_that_says_it_overflows_decodes_in_float32(pipes):
    """SDXL's VAE overflows in fp16 (force_upcast): t2i decodes it in float32 and leaves it in fp16."""
    import copy

    from t2i.image_space import LatentSpace
    vae16 = copy.deepcopy(pipes["sdxl"].vae).to(torch.float16)
    vae32 = copy.deepcopy(vae16).float()                                     # the same fp16-rounded weights
    z = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(0))
    assert vae16.config.force_upcast
    assert torch.equal(LatentSpace(vae16).decode(z), LatentSpace(vae32).decode(z)) and vae16.dtype == torch.float16


def test_evaluate_scores_given_prompts_and_a_hub_name_out_of_reach_is_one_line(folders, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "--model", folders["sd1"], "--num-prompts", "1"]) == 2
    assert "scores models of t2i's shapes world" in capsys.readouterr().err
    assert main(["evaluate", "--model", folders["sd1"], "--prompts", PROMPT, "a green triangle", "--steps", "3",
                 "--json", str(tmp_path / "f.json")]) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    assert [r["word"] for r in result["rows"]] == ["red", "circle", "above", "blue", "square", "green", "triangle"]
    assert all(-1 <= r["attention"] <= 1 and r["effect"] > 0 for r in result["rows"])
    assert "| mean |" in capsys.readouterr().out
    assert main(["info", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "hub is unreachable and the local cache has no copy" in err and len(err.strip().splitlines()) == 1


def test_an_sdxl_pipeline_saved_by_t2i_loads_back_the_same(pipes, tmp_path):
    """save_pretrained writes a t2i folder with the VAE, both encoders and force_zeros_for_empty_prompt."""
    pipes["sdxl"].save_pretrained(tmp_path)
    again = load_pipeline(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    run = lambda p: p(PROMPT, num_inference_steps=3, generator=generators([0]), output_type="np").images  # noqa: E731
    assert type(again.conditioning).__name__ == "SDXLText" and np.array_equal(run(pipes["sdxl"]), run(again))


def test_a_prompt_past_77_tokens_is_said_once_on_sdxl(pipes):
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipes["sdxl"](" ".join(["red circle"] * 40), num_inference_steps=2, generator=generators([0]))
    cut = [w for w in seen if "dropped the last" in str(w.message)]
    assert len(cut) == 1, [str(w.message) for w in seen]


@pytest.mark.parametrize("kind", sd_models.KINDS)
def test_a_silenced_word_leaves_no_trace_on_stable_diffusion(kind, pipes):
    """Weight 0 takes the word out of CLIP's causal mixing (and SDXL's pooled text) as well as out of the UNet's
    cross-attention: silenced, 'a red circle' and 'a blue circle' draw the same image; in the cross-attention
    alone they do not."""
    pipe = pipes[kind]
    prompts, weights = ["a red circle", "a blue circle"], [{"red": 0.0}, {"blue": 0.0}]
    run = lambda **kw: pipe(prompts, num_inference_steps=3, generator=generators([4, 4]), output_type="np",  # noqa: E731
                            guidance_scale=5.0, **kw).images
    silenced = run(word_weights=weights)
    np.testing.assert_allclose(silenced[0], silenced[1], atol=1e-5)
    plain, old = run(), run(word_weights=weights, reweight_text=False)
    assert np.abs(plain[0] - plain[1]).max() > 1e-4 and np.abs(old[0] - old[1]).max() > 1e-5
