"""The explorer behind `t2i serve`, its handlers as plain functions (no server, no browser): limits,
generate with everything the page draws, words, steps, resolutions, weights and the downloads."""
import numpy as np
import pytest
import torch
from conftest import tiny_diffusers_unet, tiny_pipeline
from PIL import Image

from t2i.explorer import ALL, SHIPPED, Explorer, Limits, Request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def explorer(model, tmp_path_factory):
    ex = Explorer([model], limits=Limits(max_steps=6, max_images=2, max_side=32, max_prompt_chars=40, kept_results=2))
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def result(explorer):
    return explorer.generate(Request("a red circle", steps=3, num_images=2, seed=5))


def test_generate_keeps_what_the_page_draws(explorer, result):
    assert len(result.images) == 2 and result.images[0].size == (16, 16)
    assert result.words == ["a", "red", "circle"] and result.filters == [ALL]
    assert result.previews.shape == (3, 2, 3, 16, 16) and result.heatmaps[ALL].timeline.shape[0] == 3
    assert result.request.size == 16 and result.request.model == explorer.default_model
    direct = tiny_pipeline()("a red circle", num_inference_steps=3, generator=[torch.Generator().manual_seed(6)],
                             output_type="np")
    assert np.abs(np.asarray(result.images[1], np.float32) / 255 - direct.images[0]).max() <= 1 / 255 + 1e-6


def test_downloads_are_the_png_with_its_metadata_and_the_heatmaps(explorer, result):
    from t2i.attention import Heatmaps
    png = Image.open(result.files["png:1"])
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "6" and png.text["steps"] == "3"
    assert png.text["scheduler"] == "ddpm" and png.text["model"] == explorer.default_model
    assert Heatmaps.load(result.files["heatmaps"]).maps.shape == result.heatmaps[ALL].maps.shape
    folders = [explorer.generate(Request("a red circle", steps=2)).files["heatmaps"].parent for _ in range(3)]
    assert not folders[0].exists() and folders[2].exists()              # only kept_results folders stay


def test_word_step_and_grid_views_draw_from_the_result(explorer, result):
    red, circle = explorer.word_overlay(result, "red"), explorer.word_overlay(result, "circle")
    assert red.size == (256, 256) and red.tobytes() != circle.tobytes()
    first, first_map = explorer.step_view(result, 0, "red", index=1)
    last, last_map = explorer.step_view(result, 2, "red", index=1)
    assert first.tobytes() != last.tobytes() and first_map.tobytes() != last_map.tobytes()
    assert explorer.step_view(result, 0)[1] is None                       # no word chosen: x0 only
    assert explorer.grid(result, 1).width > 3 * 128
    for call, message in [(lambda: explorer.step_view(result, 3, "red"), "step must be from 0 to 2"),
                          (lambda: explorer.word_overlay(result, "blue"), "not a word"),
                          (lambda: explorer.word_overlay(result, "red", index=2), "image 2 is not one of the 2"),
                          (lambda: explorer.grid(result, 0, "4x4"), "unknown resolution")]:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_weight_regenerates_from_the_same_seed_and_shows_its_effect(explorer, model):
    result = explorer.generate(Request("a red circle", steps=3, seed=2))
    changed, effect, used = explorer.reweight(result, "red", 0.0)
    assert used == {"red": 0.0} and changed.tobytes() != explorer.image(result).tobytes()
    direct = tiny_pipeline()("a red circle", num_inference_steps=3, word_weights={"red": 0.0},
                             generator=[torch.Generator().manual_seed(2)], output_type="np").images[0]
    assert np.abs(np.asarray(changed.resize((16, 16), Image.NEAREST), np.float32) / 255 - direct).max() <= 1 / 255
    assert explorer.reweight(result, "circle", 2.0)[2] == {"red": 0.0, "circle": 2.0}   # weights accumulate
    explorer.reweight(result, "circle", 1.0)
    same, _, used = explorer.reweight(result, "red", 1.0)
    assert used == {} and same.tobytes() == explorer.image(result).tobytes()
    with pytest.raises(ValueError, match="from 0 to 3"):
        explorer.reweight(result, "red", 3.5)


@pytest.mark.parametrize("request_, message", [
    (Request(""), "type a prompt"),
    (Request("x" * 41), "at most 40"),
    (Request("a red circle", steps=2, negative="y" * 41), "negative prompt has 41 characters"),
    (Request("a red circle", steps=7), "steps must be a whole number from 2 to 6"),
    (Request("a red circle", steps=2.5), "steps must be a whole number"),
    (Request("a red circle", steps=2, num_images=3), "images must be a whole number from 1 to 2"),
    (Request("a red circle", steps=2, size=15), "size must be a multiple of 2"),
    (Request("a red circle", steps=2, size=64), "from 2 to 32 px"),
    (Request("a red circle", steps=2, guidance=float("nan")), "guidance must be a number"),
    (Request("a red circle", steps=2, seed=-1), "seed must be a whole number"),
    (Request("a red circle", steps=2, scheduler="fast"), "unknown scheduler 'fast'"),
    (Request("a red circle", steps=2, model="/etc"), "unknown model '/etc'; this server offers"),
])
def test_bad_requests_are_one_clear_message_before_any_sampling(explorer, request_, message, monkeypatch):
    from t2i.pipeline import T2IPipeline
    monkeypatch.setattr(T2IPipeline, "__call__", lambda *a, **k: pytest.fail("sampled a bad request"))
    with pytest.raises(ValueError, match=message):
        explorer.generate(request_)


def test_a_scheduler_choice_is_used_and_the_models_own_restored(explorer):
    pipe = explorer.pipeline(explorer.default_model)
    own = pipe.scheduler
    assert explorer.generate(Request("a red circle", steps=2, scheduler="euler")).scheduler == "euler"
    assert pipe.scheduler is own


def test_models_load_once_and_only_those_offered(model, monkeypatch):
    import t2i.explorer as explorer_module
    loads = []
    real = explorer_module.load_pipeline
    monkeypatch.setattr(explorer_module, "load_pipeline", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    ex = Explorer([model, None])
    assert loads == [model] and list(ex.models) == [model, SHIPPED]
    ex.generate(Request("a red circle", steps=2))
    ex.generate(Request("a red circle", steps=2))
    assert loads == [model]
    ex.close()
    assert not ex.files_dir.exists()


def test_the_explorer_runs_a_diffusers_unet(tmp_path):
    from t2i.pipeline import T2IPipeline
    base = tiny_pipeline()
    T2IPipeline(tiny_diffusers_unet(), base.text_encoder, base.tokenizer, base.scheduler).save_pretrained(tmp_path)
    ex = Explorer([str(tmp_path)])
    result = ex.generate(Request("a red circle", steps=2))
    assert result.filters == [ALL, "8x8", "16x16"]                         # coarsest first
    coarse, fine = ex.word_overlay(result, "red", resolution="8x8"), ex.word_overlay(result, "red", resolution="16x16")
    assert coarse.tobytes() != fine.tobytes()
    assert ex.reweight(result, "red", 0.0)[0].tobytes() != ex.image(result).tobytes()
    ex.close()


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_cli_serve_refuses_bad_options_before_loading_anything(argv, message, capsys, monkeypatch):
    import t2i.explorer as explorer_module
    from t2i.cli import main
    monkeypatch.setattr(explorer_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ---- issue 19: the explorer as a user meets it -----------------------------------------------------


def test_every_model_is_checked_at_start_and_a_failed_start_leaves_no_folder(model, tmp_path, monkeypatch):
    import shutil
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    weights = next((damaged / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match="no pipeline folder at '.*missing'"):
        Explorer([model, str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=f"{weights} is cut short"):
        Explorer([model, str(damaged)])
    with pytest.raises(ValueError, match=f"{weights} is cut short"):
        Explorer([str(damaged)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]      # no t2i-serve-* folder


def test_cli_serve_names_a_port_in_use_by_its_option(capsys, monkeypatch):
    import socket

    import t2i.explorer as explorer_module
    from t2i.cli import main
    monkeypatch.setattr(explorer_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"t2i serve: error: --port {port} on 127.0.0.1 is in use: pass another --port, or --port 0 for a " \
                  "free one\n", err


def test_sigterm_leaves_no_downloads_folder(model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", "serve", "--model", model, "--port", "0", "--device",
                             "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("t2i explorer at "):
                break
        assert [p.name[:10] for p in tmp_path.iterdir() if p.name.startswith("t2i-serve-")] == ["t2i-serve-"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("t2i-serve-")]


def test_a_prompt_past_the_token_limit_is_said_not_cut_in_silence(explorer):
    long = explorer.generate(Request("a red a red a red a red a red a red", steps=2))
    assert explorer.cut_off(long) == ("the prompt is 14 tokens and the model reads 12 (with start and end): it saw "
                                      "only 'a red a red a red a red a red'")
    assert explorer.cut_off(explorer.generate(Request("a red circle", steps=2))) == ""
    with pytest.raises(ValueError, match="the prompt has 41 characters; at most 40"):
        explorer.generate(Request("x" * 41))


def test_the_first_word_shown_is_a_content_word(explorer):
    assert explorer.generate(Request("a red circle", steps=2)).first_word == "red"
    assert explorer.generate(Request("the a of", steps=2)).first_word == "the"      # none: the first one


def test_the_reweighted_image_is_among_the_downloads(explorer):
    import json
    result = explorer.generate(Request("a red circle", steps=2, seed=3))
    explorer.reweight(result, "red", 0.0)
    png = Image.open(result.files["reweighted:0"])
    assert json.loads(png.text["word_weights"]) == {"red": 0.0} and png.text["seed"] == "3"
    assert result.files["reweighted:0"].parent == result.files["heatmaps"].parent


def test_a_size_above_the_models_own_is_said(explorer):
    assert explorer.above_native(explorer.generate(Request("a red circle", steps=2))) == ""
    big = explorer.generate(Request("a red circle", steps=2, size=32))
    assert explorer.above_native(big) == ("the model was trained at 16 px; at 32 px it tends to repeat or stretch "
                                          "what it learned")


def test_each_image_of_a_batch_is_sampled_alone_so_generate_remakes_it_bit_for_bit(tmp_path, monkeypatch):
    """Issue 25 item 23 (the explorer's half): the page sampled its up to 4 images in one batch, whose float sums
    differ from one image's by 1/255 (the shipped model's image of seed 2 at 4 steps, here), so not every PNG came
    back bit for bit from its metadata through `t2i generate`, which samples each image alone. Now the page
    samples each alone too, and its views (maps, steps, previews) hold every image as before."""
    from t2i.cli import main
    from t2i.pipeline import T2IPipeline
    sizes, progress, call = [], [], T2IPipeline.__call__
    monkeypatch.setattr(T2IPipeline, "__call__", lambda self, prompt, **kw: (
        sizes.append(len(kw["generator"])), call(self, prompt, **kw))[1])
    shipped = Explorer([None], limits=Limits(max_images=4), files_dir=tmp_path)
    result = shipped.generate(Request("a red circle above a blue square", steps=4, num_images=4, seed=0),
                              progress=lambda i, n: progress.append((i, n)))
    assert sizes == [1] * 4 and progress == [(i, 16) for i in range(1, 17)]
    assert result.previews.shape[:2] == (4, 4) and result.heatmaps[ALL].maps.shape[0] == 4
    assert result.heatmaps[ALL].timeline.shape[:2] == (4, 4)
    meta = Image.open(result.files["png:0"]).text
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--seed", meta["seed"], "--steps", meta["steps"],
                 "--guidance", meta["guidance"], "--scheduler", meta["scheduler"], "--height", meta["height"],
                 "--width", meta["width"], "--upscale", meta["upscale"], "--num-images", "4", "--out",
                 str(tmp_path / "cli")]) == 0
    for i in range(4):
        made = Image.open(tmp_path / "cli" / f"a-red-circle-above-a-blue-square-{i}.png")
        assert made.tobytes() == Image.open(result.files[f"png:{i}"]).tobytes(), i

def test_a_reweighted_download_is_remade_by_generate_from_its_metadata(explorer, tmp_path):
    """Issue 25 item 9: the reweighted PNG records height, width and upscale beside its word weights, and
    `t2i generate --word-weights` takes them: the command line remakes it pixel for pixel."""
    import json

    from t2i.cli import main
    result = explorer.generate(Request("a red circle", steps=2, seed=3, size=32))
    explorer.reweight(result, "red", 0.0)
    explorer.reweight(result, "circle", 2.0)
    meta = Image.open(result.files["reweighted:0"]).text
    assert (meta["height"], meta["width"], meta["upscale"]) == ("32", "32", "1")
    weights = json.loads(meta["word_weights"])
    assert weights == {"red": 0.0, "circle": 2.0}
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--seed", meta["seed"], "--steps", meta["steps"],
                 "--guidance", meta["guidance"], "--scheduler", meta["scheduler"], "--height", meta["height"],
                 "--width", meta["width"], "--upscale", meta["upscale"], "--out", str(tmp_path),
                 "--word-weights", ",".join(f"{w}={v:g}" for w, v in weights.items())]) == 0
    made = tmp_path / "a-red-circle-3.png"
    assert Image.open(made).tobytes() == Image.open(result.files["reweighted:0"]).tobytes()
    assert json.loads(Image.open(made).text["word_weights"]) == weights
    assert main(["generate", "a red circle", "--model", meta["model"], "--word-weights", "dog=0", "--out",
                 str(tmp_path / "x")]) == 2
