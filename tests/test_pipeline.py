import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from t2i.pipeline import SCHEDULERS, T2IPipeline, make_scheduler, scheduler_name
from t2i.settings import min_inference_steps

from conftest import tiny_diffusers_unet, tiny_pipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_output_types_and_shapes(pipe):
    pil = pipe(["a red circle", "a blue square"], num_inference_steps=2, generator=gen(), num_images_per_prompt=2).images
    assert len(pil) == 4 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    arr = pipe("a red circle", num_inference_steps=2, generator=gen(), output_type="np", height=16, width=32).images
    assert arr.shape == (1, 16, 32, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe("a red circle", num_inference_steps=2, generator=gen(), output_type="pt").images
    assert pt.shape == (1, 3, 16, 16)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), pipe("a red circle", num_inference_steps=2, generator=gen(),
                                                               output_type="np").images)


def test_seed_determinism_and_per_image_generators(pipe):
    a = pipe("a red circle", num_inference_steps=2, generator=gen(5), output_type="np").images
    b = pipe("a red circle", num_inference_steps=2, generator=gen(5), output_type="np").images
    c = pipe("a red circle", num_inference_steps=2, generator=gen(6), output_type="np").images
    assert np.array_equal(a, b) and not np.allclose(a, c)
    # image i of a batch with generator list [g0, g1] equals the same seed run alone
    batch = pipe(["a blue square", "a red circle"], num_inference_steps=2, generator=[gen(9), gen(5)],
                 output_type="np").images
    assert np.allclose(batch[1], a[0], atol=1e-5)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["caption_dropout"] == 0.1
    assert list((tmp_path / "unet").glob("*.safetensors")) and list((tmp_path / "text_encoder").glob("*.safetensors"))
    again = T2IPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    assert np.array_equal(pipe("a red circle", generator=gen(), **kw).images,
                          again("a red circle", generator=gen(), **kw).images)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_and_prediction_type(name, prediction_type):
    pipe = tiny_pipeline(prediction_type)
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert scheduler_name(pipe.scheduler) == name
    steps = max(2, min_inference_steps(pipe.scheduler))
    out = pipe("a red circle", num_inference_steps=steps, generator=gen(), output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_guidance_one_is_the_plain_conditional_prediction(pipe):
    """guidance 1.0 must equal a hand-written loop on the conditional prediction alone."""
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    got = pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, generator=gen(), output_type="pt").images
    from t2i.text import encode_prompts
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    pipe.scheduler.set_timesteps(3)
    x = torch.randn((1, 3, 16, 16), generator=gen())
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.unet(x, t, enc.hidden_states, enc.attention_mask).sample
            x = pipe.scheduler.step(eps, t, x).prev_sample
    assert torch.allclose(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-6)
    guided = pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=gen(), output_type="pt").images
    assert not torch.allclose(got, guided, atol=1e-4)


def test_negative_prompt_changes_the_image(pipe):
    kw = dict(num_inference_steps=2, generator=None, output_type="np", guidance_scale=5.0)
    a = pipe("a red circle", **{**kw, "generator": gen()}).images
    b = pipe("a red circle", negative_prompt="a blue square", **{**kw, "generator": gen()}).images
    assert not np.allclose(a, b)


def test_callback_sees_every_step(pipe):
    seen = []
    pipe("a red circle", num_inference_steps=3, generator=gen(), callback=lambda i, t, x: seen.append((i, x.shape)))
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 3, 16, 16)


# -- bad input ------------------------------------------------------------------------------------

def test_bad_size_empty_prompts_and_unknown_scheduler(pipe):
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a red circle", height=15, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt list is empty"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match="unknown scheduler 'fast'; choose one of ddpm"):
        make_scheduler("fast", pipe.scheduler.config)


def test_too_long_prompt_warns_with_dropped_count(pipe):
    with pytest.warns(UserWarning, match=r"dropped the last \d+ tokens"):
        pipe("a red circle above a blue square to the right of a green triangle in the top left",
             num_inference_steps=2)


def test_guidance_without_caption_dropout_warns():
    pipe = tiny_pipeline(caption_dropout=0.0)
    with pytest.warns(UserWarning, match="without caption dropout"):
        pipe("a red circle", num_inference_steps=2, guidance_scale=3.0)


def test_broken_model_folders(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="no model_index.json"):
        T2IPipeline.from_pretrained(tmp_path)
    shutil.copytree(tmp_path / "ok", tmp_path / "no_unet")
    shutil.rmtree(tmp_path / "no_unet" / "unet")
    with pytest.raises(ValueError, match=r"missing component\(s\) \['unet'\]"):
        T2IPipeline.from_pretrained(tmp_path / "no_unet")
    shutil.copytree(tmp_path / "ok", tmp_path / "mismatch")
    cfg_path = tmp_path / "mismatch" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_channels"] = [16, 64]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="could not load the pipeline"):
        T2IPipeline.from_pretrained(tmp_path / "mismatch")


def test_bf16_autocast_keeps_latents_float32_and_stays_close(pipe):
    ref = pipe("a red circle", num_inference_steps=3, generator=gen(), output_type="pt").images
    seen = []
    pipe.autocast_dtype = torch.bfloat16
    out = pipe("a red circle", num_inference_steps=3, generator=gen(), output_type="pt",
               callback=lambda i, t, x: seen.append(x.dtype)).images
    assert set(seen) == {torch.float32} and out.dtype == torch.float32
    assert (out - ref).abs().mean() < 0.05 and not torch.equal(out, ref)


def test_guidance_is_uncond_plus_scale_times_cond_minus_uncond(pipe, monkeypatch):
    """A stub UNet predicts, at every pixel, the number of real tokens of its row's prompt: 2 for the empty
    prompt (start, end), 5 and 9 for the prompts. The scheduler must get uncond + s * (cond - uncond)."""
    def count_tokens(x, t, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        return (encoder_attention_mask.sum(1).to(x.dtype)[:, None, None, None].expand_as(x).clone(),)

    seen, step = [], pipe.scheduler.step

    def spy(model_output, timestep, sample, generator=None, **kwargs):
        seen.append(model_output.clone())
        return step(model_output, timestep, sample, generator=generator, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", count_tokens)
    monkeypatch.setattr(pipe.scheduler, "step", spy)
    prompts = ["a red circle", "a blue square above a green triangle"]
    cond, uncond = torch.tensor([5.0, 5.0, 9.0, 9.0]), 2.0
    for scale in (3.0, 0.5, 0.0):                 # every scale but 1 guides, those below 1 too
        seen.clear()
        pipe(prompts, num_inference_steps=2, guidance_scale=scale, num_images_per_prompt=2, generator=gen())
        assert len(seen) == 2
        for pred in seen:
            want = (uncond + scale * (cond - uncond))[:, None, None, None].expand(4, 3, 16, 16)
            assert torch.equal(pred, want), scale
    seen.clear()
    pipe(prompts, num_inference_steps=2, guidance_scale=1.0, generator=gen())  # unguided: cond alone
    assert torch.equal(seen[0], torch.tensor([5.0, 9.0])[:, None, None, None].expand(2, 3, 16, 16))


def test_a_folder_saved_with_the_old_caption_dropout_key_still_loads(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["uncond_dropout"] = index.pop("caption_dropout")       # as written before issue 9
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert T2IPipeline.from_pretrained(tmp_path).config.caption_dropout == 0.1


def test_prompt_tokens_are_the_tokens_the_pipeline_encodes(pipe):
    from t2i.text import encode_prompts
    prompts = ["a red circle", "a blue square above a green triangle in the top left"]   # the second is cut
    with pytest.warns(UserWarning, match="dropped the last 1 tokens"):
        encoded = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # sampling warns, not the word check
        assert pipe.prompt_tokens(prompts) == encoded and encoded[1][-2] == "top</w>"


def test_saved_weights_get_the_mode_of_every_other_file(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    config_mode = (tmp_path / "unet" / "config.json").stat().st_mode & 0o777
    weights = sorted(tmp_path.rglob("*.safetensors"))
    assert len(weights) == 2 and all(w.stat().st_mode & 0o777 == config_mode for w in weights)


def test_unet_with_added_conditioning_is_refused_up_front(pipe):
    unet = tiny_diffusers_unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                               projection_class_embeddings_input_dim=32 + 6 * 8)   # SDXL: pooled text + 6 time ids
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        T2IPipeline(unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


def test_steps_beyond_the_scheduler_are_refused_before_sampling(pipe):
    with pytest.raises(ValueError, match="num_inference_steps must be between 2 and 999 for DDPMScheduler .*got 0"):
        pipe("a red circle", num_inference_steps=0)
    with pytest.raises(ValueError, match="between 2 and 999 .*got 1000"):
        pipe("a red circle", num_inference_steps=1000)
    with pytest.raises(ValueError, match="positive multiples of 2"):
        pipe("a red circle", height=0, num_inference_steps=2)


def test_prompt_embeds_latents_and_step_end_callback_as_in_diffusers(pipe):
    from t2i.text import encode_prompts
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=2.0)
    ref = pipe("a red circle", negative_prompt="a blue square", generator=gen(3), **kw).images
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a blue square"])
    embeds = pipe(prompt_embeds=cond.hidden_states, prompt_attention_mask=cond.attention_mask,
                  negative_prompt_embeds=uncond.hidden_states, negative_prompt_attention_mask=uncond.attention_mask,
                  generator=gen(3), **kw).images
    assert np.allclose(ref, embeds, atol=1e-6)
    # the mask is honoured: all-ones (the default) attends to padding and gives another image
    unmasked = pipe(prompt_embeds=cond.hidden_states, negative_prompt_embeds=uncond.hidden_states, generator=gen(3), **kw).images
    assert not np.allclose(ref, unmasked, atol=1e-4)
    # latents= is the initial noise a generator would draw
    g = gen(3)
    noise = torch.randn((1, 3, 16, 16), generator=g)  # the generator goes on to draw the scheduler's noise
    assert np.allclose(ref, pipe("a red circle", negative_prompt="a blue square", latents=noise, generator=g, **kw).images,
                       atol=1e-6)
    # callback_on_step_end sees the named tensors and may replace them; the old callback still runs
    seen, old = [], []

    def on_step_end(p, i, t, tensors):
        seen.append((p is pipe, i, sorted(tensors), tensors["prompt_embeds"].shape[0]))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe("a red circle", generator=gen(3), callback=lambda i, t, x: old.append(i), callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw).images
    assert seen == [(True, 0, ["latents", "prompt_embeds"], 2), (True, 1, ["latents", "prompt_embeds"], 2)] and old == [0, 1]
    assert np.allclose(out, 0.5)  # zero latents after the last step decode to mid grey
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a red circle", callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["noise"], **kw)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe("a red circle", prompt_embeds=cond.hidden_states, **kw)


def test_diffusion_pipeline_from_pretrained_loads_an_exported_folder(pipe, tmp_path):
    from diffusers import DiffusionPipeline
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers' own one-line advice
        DiffusionPipeline.from_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is T2IPipeline
    again = T2IPipeline.from_pretrained(tmp_path)  # no flag needed: the shim is t2i's own import
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    assert np.array_equal(pipe("a red circle", generator=gen(), **kw).images, again("a red circle", generator=gen(), **kw).images)


def test_the_shipped_model_loads_through_diffusers_generic_loader():
    """The folder `t2i generate` uses out of the box is itself a diffusers custom pipeline."""
    from diffusers import DiffusionPipeline
    from t2i.pipeline import DEFAULT_MODEL
    loaded = DiffusionPipeline.from_pretrained(DEFAULT_MODEL, trust_remote_code=True)
    assert type(loaded) is T2IPipeline and loaded.unet.config.sample_size == 32


def test_a_one_channel_unet_makes_grayscale_images_and_one_that_changes_the_channels_is_refused(pipe):
    """1 channel in and out: grayscale ("L") images, not PIL's 'Cannot handle this data type'; a UNet whose output
    has other channels than its input (3 in, 1 out) is refused when the pipeline is built."""
    from t2i.pipeline import T2IPipeline
    gray = T2IPipeline(tiny_diffusers_unet(in_channels=1, out_channels=1), pipe.text_encoder, pipe.tokenizer,
                       pipe.scheduler)
    gray.set_progress_bar_config(disable=True)
    images = gray(["a red circle"] * 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [(im.mode, im.size) for im in images] == [("L", (16, 16))] * 2
    assert gray("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
    with pytest.raises(ValueError, match=r"^the UNet predicts 1 channel for an input of 3: a denoiser predicts as "
                                         r"many channels as it takes \(out_channels=in_channels\)"):
        T2IPipeline(tiny_diffusers_unet(out_channels=1), pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


def test_a_latent_unet_without_a_vae_is_refused_when_built_or_loaded(pipe, tmp_path, capsys):
    """Issue 25 item 18 (latent half): a 4-channel UNet with no VAE denoised in pixel space and its latents were
    saved as an RGBA PNG; now the image space refuses it in one line, when the pipeline is built and when a
    folder is loaded, and with its VAE the same UNet makes RGB images."""
    from sd_models import vae

    from t2i.cli import main
    said = (r"^the UNet denoises 4 channels and the pipeline has no VAE to decode them: pixels are 1 channel "
            r"\(grayscale\) or 3 \(RGB\); give the pipeline the VAE the UNet was trained with \(vae=\.\.\., a latent "
            r"image space\), or use a UNet of 1 or 3 channels$")
    latent = tiny_diffusers_unet(in_channels=4, out_channels=4)
    with pytest.raises(ValueError, match=said):
        T2IPipeline(latent, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    with_vae = T2IPipeline(latent, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, vae=vae())
    with_vae.set_progress_bar_config(disable=True)
    assert with_vae("a red circle", num_inference_steps=2).images[0].mode == "RGB"
    with_vae.save_pretrained(tmp_path / "model")
    index = tmp_path / "model" / "model_index.json"                 # the VAE taken out of the folder
    index.write_text(json.dumps({k: v for k, v in json.loads(index.read_text()).items() if k != "vae"}))
    shutil.rmtree(tmp_path / "model" / "vae")
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(tmp_path / "model"), "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"t2i generate: error: {tmp_path / 'model'}: " + said[1:-1].replace("\\", ""), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

def test_what_makes_nan_is_bounded_and_a_nan_image_is_refused_not_saved_black(pipe, model_dir, tmp_path, capsys):
    """noise.snr_shift=1e-3 and guidance 1e308 are refused up front; NaN text-encoder or UNet weights stop the
    pipeline in one line instead of returning black images (rc 0)."""
    from safetensors.torch import load_file, save_file

    from t2i.cli import main
    from t2i.config import load_config
    from t2i.settings import SamplingSettings
    with pytest.raises(ValueError, match=r"noise.snr_shift must be from 0.1 to 100"):
        load_config(None, ["noise.snr_shift=1e-3"])
    with pytest.raises(ValueError, match=r"^guidance must be a finite number from -100 to 100 \(1: none"):
        SamplingSettings(guidance=1e308).check()
    assert main(["generate", "x", "--model", str(model_dir), "--guidance", "1e308", "--out", str(tmp_path)]) == 2
    assert "--guidance must be a finite number from -100 to 100" in capsys.readouterr().err
    with torch.no_grad():
        pipe.unet.conv_out.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^sampling returned NaN or inf for images 0, 1 of 2: lower the guidance"):
        pipe(["a red circle", "a blue square"], num_inference_steps=2)
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    save_file({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in load_file(weights).items()},
              weights)
    assert main(["generate", "x", "--model", str(broken), "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "t2i generate: error: the text encoder returned NaN or inf for these prompts: its weights are damaged; copy the "
        "pipeline folder again, or export it again from its run")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
