import json

import pytest
from PIL import Image

from t2i.cli import main

from conftest import tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(path)
    return path


def test_generate_writes_pngs_with_metadata(model_dir, tmp_path, capsys):
    rc = main(["generate", "a red circle", "a blue square", "--model", str(model_dir), "--steps", "2",
               "--seed", "7", "--num-images", "2", "--scheduler", "ddim", "--out", str(tmp_path), "--upscale", "2",
               "--device", "cpu"])
    assert rc == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["a-blue-square-10.png", "a-blue-square-9.png",
                                       "a-red-circle-7.png", "a-red-circle-8.png"]
    im = Image.open(tmp_path / "a-blue-square-9.png")
    assert im.size == (32, 32)
    meta = im.text
    assert meta["prompt"] == "a blue square" and meta["seed"] == "9" and meta["steps"] == "2"
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
    assert main(["generate", "x", "--model", str(model_dir), "--scheduler", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown scheduler" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(model_dir), "--height", "17", "--out", str(tmp_path)]) == 2
    assert "multiples of 2" in capsys.readouterr().err


def test_info_prints_the_exact_parameter_counts(model_dir, capsys):
    pipe = tiny_pipeline()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert f"unet: T2IUNet, {count(pipe.unet):,} parameters" in out
    assert f"text_encoder: CLIPTextModel, {count(pipe.text_encoder):,} parameters" in out
    assert count(pipe.unet) != count(pipe.text_encoder)
