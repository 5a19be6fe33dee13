"""Training in a VAE's latents (model.vae), a diffusers UNet (model.unet=diffusers) and fine-tuning a Stable
Diffusion folder (train.init_from): each trains, resumes bit for bit and exports a folder t2i (and, for diffusers
UNets in latents, diffusers itself) opens. Tiny VAEs and SD folders in diffusers' test sizes, built here."""
import json
import shutil

import pytest
import sd_models
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from t2i import checkpoint as ckpt
from t2i.pipeline import load_pipeline
from t2i.train import train

LATENT = ["data.size=32", "train.max_steps=4", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny AutoencoderKL (2x smaller latents) and tiny SD 1.x and 2.x folders."""
    root = tmp_path_factory.mktemp("sd")
    sd_models.vae().save_pretrained(root / "vae")
    return {"vae": str(root / "vae"), "sd1": sd_models.save("sd1", root / "sd1"), "sd2": sd_models.save("sd2", root / "sd2"),
            "sdxl": sd_models.save("sdxl", root / "sdxl")}


def same_checkpoints(a, b, names=("unet", "ema", "optimizer")):
    for name in names:
        wa, wb = (load_file(str(p / f"{name}.safetensors")) for p in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


def test_a_t2i_unet_trains_in_a_vaes_latents_and_every_tool_opens_it(tmp_path, folders):
    exported = train(tiny_config(tmp_path / "run", f"model.vae={folders['vae']}", *LATENT))
    assert (exported / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((exported / "unet" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (4, 4, 16)  # 32 px / 2
    card = (exported / "README.md").read_text()
    assert "latent-space" in card and folders["vae"] in card
    pipe = load_pipeline(exported)
    assert pipe.image_space.kind == "latents" and pipe.native_size == 32
    assert pipe.conditioning.mask_padding  # t2i's own text conditioning, as it was trained
    out = pipe(["a red circle"], num_inference_steps=2, record_attention=True, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    maps = out.attention.word_maps(0, size=(32, 32))
    assert "circle" in maps and maps["circle"].shape[-2:] == (32, 32)


def test_an_autoencoder_tiny_works_as_the_vae(tmp_path):
    """AutoencoderTiny (TAESD) encodes to a point (std 0) and has no latent_dist: its latents train as well."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    exported = train(tiny_config(tmp_path / "run", f"model.vae={tmp_path / 'taesd'}", *LATENT))
    pipe = load_pipeline(exported)
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.unet.config.sample_size == 16
    assert pipe(["a red circle"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_latent_training_resumes_bit_for_bit(tmp_path, folders):
    straight = tiny_config(tmp_path / "a", f"model.vae={folders['vae']}", *LATENT)
    train(straight)
    broken = tiny_config(tmp_path / "b", f"model.vae={folders['vae']}", *LATENT)
    assert train(broken, stop_at=2) is None
    train(broken, resume="latest")
    same_checkpoints(tmp_path / "a" / "checkpoint-0000004", tmp_path / "b" / "checkpoint-0000004")


@pytest.mark.filterwarnings("ignore:flip=True mirrors images")  # the shapes folder's captions say left and right
def test_latent_training_on_a_folder_encodes_once_and_resumes_bit_for_bit(tmp_path, folders, monkeypatch):
    """A folder's latents are encoded once into the cache beside it; training from the cache resumes bit for bit and
    learns what encoding every step learns (the same draws from the same distributions, up to float sums)."""
    from t2i.data.shapes import ShapesConfig, write_image_folder
    data = write_image_folder(ShapesConfig(size=32), 12, tmp_path / "images", progress=False)
    folder = [f"model.vae={folders['vae']}", "data.kind=folder", f"data.root={data}", "data.flip=true", *LATENT]
    train(tiny_config(tmp_path / "a", *folder))
    entries = list((data / ".t2i-latents").rglob("*.safetensors"))
    assert len(entries) == 12
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    b = tiny_config(tmp_path / "b", *folder)
    assert train(b, stop_at=2) is None
    train(b, resume="latest")
    same_checkpoints(tmp_path / "a" / "checkpoint-0000004", tmp_path / "b" / "checkpoint-0000004")
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps  # encoded once, by the first run
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    train(tiny_config(tmp_path / "c", *folder, "data.latent_cache=off"))  # YAML reads off as false: still off
    assert not list((tmp_path / "cwd").iterdir())  # no cache folder named "no" where it ran
    cached, encoded = (load_file(str(tmp_path / r / "checkpoint-0000004" / "unet.safetensors")) for r in "ac")
    assert all(torch.allclose(cached[k], encoded[k], atol=1e-4) for k in cached)
    # t2i evaluate scores it on the world the folder was drawn from (make-dataset's shapes_world.json)
    from t2i.evaluate import EvalConfig, evaluate
    report = evaluate(load_pipeline(tmp_path / "a" / "pipeline"), EvalConfig(num_prompts=1, images_per_prompt=1, steps=2,
                                                                           calibration_prompts=1, effect_prompts=0))
    assert "shapes_world.json" in report.world["source"] and report.world["size"] == 32


def test_stable_diffusions_text_states_are_read_unmasked_in_training():
    """A diffusers UNet in latents exports a StableDiffusionPipeline, which reads every token: training does too."""
    from t2i.conditioning import CLIPText
    from t2i.text import TextStates
    pipe = sd_models.sd1()
    captions = ["a red circle", "a photo of an astronaut riding a horse on the moon"]
    for trainable in (True, False):
        states, mask = TextStates(pipe.tokenizer, pipe.text_encoder, trainable, mask_padding=False)(captions, "cpu")
        assert mask is None
        assert torch.equal(states, CLIPText(pipe.tokenizer, pipe.text_encoder).encode(captions).hidden_states)
    states, mask = TextStates(pipe.tokenizer, pipe.text_encoder, False)(captions, "cpu")
    assert mask is not None and not torch.equal(states, CLIPText(pipe.tokenizer, pipe.text_encoder).encode(captions).hidden_states)


def test_a_diffusers_unet_in_latents_exports_a_folder_diffusers_opens_and_draws_as_t2i_does(tmp_path, folders):
    from diffusers import StableDiffusionPipeline
    exported = train(tiny_config(tmp_path / "run", f"model.vae={folders['vae']}", "model.unet=diffusers", *LATENT))
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and not (exported / "t2i_pipeline.py").exists()
    theirs = StableDiffusionPipeline.from_pretrained(exported)  # no trust_remote_code
    theirs.set_progress_bar_config(disable=True)
    ours = load_pipeline(exported)
    assert not ours.conditioning.mask_padding
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="np")
    a = theirs("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() < 1e-5
    assert "StableDiffusionPipeline.from_pretrained" in (exported / "README.md").read_text()


def test_a_diffusers_unet_trains_in_pixels_too(tmp_path):
    exported = train(tiny_config(tmp_path / "run", "model.unet=diffusers", "train.max_steps=2"))
    pipe = load_pipeline(exported)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.image_space.kind == "pixels"
    assert pipe(["a red circle"], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_fine_tuning_stable_diffusion_trains_its_unet_alone_resumes_exactly_and_exports_its_kind(tmp_path, folders,
                                                                                                 kind):
    from diffusers import DiffusionPipeline
    start = tmp_path / "start"
    shutil.copytree(folders[kind], start)
    overrides = [f"train.init_from={start}", *LATENT, "train.caption_dropout=0.5"]
    exported = train(tiny_config(tmp_path / "a", *overrides))
    b = tiny_config(tmp_path / "b", *overrides)
    assert train(b, stop_at=2) is None
    start.rename(tmp_path / "moved")  # a resume needs no init_from folder
    train(b, resume="latest")
    same_checkpoints(tmp_path / "a" / "checkpoint-0000004", tmp_path / "b" / "checkpoint-0000004")
    saved = json.loads((tmp_path / "a" / "checkpoint-0000004" / "state.json").read_text())["config"]
    assert saved["noise"]["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    assert saved["noise"]["beta_schedule"] == "scaled_linear" and saved["text"]["train"] is False
    import yaml  # the model card names what the model is: the start's
    recipe = yaml.safe_load((exported / "README.md").read_text().split("---")[1])["t2i_recipe"]
    assert recipe["text_encoder"] == f"the CLIP of {start} (frozen)" and "unet_preset" not in recipe

    theirs, tuned = DiffusionPipeline.from_pretrained(tmp_path / "moved"), DiffusionPipeline.from_pretrained(exported)
    assert type(tuned) is type(theirs) and type(tuned.scheduler) is type(theirs.scheduler)
    for part in ("text_encoder", "vae", *(["text_encoder_2"] if kind == "sdxl" else [])):  # frozen
        before, after = getattr(theirs, part).state_dict(), getattr(tuned, part).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), part
    before, after = theirs.unet.state_dict(), tuned.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert load_pipeline(exported)(["a red circle"], num_inference_steps=3, height=32, width=32).images[0].size == (32, 32)


def test_fine_tuning_runs_in_bf16_with_gradient_checkpointing(tmp_path, folders, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel
    switched, real = [], UNet2DConditionModel.enable_gradient_checkpointing
    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing",
                        lambda self, *a, **k: (switched.append(True), real(self, *a, **k)))
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)  # a process holds one precision: this test's is bf16
    try:
        exported = train(tiny_config(tmp_path / "run", f"train.init_from={folders['sd1']}", "data.size=32",
                                     "train.max_steps=2", "train.mixed_precision=bf16",
                                     "train.gradient_checkpointing=true"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert switched and "in bf16 precision" in capsys.readouterr().out
    assert load_pipeline(exported)(["a red circle"], num_inference_steps=3, height=32, width=32).images[0].size == (32, 32)


def test_what_a_stable_diffusion_start_cannot_honour_is_one_line(tmp_path, folders):
    cases = {
        (f"train.init_from={folders['sd1']}", "text.train=true"): "text.train=true",
        (f"train.init_from={folders['sd1']}", f"model.vae={folders['vae']}"): "its own VAE",
        (f"train.init_from={folders['sd1']}", "data.size=30"): "data.size=30 must be a multiple of 4",
        (f"model.vae={folders['vae']}", "data.size=34"): "data.size=34 must be a multiple of 4",
        (f"model.vae={folders['vae']}", "train.grounding_weight=0.1"): "grounding_weight",
        (f"model.vae={tmp_path / 'nowhere'}",): "no such folder",
        ("model.unet=diffusers", "model.pos_embed=true"): "model.pos_embed is T2IUNet's",
        ("model.unet=unet",): "model.unet must be",
    }
    damaged = tmp_path / "damaged-vae"
    shutil.copytree(folders["vae"], damaged)
    weights = damaged / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases[(f"model.vae={damaged}",)] = "could not load the VAE"
    for i, (overrides, message) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            train(tiny_config(tmp_path / f"run{i}", "train.max_steps=2", *overrides))
        assert not ckpt.checkpoints(tmp_path / f"run{i}")


def test_two_processes_fine_tune_stable_diffusion_from_one_latent_cache(tmp_path, folders):
    """accelerate with two processes (gloo on the CPU): the main one encodes the cache, the other reads it, and
    the fine-tune exports a folder diffusers opens."""
    import os
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline
    from conftest import TINY_RUN

    from t2i.data.shapes import ShapesConfig, write_image_folder
    data = write_image_folder(ShapesConfig(size=32), 8, tmp_path / "images", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "t2i.cli", "train", *TINY_RUN,
           f"train.init_from={folders['sd1']}", "data.kind=folder", f"data.root={data}", "data.size=32",
           "train.batch_size=2", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((data / ".t2i-latents").rglob("*.safetensors"))) == 8
    assert run.stderr.count("latents: 100%") == 1  # one progress bar: the main process's
    StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
