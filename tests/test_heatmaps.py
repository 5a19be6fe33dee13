"""Heatmaps by word, normalisation and upsampling, export round-trips, drawings, and the CLI."""
import json

import pytest
import torch
from PIL import Image

from t2i.attention import Heatmaps
from t2i.attention.heatmaps import normalize_maps, resize_maps, word_labels, word_spans
from t2i.attention.overlay import animate, colormap, grid_image, overlay
from t2i.cli import main
from t2i.text import BOS, EOS

pytestmark = pytest.mark.usefixtures("one_thread")


TOKENS = [BOS, "a</w>", "zz", "q</w>", "circle</w>", "and</w>", "a</w>", "circle</w>", "caf", "Ã", "©</w>", EOS]


def heatmaps(timeline: bool = False) -> Heatmaps:
    """Two images: the long prompt above, and 'a circle' (4 tokens) padded to 12, on a 4x8 grid."""
    torch.manual_seed(0)
    maps = torch.rand(2, 12, 4, 8).softmax(1)
    maps[1, 4:] = 0
    maps[1, :4] /= maps[1, :4].sum(0)
    short = [BOS, "a</w>", "circle</w>", EOS]
    tl = torch.rand(3, 2, 12, 2, 4) if timeline else None
    return Heatmaps(maps=maps, tokens=[TOKENS, short], prompts=["a zzq circle and a circle café", "a circle"],
                    image_size=(16, 32), layers=["mid.transformers.0.cross_attn"], steps=[0, 2, 4],
                    num_inference_steps=5, timeline=tl)


def test_words_merge_sub_tokens_and_number_repeats():
    assert [w for w, _ in word_spans(TOKENS)] == ["a", "zzq", "circle", "and", "a", "circle", "café"]
    assert word_spans(TOKENS)[1][1] == [2, 3]
    assert word_labels(TOKENS) == ["a", "zzq", "circle", "and", "a#2", "circle#2", "café"]
    hm = heatmaps()
    maps = hm.word_maps(0, ["zzq", "circle#2", "CIRCLE"], normalize=None)
    assert list(maps) == ["zzq", "circle#2", "circle"]
    torch.testing.assert_close(maps["zzq"], hm.maps[0, 2] + hm.maps[0, 3])
    torch.testing.assert_close(maps["circle#2"], hm.maps[0, 7])
    assert list(hm.word_maps(1)) == ["a", "circle"]
    assert hm.token_maps(1).shape == (4, 4, 8)


def test_unknown_or_missing_repeat_word_is_a_value_error_listing_the_words():
    hm = heatmaps()
    with pytest.raises(ValueError, match="'square' is not a word of the prompt 'a circle'; its words are: a, circle"):
        hm.word_maps(1, ["square"])
    with pytest.raises(ValueError, match="has 1 'circle', not 2"):
        hm.word_maps(1, ["circle#2"])
    with pytest.raises(ValueError, match="out of range"):
        hm.word_maps(2)


def test_normalisation_and_upsampling():
    hm = heatmaps()
    per_token = torch.stack(list(hm.word_maps(0, normalize="token", size="image").values()))
    assert per_token.shape == (7, 16, 32)
    assert torch.allclose(per_token.amax((1, 2)), torch.ones(7)) and torch.allclose(per_token.amin((1, 2)), torch.zeros(7))
    shared = torch.stack(list(hm.word_maps(0, normalize="shared").values()))
    assert shared.max() == 1 and shared.min() == 0 and (shared.amax((1, 2)) < 1).any()
    raw = hm.token_maps(0, size=(8, 16), mode="bicubic")
    assert raw.shape == (12, 8, 16) and raw.min() >= 0
    torch.testing.assert_close(resize_maps(hm.maps[0], (8, 16)).sum(0), torch.ones(8, 16))  # bilinear keeps sums
    with pytest.raises(ValueError, match="normalize"):
        normalize_maps(raw, "global")


def test_save_load_round_trip(tmp_path):
    for timeline in (False, True):
        hm = heatmaps(timeline)
        hm.save(tmp_path / "maps.safetensors")
        back = Heatmaps.load(tmp_path / "maps.safetensors")
        assert torch.equal(back.maps, hm.maps) and back.metadata() == hm.metadata()
        assert (back.timeline is None) if not timeline else torch.equal(back.timeline, hm.timeline)
    one = hm.select(1)
    assert one.maps.shape == (1, 4, 4, 8) and one.prompts == ["a circle"] and one.timeline.shape == (3, 1, 4, 2, 4)


def test_colormap_overlay_grid_and_gif(tmp_path):
    ramp = colormap(torch.tensor([[0.0, 0.5, 1.0]]))
    assert ramp.dtype == torch.uint8 and ramp.shape == (1, 3, 3)
    assert ramp[0, 0].tolist() == [0, 0, 4] and ramp[0, 2].tolist() == [252, 255, 164]
    image = Image.new("RGB", (32, 16), (200, 30, 30))
    hm = heatmaps(timeline=True)
    assert overlay(image, hm.maps[0, 4], size=256).size == (256, 128)
    grid = grid_image(image, hm, 0, ["a", "circle", "café"], size=128, columns=6)
    assert grid.width == 4 * 132 + 4 and grid.height > 64 + 22
    frames = animate(image, hm, 0, "circle#2", tmp_path / "circle.gif", size=64)
    assert len(frames) == 3 and frames[0].size == (64, 32 + 22)
    with Image.open(tmp_path / "circle.gif") as gif:
        assert gif.n_frames == 3
    with pytest.raises(ValueError, match="timeline=True"):
        animate(image, heatmaps(), 0, "circle")


def test_cli_heatmap_writes_its_files_and_rejects_unknown_words(tmp_path, capsys):
    out = tmp_path / "hm"
    assert main(["heatmap", "a red circle above a blue square", "--words", "red,circle,square",
                 "--steps", "2", "--seed", "1", "--device", "cpu", "--out", str(out), "--size", "64"]) == 0
    printed = capsys.readouterr().out.split()
    names = {p.split("/")[-1] for p in printed}
    assert names == {"image.png", "grid.png", "word-red.png", "word-circle.png", "word-square.png",
                     "maps.safetensors", "maps.json"}
    assert all((out / n).is_file() for n in names)
    meta = json.loads((out / "maps.json").read_text())
    assert meta["prompts"] == ["a red circle above a blue square"] and meta["selected_words"] == ["red", "circle", "square"]
    assert Heatmaps.load(out / "maps.safetensors").num_images == 1
    assert main(["heatmap", "a red circle", "--words", "red,cube", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "'cube' is not a word of the prompt 'a red circle'; its words are: a, red, circle" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_generate_heatmaps_for_each_image(tmp_path, capsys):
    assert main(["generate", "a red circle", "--num-images", "2", "--steps", "2", "--heatmaps", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["a-red-circle-0-heatmaps", "a-red-circle-1-heatmaps"]
    assert (tmp_path / folders[1] / "grid.png").is_file() and (tmp_path / folders[1] / "word-circle.png").is_file()


def test_cli_heatmap_names_a_word_the_token_limit_cut_off(tmp_path, capsys):
    prompt = ("a red circle above a blue square to the right of a green triangle in the top left of a purple diamond "
              "next to an orange circle and a yellow star")
    assert main(["heatmap", prompt, "--words", "red,star", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'star' was cut off by the text encoder's 32-token limit" in err and "not a word" not in err
    assert main(["heatmap", prompt, "--words", "cube", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "'cube' is not a word of the prompt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_heatmap_never_overwrites_a_folder(tmp_path, capsys):
    out = tmp_path / "hm"
    args = ["heatmap", "a red circle", "--steps", "1", "--device", "cpu", "--size", "32", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args) == 2
    assert "already holds" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_saved_maps_get_the_usual_file_mode(tmp_path):
    heatmaps().save(tmp_path / "maps.safetensors")
    (tmp_path / "other").write_text("")
    assert (tmp_path / "maps.safetensors").stat().st_mode == (tmp_path / "other").stat().st_mode
