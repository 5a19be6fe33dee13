"""t2i.attention.guidance: the layout and presence energies, one guided step moving attention into its box,
nothing changed without guidance, bad boxes and words as one line, CFG, negative prompts and a diffusers UNet,
and boxes read from a shapes-world prompt."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_diffusers_unet, tiny_pipeline

from t2i.attention.guidance import box_mask, layout_energy, peak_attention, prompt_guidance
from t2i.settings import GuideSettings, SamplingSettings, generators

pytestmark = pytest.mark.usefixtures("one_thread")
TOP_LEFT = (0.0, 0.0, 0.5, 0.5)


def one_word_maps(cells: list[tuple[int, int]], h: int = 4, w: int = 4, T: int = 4, token: int = 2) -> torch.Tensor:
    """(1, h*w, T) attention whose `token` column puts equal mass on the given (row, col) cells."""
    p = torch.full((1, h * w, T), 1.0 / T)
    p[0, :, token] = 0.0
    for r, c in cells:
        p[0, r * w + c, token] = 1.0
    return p


def test_the_layout_energy_is_zero_inside_the_box_and_grows_as_the_map_leaves_it():
    inside = [(0, 0), (0, 1), (1, 0), (1, 1)]                       # the top-left quarter of a 4x4 grid
    energies = []
    for moved in range(5):                                           # move the cells out one by one
        cells = inside[moved:] + [(3, 3 - k) for k in range(moved)]
        energies.append(float(layout_energy([one_word_maps(cells)], (16, 16), [[([2], TOP_LEFT)]])))
    assert energies[0] == 0.0
    assert all(b > a for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] == pytest.approx(1.0)                       # nothing inside: (1 - 0)^2


def test_box_masks_cover_the_cells_whose_centres_are_inside_and_never_nothing():
    assert box_mask(TOP_LEFT, 4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert box_mask((0.5, 0.0, 1.0, 1 / 3), 3, 6)[0].tolist() == [0, 0, 0, 1, 1, 1]
    tiny = box_mask((0.9, 0.9, 0.95, 0.95), 4, 4)                     # smaller than a cell: the cell under it
    assert tiny.sum() == 1 and tiny[3, 3] == 1


def test_the_peak_ignores_the_start_token_and_rises_with_the_words_share():
    cells = [(1, 1), (1, 2), (2, 1), (2, 2)]
    strong = one_word_maps(cells)
    weak = strong.clone()
    weak[0, :, 2] *= 0.2                                               # the word gets less of those patches
    start_heavy = strong.clone()
    start_heavy[0, :, 0] += 100.0                                      # the start token soaks up attention
    strong, weak, start_heavy = (p / p.sum(-1, keepdim=True) for p in (strong, weak, start_heavy))  # softmax rows
    high, = peak_attention([strong], (16, 16), [[[2]]], [4])
    low, = peak_attention([weak], (16, 16), [[[2]]], [4])
    same, = peak_attention([start_heavy], (16, 16), [[[2]]], [4])
    assert float(high) > float(low) > 0
    assert float(same) == pytest.approx(float(high))


def guided(pipe, **kw):
    kw.setdefault("num_inference_steps", 4)
    return pipe(["a red circle and a blue square", "a blue square above a red circle"], generator=generators([0, 1]),
                output_type="np", **kw)


def test_without_guidance_the_images_are_bit_identical_and_the_processors_come_back():
    pipe = tiny_pipeline()
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    plain = guided(pipe)
    for off in (dict(layout={}, excite=[]), dict(layout=None, excite=None)):
        assert np.array_equal(guided(pipe, **off).images, plain.images)
    out = guided(pipe, layout={"circle": TOP_LEFT})
    assert not np.array_equal(out.images, plain.images)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    assert np.array_equal(guided(pipe).images, plain.images)


def layout_energies(out) -> list[float]:
    return [e for step in out.guidance for e in step["layout"]]


@pytest.mark.parametrize("unet", ["t2i", "diffusers"])
def test_one_guided_step_moves_attention_into_the_box_with_cfg_and_a_negative_prompt(unet):
    """At the first step, each gradient step on the latents lowers the energy the next one sees."""
    pipe = tiny_pipeline()
    if unet == "diffusers":
        from t2i.pipeline import T2IPipeline
        pipe = T2IPipeline(tiny_diffusers_unet(), pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                           caption_dropout=0.1)
        pipe.set_progress_bar_config(disable=True)
    settings = GuideSettings(fraction=0.25, iterations=4, step_size=0.5)
    out = guided(pipe, layout={"circle": TOP_LEFT, "square": (0.5, 0.5, 1.0, 1.0)}, guide=settings,
                 negative_prompt="a purple square", guidance_scale=3.0)
    energies = layout_energies(out)
    assert len(out.guidance) == 1 and len(energies) == 4                   # one of 4 steps, 4 iterations
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    no_cfg = guided(pipe, layout={"circle": TOP_LEFT}, guide=settings, guidance_scale=1.0)
    assert layout_energies(no_cfg)[-1] < layout_energies(no_cfg)[0]


def test_presence_guidance_raises_the_weakest_peak_and_stops_at_the_threshold():
    pipe = tiny_pipeline()
    out = guided(pipe, excite=["circle", "square"], guide=GuideSettings(fraction=0.25, iterations=3, step_size=0.5,
                                                                           threshold=1.0))
    energies = [e for step in out.guidance for e in step["excite"]]
    assert len(energies) == 3 and energies[-1] < energies[0], energies
    met = guided(pipe, excite=["circle"], guide=GuideSettings(fraction=0.25, iterations=3, threshold=1e-6))
    assert [step["excite"] for step in met.guidance] == [[0.0]]            # already present: no step taken
    assert np.array_equal(met.images, guided(pipe).images)


@pytest.mark.parametrize("layout, excite, message", [
    ({"circle": (0, 0, 1.5, 0.5)}, None, r"the box of 'circle' must have 0 <= x0 < x1 <= 1"),
    ({"circle": (0.5, 0, 0.4, 0.5)}, None, r"the box of 'circle' must have 0 <= x0 < x1 <= 1"),
    ({"circle": (0, 0, math.nan, 0.5)}, None, r"the box of 'circle' must be four finite numbers"),
    ({"circle": (0, 0, 0.5)}, None, r"the box of 'circle' must be four finite numbers"),
    ({"dog": TOP_LEFT}, None, r"'dog' is not a word of the prompt 'a red circle'"),
    (None, ["dog"], r"'dog' is not a word of the prompt 'a red circle'"),
])
def test_bad_boxes_and_words_are_one_clear_line(layout, excite, message):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", num_inference_steps=2, layout=layout, excite=excite)


def test_the_settings_check_the_boxes_and_the_strengths():
    with pytest.raises(ValueError, match=r"the box of 'circle' must have"):
        SamplingSettings(layout=(("circle", (0.2, 0.2, 0.1, 0.3)),)).check()
    with pytest.raises(ValueError, match="the guided fraction of steps must be from 0 to 1"):
        SamplingSettings(guide=GuideSettings(fraction=2)).check()
    assert SamplingSettings(layout=(("circle", [0, 0, 1, 1]),)).check().pipeline_kwargs()["layout"] == \
        {"circle": (0.0, 0.0, 1.0, 1.0)}


@pytest.mark.parametrize("prompt, layout, excite", [
    ("a red circle in the top left", {"red": (0, 0, 1 / 3, 1 / 3), "circle": (0, 0, 1 / 3, 1 / 3)},
     ["red", "circle"]),
    ("in the lower right there is a small blue square", {"blue": (2 / 3, 2 / 3, 1, 1), "square": (2 / 3, 2 / 3, 1, 1)},
     ["blue", "square"]),
    ("a red circle above a blue square", {"red": (0, 0, 1, 0.5), "circle": (0, 0, 1, 0.5),
                                          "blue": (0, 0.5, 1, 1), "square": (0, 0.5, 1, 1)},
     ["red", "circle", "blue", "square"]),
    ("a blue square to the right of a red square", {"blue": (0.5, 0, 1, 1), "square": (0.5, 0, 1, 1),
                                                    "red": (0, 0, 0.5, 1), "square#2": (0, 0, 0.5, 1)},
     ["blue", "square", "red", "square#2"]),
    ("a yellow diamond and a purple circle", {}, ["yellow", "diamond", "purple", "circle"]),
])
def test_boxes_and_words_come_from_a_shapes_world_prompt(prompt, layout, excite):
    got_layout, got_excite = prompt_guidance(prompt)
    assert got_excite == excite
    assert got_layout.keys() == layout.keys()
    assert all(got_layout[k] == pytest.approx(v) for k, v in layout.items())


def test_guidance_from_the_prompt_needs_an_object():
    with pytest.raises(ValueError, match=r"found no object .* give the boxes instead \(--layout WORD="):
        prompt_guidance("a dog on a sofa")


def test_heatmaps_and_word_weights_see_the_guided_denoising_not_the_guidance_passes():
    from t2i.attention import AttentionRecorder
    pipe = tiny_pipeline()
    settings = GuideSettings(fraction=0.5, iterations=2)
    rec = AttentionRecorder(timeline=True)
    out = guided(pipe, layout={"circle": TOP_LEFT}, guide=settings, record_attention=rec, word_weights={"red": 0.5})
    plain = guided(pipe, record_attention=AttentionRecorder(timeline=True), word_weights={"red": 0.5})
    assert out.attention.timeline.shape == plain.attention.timeline.shape      # (steps, images, words, h, w)
    assert len(out.guidance) == 2 and not np.array_equal(out.images, plain.images)


def test_generate_guides_from_the_prompt_or_from_boxes_and_records_it(model_dir, tmp_path):
    from PIL import Image

    from t2i.cli import main
    args = ["generate", "a red circle above a blue square", "--model", str(model_dir), "--steps", "4",
            "--upscale", "1", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--guide", "--out", str(tmp_path / "guided")]) == 0
    assert main([*args, "--layout", "circle=0,0,0.5,0.5", "--excite", "square", "--out", str(tmp_path / "boxes")]) == 0
    assert main([*args, "--excite", "all", "--out", str(tmp_path / "all")]) == 0
    assert json.loads(Image.open(next((tmp_path / "all").glob("*.png"))).text["excite"]) is True
    plain, guided, boxes = (Image.open(next((tmp_path / d).glob("*.png"))) for d in ("plain", "guided", "boxes"))
    assert "layout" not in plain.text
    assert json.loads(guided.text["layout"]) is True and json.loads(guided.text["excite"]) == []
    assert json.loads(boxes.text["layout"]) == {"circle": [0, 0, 0.5, 0.5]}
    assert json.loads(boxes.text["excite"]) == ["square"] and json.loads(boxes.text["guide"])["iterations"] >= 1
    pixels = [np.asarray(im) for im in (plain, guided, boxes)]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])


@pytest.mark.parametrize("option, message", [
    (["--layout", "circle:0,0,1,1"], "--layout must be WORD=X0,Y0,X1,Y1"),
    (["--layout", "circle=0,0,1"], "--layout must be WORD=X0,Y0,X1,Y1"),
    (["--layout", "circle=0,0,2,1"], "the box of 'circle' must have 0 <= x0 < x1 <= 1"),
    (["--layout", "dog=0,0,1,1"], "'dog' is not a word of the prompt"),
    (["--layout", "circle=0,0,0.5,0.5", "--layout", "circle=0.5,0.5,1,1"],
     "--layout gives 'circle' two boxes; give each word one (the second circle of a prompt is circle#2)"),
    (["--excite", "dog"], "'dog' is not a word of the prompt"),
])
def test_bad_guidance_options_are_one_line(model_dir, tmp_path, capsys, option, message):
    from t2i.cli import main
    assert main(["generate", "a red circle", "--model", str(model_dir), "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("*.png"))


def test_evaluate_guide_scores_the_model_alone_and_guided_side_by_side(tmp_path, capsys):
    from t2i.cli import main
    from t2i.data.shapes import ShapesConfig, caption_corpus
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer
    pipe = tiny_pipeline()
    pipe.tokenizer = build_offline_tokenizer(caption_corpus(ShapesConfig()), max_length=24)
    pipe.text_encoder = build_offline_text_encoder(pipe.tokenizer, width=32, layers=1, heads=2, seed=0)
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--num-prompts", "2", "--images-per-prompt", "1",
                 "--steps", "2", "--calibration-prompts", "1", "--effect-prompts", "0", "--device", "cpu", "--guide",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attention guidance from each prompt" in printed and "## Attention guidance: the model alone and guided" in printed
    assert "Sampling time per image: alone" in printed
    report = json.loads(out.read_text())
    assert report["alone"]["config"]["guide"] is None and report["guided"]["config"]["guide"] == "layout"
    guided, alone = report["guided"]["fidelity"], report["alone"]["fidelity"]
    assert set(alone) - set(guided) == {"unseen-wording"}   # guidance reads boxes off template and paraphrase wordings
    assert all(guided[s]["model"]["images"] == alone[s]["model"]["images"] > 0 for s in guided)


def test_the_python_api_takes_word_box_pairs_and_one_word_as_a_string():
    """layout=[(word, box)] is the dict {word: box} (not an AttributeError), and excite="circle" is the word, not
    its letters ("'c' is not a word"), in the pipeline and in SamplingSettings."""
    pipe = tiny_pipeline()
    settings = GuideSettings(fraction=0.25, iterations=1, step_size=0.5, threshold=1.0)
    pairs = guided(pipe, layout=[("circle", TOP_LEFT)], guide=settings).images
    assert np.array_equal(pairs, guided(pipe, layout={"circle": TOP_LEFT}, guide=settings).images)
    assert not np.array_equal(pairs, guided(pipe).images)
    one = guided(pipe, excite="circle", guide=settings).images
    assert np.array_equal(one, guided(pipe, excite=["circle"], guide=settings).images)
    with pytest.raises(ValueError, match="^layout gives 'circle' two boxes; give each word one"):
        SamplingSettings(layout=(("circle", TOP_LEFT), ("circle", (0.5, 0.5, 1, 1)))).check()
    with pytest.raises(ValueError, match="^layout gives 'circle' two boxes; give each word one"):
        pipe("a red circle", num_inference_steps=2, layout=[("circle", TOP_LEFT), ("circle", (0.5, 0.5, 1, 1))])
    kwargs = SamplingSettings(layout={"circle": [0, 0, 1, 1]}, excite="red, circle").check().pipeline_kwargs()
    assert (kwargs["layout"], kwargs["excite"]) == ({"circle": (0.0, 0.0, 1.0, 1.0)}, ["red", "circle"])


@pytest.mark.parametrize("option, message", [
    (["a red circle above and below a blue square", "--guide"],
     "'a red circle above and below a blue square' puts circle both above and below square: guidance from the "
     "prompt needs relations that agree; drop one, or give the boxes with --layout WORD=X0,Y0,X1,Y1"),
    (["a red dog", "--excite", "all"], "found no object (circle, square, triangle, diamond) in 'a red dog': --excite "
     "all reads shapes-world prompts; name the words instead (--excite WORD,WORD, or excite=[word, ...] in Python)"),
    (["a red circle", "--excite", ""], "--excite needs words of the prompt, e.g. --excite red,circle, or all"),
    (["a red circle", "--excite", " , "], "--excite needs words of the prompt, e.g. --excite red,circle, or all"),
])
def test_guidance_messages_name_what_the_user_gave(tmp_path, capsys, option, message):
    """Contradicting relations are named, not blamed on a box the user never gave; --excite all on a prompt with no
    shapes suggests --excite words, not --layout; an empty --excite is refused, not ignored."""
    from t2i.cli import main  # the shipped model: its tokenizer has every word of these prompts
    assert main(["generate", *option, "--steps", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"t2i generate: error: {message}"], err


def test_excite_all_is_any_case(model_dir, tmp_path):
    from t2i.cli import main
    for spelling in ("all", "ALL", "All"):
        assert main(["generate", "a red circle", "--excite", spelling, "--model", str(model_dir), "--steps", "2",
                     "--out", str(tmp_path / spelling)]) == 0
    assert json.loads(Image.open(tmp_path / "ALL" / "a-red-circle-0.png").text["excite"]) is True
