import json

import pytest
from PIL import Image

from t2i.cli import main

from conftest import tiny_pipeline


def test_generate_writes_pngs_with_metadata(model_dir, tmp_path, capsys):
    rc = main(["generate", "a red circle", "a blue square", "--model", str(model_dir), "--steps", "3",
               "--seed", "7", "--num-images", "2", "--scheduler", "ddim", "--out", str(tmp_path), "--upscale", "2",
               "--device", "cpu"])
    assert rc == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["a-blue-square-10.png", "a-blue-square-9.png",
                                       "a-red-circle-7.png", "a-red-circle-8.png"]
    im = Image.open(tmp_path / "a-blue-square-9.png")
    assert im.size == (32, 32)
    meta = im.text
    assert meta["prompt"] == "a blue square" and meta["seed"] == "9" and meta["steps"] == "3"
    assert meta["scheduler"] == "ddim" and meta["model"] == str(model_dir) and json.loads(meta["guidance"]) == 3.0


def test_image_regenerates_from_its_metadata(model_dir, tmp_path):
    main(["generate", "a red circle", "a blue square", "--model", str(model_dir), "--steps", "2", "--seed", "3",
          "--out", str(tmp_path / "a"), "--device", "cpu"])
    meta = Image.open(tmp_path / "a" / "a-blue-square-4.png").text
    main(["generate", meta["prompt"], "--model", meta["model"], "--steps", meta["steps"], "--seed", meta["seed"],
          "--guidance", meta["guidance"], "--scheduler", meta["scheduler"], "--out", str(tmp_path / "b"),
          "--device", "cpu"])
    a = Image.open(tmp_path / "a" / "a-blue-square-4.png").tobytes()
    b = Image.open(tmp_path / "b" / "a-blue-square-4.png").tobytes()
    assert a == b


def test_info_prints_config_and_counts(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "T2IUNet" in out and "parameters" in out and "block_channels" in out and "caption dropout" in out


def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:                    # argparse's choices, from t2i.settings.SCHEDULERS
        main(["generate", "x", "--model", str(model_dir), "--scheduler", "nope", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "invalid choice: 'nope' (choose from 'ddpm', 'ddim'" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(model_dir), "--height", "17", "--out", str(tmp_path)]) == 2
    assert "--height must be a multiple of 2" in capsys.readouterr().err


def test_info_prints_the_exact_parameter_counts(model_dir, capsys):
    pipe = tiny_pipeline()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert f"unet: T2IUNet, {count(pipe.unet):,} parameters" in out
    assert f"text_encoder: CLIPTextModel, {count(pipe.text_encoder):,} parameters" in out
    assert count(pipe.unet) != count(pipe.text_encoder)


# -- issue 10: bad input before any work, no overwrites, threads, help and warnings ------------------

@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if anything samples: bad options must be refused before any work."""
    from t2i.pipeline import T2IPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the options were checked")
    monkeypatch.setattr(T2IPipeline, "__call__", refuse)


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--steps", "0"], "--steps must be a whole number at least 1, got 0"),
    (["generate", "x", "--steps", "-1"], "--steps must be a whole number at least 1, got -1"),
    (["generate", "x", "--steps", "2000"], "--steps must be a whole number from 2 to 999"),
    (["generate", "x", "--steps", "1000", "--scheduler", "dpm"], "--steps must be a whole number from 1 to 999"),
    (["generate", "x", "--height", "0"], "--height must be a whole number at least 1, got 0"),
    (["generate", "x", "--width", "100000"], "from 2 to 128 px (8x the model's sample size 16)"),
    (["generate", "x", "--upscale", "0"], "--upscale must be at least 1, got 0"),
    (["generate", "x", "--upscale", "1000"], "--upscale must be at most 16"),
    (["generate", "x", "--num-images", "0"], "--num-images must be a whole number from 1 to 1000, got 0"),
    (["generate", "x", "--num-images", "10000"], "--num-images must be a whole number from 1 to 1000, got 10000"),
    (["generate", "x", "--seed", str(2**64)], "--seed must be a whole number from 0 to 18446744073709551615, got"),
    (["generate", "a x", "a y", "--seed", str(2**64 - 2), "--num-images", "2"],
     "--seed must be a whole number from 0 to 18446744073709551612 for 4 images (image i uses seed + i)"),
    (["generate", "x", "--seed", "-1"], "--seed must be a whole number from 0 to"),
    (["heatmap", "x", "--seed", str(2**70)], "--seed must be a whole number from 0 to 18446744073709551615"),
    (["generate", "x", "--guidance", "nan"], "--guidance must be a finite number"),
    (["generate", "x", "--device", "cuda"], "--device cuda: no CUDA GPU is available"),
    (["generate", "x", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["heatmap", "x", "--steps", "0"], "--steps must be a whole number at least 1, got 0"),
    (["heatmap", "x", "--height", "100000"], "from 2 to 128 px (8x the model's sample size 16)"),
    (["heatmap", "x", "--size", "0"], "--size must be at least 32, got 0"),
    (["heatmap", "x", "--device", "cuda"], "--device cuda: no CUDA GPU is available"),
    (["evaluate", "--steps", "5000"], "--steps must be a whole number from 2 to 999"),
    (["evaluate", "--device", "cuda:0"], "--device cuda:0: no CUDA GPU is available"),
])
def test_bad_options_are_one_line_before_any_work(argv, message, model_dir, tmp_path, capsys, monkeypatch,
                                                  no_sampling):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--out", str(tmp_path / "out")] if argv[0] != "evaluate" else []
    assert main(argv + ["--model", str(model_dir)] + out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_files_are_never_overwritten_and_any_script_names_its_file(model_dir, tmp_path, capsys):
    def generate(*prompts, seed="0"):
        assert main(["generate", *prompts, "--model", str(model_dir), "--steps", "2", "--seed", seed,
                     "--out", str(tmp_path), "--device", "cpu"]) == 0
        return [line.rsplit("/", 1)[-1] for line in capsys.readouterr().out.split("\n") if line]

    assert generate("a red circle") == ["a-red-circle-0.png"]
    first = (tmp_path / "a-red-circle-0.png").read_bytes()
    assert generate("a red circle") == ["a-red-circle-0-v2.png"]
    assert generate("A red circle!") == ["a-red-circle-0-v3.png"]      # same slug, another prompt
    assert (tmp_path / "a-red-circle-0.png").read_bytes() == first
    names = generate("红色的圆", "🔴", "🟦", seed="5")
    assert names[0] == "红色的圆-5.png" and len(set(names)) == 3 and all(n.startswith("prompt-") for n in names[1:])
    assert Image.open(tmp_path / names[1]).text["prompt"] == "🔴"
    (tmp_path / "a-red-circle-9-heatmaps").mkdir()                     # a stale heatmaps folder is not reused
    assert main(["generate", "a red circle", "--model", str(model_dir), "--steps", "2", "--seed", "9", "--heatmaps",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "a-red-circle-9-v2.png" in capsys.readouterr().out
    assert not any((tmp_path / "a-red-circle-9-heatmaps").iterdir())


def test_sampling_threads_leave_busy_cores_alone():
    from t2i.sampling import sampling_threads
    assert sampling_threads(cores=2, load=0.1) == 2        # idle: every core
    assert sampling_threads(cores=2, load=1.0) == 1        # one core busy
    assert sampling_threads(cores=2, load=5.0) == 1        # busy machine: one thread, never zero
    assert sampling_threads(cores=16, load=4.2) == 12


def test_sampling_commands_run_openmp_threads_passive(model_dir, tmp_path):
    """With spinning OpenMP threads one 32x32 image took 66 s on a busy 2-core machine (1 s with one
    thread); sleeping (passive) threads must be chosen before torch loads OpenMP."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"                     # libgomp prints its settings when it starts
    run = subprocess.run([sys.executable, "-m", "t2i.cli", "generate", "x", "--model", str(model_dir), "--steps", "2",
                          "--out", str(tmp_path), "--device", "cpu"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "GOMP_SPINCOUNT = '0'" in run.stderr            # unset, libgomp spins 300000 times before sleeping


def test_generate_and_heatmap_show_a_progress_bar(model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert "sampling" in capsys.readouterr().err
    assert main(["heatmap", "a red circle", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path / "h"),
                 "--device", "cpu"]) == 0
    assert "sampling" in capsys.readouterr().err


def test_help_shows_the_sampling_defaults():
    from t2i.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("generate", "heatmap"):
        text = " ".join(sub[command].format_help().split())
        assert "(default: 30)" in text and "(default: 3.0)" in text
        assert text.count("(default: the model's native size") == 2


def test_unquoted_multi_word_prompt_warns(model_dir, tmp_path, capsys):
    assert main(["generate", "a", "red", "circle", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert "3 one-word prompts" in capsys.readouterr().err and len(list(tmp_path.glob("*.png"))) == 3
    assert main(["generate", "a red circle", "a blue square", "--model", str(model_dir), "--steps", "2",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "one-word" not in capsys.readouterr().err


def test_the_shipped_model_regenerates_from_what_its_png_records(tmp_path):
    """`model: default` in a PNG of the shipped model, from the CLI or the explorer, is what --model accepts."""
    from t2i.explorer import Explorer, Request
    assert main(["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    meta = Image.open(tmp_path / "a" / "a-red-circle-0.png").text
    explorer = Explorer([None], files_dir=tmp_path)
    served = Image.open(explorer.generate(Request("a red circle", steps=2)).files["png:0"]).text
    assert meta["model"] == served["model"] == "default"
    assert main(["generate", "a red circle", "--model", meta["model"], "--steps", "2", "--out", str(tmp_path / "b"),
                 "--device", "cpu", "--scheduler", meta["scheduler"]]) == 0
    assert Image.open(tmp_path / "b" / "a-red-circle-0.png").tobytes() == \
        Image.open(tmp_path / "a" / "a-red-circle-0.png").tobytes()


def test_generate_samples_each_image_alone_so_its_png_regenerates_it_bit_for_bit(model_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    """Each image is sampled in its own pipeline call (memory flat in the number of images): batched float sums
    differ by 1/255 from a single image's, so image i > 0 of --num-images, and one with --heatmaps, would not come
    back from its PNG's metadata, which `t2i generate` reads as one image."""
    from t2i.pipeline import T2IPipeline
    sizes, call = [], T2IPipeline.__call__
    monkeypatch.setattr(T2IPipeline, "__call__", lambda self, prompt, **kw: (sizes.append(len(prompt)),
                                                                             call(self, prompt, **kw))[1])
    assert main(["generate", "a red circle", "a blue square", "--num-images", "4", "--model", str(model_dir),
                 "--steps", "2", "--seed", "5", "--heatmaps", "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert sizes == [1] * 8
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == sorted(
        [f"a-red-circle-{s}.png" for s in (5, 6, 7, 8)] + [f"a-blue-square-{s}.png" for s in (9, 10, 11, 12)])
    meta = Image.open(tmp_path / "a" / "a-blue-square-10.png").text
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--steps", meta["steps"], "--seed", meta["seed"],
                 "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "b" / "a-blue-square-10.png").tobytes() == \
        Image.open(tmp_path / "a" / "a-blue-square-10.png").tobytes()


@pytest.mark.parametrize("part", ["text_encoder", "unet"])
@pytest.mark.parametrize("command", [["info"], ["generate", "a red circle"], ["heatmap", "a red circle"],
                                     ["effect", "a red circle", "--words", "red"], ["serve", "--port", "0"]])
def test_a_damaged_weights_file_is_one_line_that_names_it(model_dir, tmp_path, capsys, command, part):
    import shutil
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    weights = next((damaged / part).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:3000])
    model = [str(damaged)] if command == ["info"] else ["--model", str(damaged)]
    out = ["--out", str(tmp_path / "out")] if command[0] in ("generate", "heatmap", "effect") else []
    assert main([*command, *model, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"t2i {command[0]}: error: {weights} is cut short") and err.count("\n") == 1, err


def test_cosmetics_version_defaults_and_a_quiet_api(model_dir, capfd):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capfd.readouterr().out.strip() == "t2i 0.1.0"
    for command in ("heatmap", "effect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "from 0 to 2**64 - 1 (default: 0)" in " ".join(capfd.readouterr().out.split())
    from diffusers.utils import logging as diffusers_logging

    from t2i.pipeline import load_pipeline
    diffusers_logging.enable_progress_bar()                  # as in a Python session; the CLI turns them off
    capfd.readouterr()
    load_pipeline(model_dir)
    assert "Loading" not in capfd.readouterr().err and diffusers_logging.is_progress_bar_enabled()


def test_a_full_disk_keeps_no_empty_png_nor_half_written_folder_and_names_the_file(model_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    """generate: the PNG the disk filled under is not kept (a rerun takes its name again, not -v2) and the error
    names it; heatmap: no half-written --out is left to block the rerun."""
    import io

    import t2i.attention.heatmaps as heatmaps
    import t2i.sampling as sampling

    class Full(io.FileIO):  # the disk fills after the first 10 bytes
        def write(self, data):
            super().write(bytes(data)[:10])
            raise OSError(28, "No space left on device")
    opened = []

    def second_png_fills_the_disk(path, mode="r", *a, **kw):
        opened.append(path)
        return Full(path, mode.replace("b", "")) if len(opened) == 2 else open(path, mode, *a, **kw)
    monkeypatch.setattr(sampling, "open", second_png_fills_the_disk, raising=False)
    out = tmp_path / "gen"
    args = ["generate", "a red circle", "--model", str(model_dir), "--steps", "2", "--num-images", "3", "--out",
            str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"t2i generate: error: No space left on device while writing "
                                    f"{out}/a-red-circle-1.png; nothing of it was kept"), err
    assert sorted(p.name for p in out.iterdir()) == ["a-red-circle-0.png"]
    monkeypatch.undo()
    assert main(args[:-4] + ["--seed", "1", "--num-images", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-red-circle-0.png", "a-red-circle-1.png", "a-red-circle-2.png"]

    def full(self, path):
        open(path, "wb").write(b"\0" * 10)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(heatmaps.Heatmaps, "save", full)
    args = ["heatmap", "a red circle", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path / "h")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"t2i heatmap: error: No space left on device while writing {tmp_path / 'h'}/; nothing of it was kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
    monkeypatch.undo()
    assert main(args) == 0
    assert (tmp_path / "h" / "maps.json").is_file() and not list(tmp_path.glob(".h.*"))


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
@pytest.mark.parametrize("fault", ["missing", "another model's"])
def test_valid_weights_of_another_model_or_missing_a_tensor_are_one_line_naming_the_file_and_key(
        model_dir, tmp_path, capsys, part, fault):
    """A valid safetensors file that lacks a tensor, or holds another component's tensors, is refused in one line
    naming the file and the first missing or unexpected key, by info, generate and train.init_from (not
    'Cannot copy out of meta tensor', nor a text encoder with random weights)."""
    import shutil

    from safetensors.torch import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    weights = next((model / part).glob("*.safetensors"))
    tensors = load_file(weights)
    if fault == "missing":
        key = sorted(tensors)[1]
        del tensors[key]
        why = f"lacks {key}"
    else:
        other = "text_encoder" if part == "unet" else "unet"
        tensors = load_file(next((model / other).glob("*.safetensors")))
        why = f"holds {sorted(tensors)[0]}, which"
    save_file(tensors, weights)
    for command in (["info", "--model", str(model)], ["generate", "x", "--model", str(model), "--out", str(tmp_path)],
                    ["train", "model.preset=tiny", f"train.init_from={model}", f"train.output_dir={tmp_path / 'run'}"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        line = err.splitlines()[-1]
        assert line.startswith(f"t2i {command[0]}: error: {weights} {why}"), err
        assert "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130_at_any_moment(model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a command imports, loads or samples: one line naming the command, exit status 130 (128 +
    SIGINT), no traceback; a real SIGINT to `python -m t2i.cli generate` mid-run too."""
    import signal
    import subprocess
    import sys
    import time

    import t2i.cli as cli

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    for name in ("_quiet_loading", "sampling_pipeline"):  # before the command runs; while it loads
        with monkeypatch.context() as m:
            m.setattr(cli, name, interrupted)
            assert main(["generate", "x", "--model", str(model_dir), "--out", str(tmp_path)]) == 130
        assert capsys.readouterr().err == "t2i generate: stopped (Ctrl-C); the files written so far are kept\n"
    for delay in (0.3, 2.5, 5):  # importing torch (a Ctrl-C in its C++ start-up aborted the process), loading, sampling
        run = subprocess.Popen([sys.executable, "-m", "t2i.cli", "generate", "x", "--model", str(model_dir), "--steps",
                                "400", "--num-images", "16", "--out", str(tmp_path)], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        run.send_signal(signal.SIGINT)
        err = run.communicate(timeout=60)[1]
        assert (run.returncode, err.strip().splitlines()[-1]) == (
            130, "t2i generate: stopped (Ctrl-C); the files written so far are kept"), (delay, err)
        assert "Traceback" not in err


def test_a_warning_is_one_line_in_t2is_words(tmp_path):
    """Not `.../pipeline.py:142: UserWarning: ...` with its source line (nor contextlib.py's): the message alone."""
    import subprocess
    import sys
    model = tmp_path / "model"
    tiny_pipeline(caption_dropout=0.0).save_pretrained(model)
    run = subprocess.run([sys.executable, "-W", "default", "-m", "t2i.cli", "generate", "x", "--model", str(model),
                          "--steps", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "caption dropout" in line or "warnings.warn" in line]
    assert lines == ["t2i generate: warning: this model was trained without caption dropout, so it has no "
                     "unconditional prediction to guide against; use guidance_scale=1.0"], run.stderr


def test_heatmap_and_effect_pngs_carry_the_settings_that_regenerate_them(model_dir, tmp_path):
    """image.png of `heatmap` and `effect` (and the reweighted images, with their word_weights) record the prompt,
    seed and settings, as generate's PNGs do; generate from them gives the same pixels."""
    assert main(["heatmap", "a red circle", "--model", str(model_dir), "--steps", "2", "--seed", "4", "--size", "64",
                 "--out", str(tmp_path / "h")]) == 0
    assert main(["effect", "a red circle", "--words", "red", "--model", str(model_dir), "--steps", "2", "--seed", "4",
                 "--size", "64", "--out", str(tmp_path / "e")]) == 0
    heat = Image.open(tmp_path / "h" / "image.png")
    meta = heat.text
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["model"], meta["upscale"]) == (
        "a red circle", "4", "2", str(model_dir), "4")
    assert Image.open(tmp_path / "e" / "image.png").text["seed"] == "4"
    assert json.loads(Image.open(tmp_path / "e" / "word-red-weighted.png").text["word_weights"]) == {"red": 0.0}
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--steps", meta["steps"], "--seed", meta["seed"],
                 "--upscale", meta["upscale"], "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "a-red-circle-4.png").convert("RGB").tobytes() == heat.convert("RGB").tobytes()


@pytest.mark.parametrize("index", ["{", "[]"])
def test_a_broken_model_index_is_one_line_that_names_it(model_dir, tmp_path, capsys, index):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "model_index.json").write_text(index)
    assert main(["info", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"t2i info: error: {model / 'model_index.json'} ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("copy the pipeline folder again, or export it again from its run")
