"""Word effects: prompt-to-prompt reweighting through the attention processors, effect maps, the x0
previews, and `t2i effect`."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_diffusers_unet, tiny_pipeline

from t2i.attention import AttentionRecorder, attention_with_probs
from t2i.attention.effects import effect_map, word_effects, word_weight_matrix
from t2i.attention.processors import attached, cross_attention_modules
from t2i.cli import main
from t2i.layout import BatchLayout
from t2i.pipeline import T2IPipeline, make_scheduler
from t2i.text import encode_prompts
from t2i.settings import SamplingSettings

PROMPTS = ["a red circle", "a blue square above a green triangle"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def diffusers_pipeline():
    base = tiny_pipeline()
    pipe = T2IPipeline(tiny_diffusers_unet(), base.text_encoder, base.tokenizer, base.scheduler, caption_dropout=0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompts=PROMPTS, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompts, num_inference_steps=2, output_type="np", **kw)


def processors(pipe):
    return dict(pipe.unet.attn_processors)


# -- the maths -------------------------------------------------------------------------------------

def test_weights_scale_the_probability_columns_without_renormalising_and_zero_leaves_the_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    o, p = attention_with_probs(q, k, v)
    weights = torch.ones(2, 5)
    weights[1, 2] = 0.0
    weights[1, 3] = 2.5
    ow, pw = attention_with_probs(q, k, v, weights=weights)
    torch.testing.assert_close(pw[0], p[0])                                # row 0 untouched
    torch.testing.assert_close(pw[1, ..., 2], torch.zeros_like(p[1, ..., 2]))
    # weight 0 leaves token 2 out of the softmax (the others share its mass); 2.5 then scales token 3's share
    without = p[1] * (torch.arange(5) != 2)
    without = without / without.sum(-1, keepdim=True)
    torch.testing.assert_close(pw[1, ..., 3], 2.5 * without[..., 3])
    torch.testing.assert_close(pw[1, ..., 0], without[..., 0])
    torch.testing.assert_close(ow, torch.matmul(pw, v))
    assert (pw[1].sum(-1) - 1).abs().max() > 0.01                          # no renormalisation of the 2.5
    only = torch.ones(2, 5)
    only[1, 3] = 0.5
    torch.testing.assert_close(attention_with_probs(q, k, v, weights=only)[1][1, ..., 3], 0.5 * p[1, ..., 3])
    torch.testing.assert_close(attention_with_probs(q, k, v, weights=torch.ones(2, 5))[0], o)


def test_the_weight_matrix_touches_only_the_words_columns_in_the_conditional_rows(pipe):
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", ""] + PROMPTS)   # [uncond x 2, cond x 2]
    layout = BatchLayout(enc, (16, 16), images_per_prompt=2, guided=True)
    with pytest.raises(ValueError, match="'red' is not a word of the prompt 'a blue square"):
        word_weight_matrix(layout, {"red": 0.0})                           # one dict for every prompt
    w = word_weight_matrix(layout, [{"red": 0.0, "circle": 2.0}, {"square": 0.5}])
    assert w.shape == (8, enc.attention_mask.shape[1])
    assert (w[:4] == 1).all()                                              # the uncond rows
    assert w[4, 2] == 0 and w[5, 2] == 0 and w[4, 3] == 2 and w[6, 3] == 0.5 and w[7, 3] == 0.5
    assert (w != 1).sum() == 2 * 2 + 2                                     # two words x 2 images, one word x 2
    assert word_weight_matrix(layout, [{"red": 1.0}, {}]) is None
    unguided = BatchLayout(encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS[:1]), (16, 16))
    assert word_weight_matrix(unguided, {"red": 0.0})[0, 2] == 0           # no guidance: every row is cond
    for bad, message in [({"red": -1.0}, "finite number >= 0"), ({"red": float("nan")}, "finite number"),
                         ([{}], "1 word-weight dicts for 2 prompt"), ({"circle#2": 0.0}, "has 1 'circle'")]:
        with pytest.raises(ValueError, match=message):
            word_weight_matrix(layout, bad)


# -- the pipeline ----------------------------------------------------------------------------------

def test_weight_one_leaves_the_image_unchanged_and_installs_nothing(pipe, monkeypatch):
    before = processors(pipe)
    calls = []
    real = type(pipe.unet).set_attn_processor
    monkeypatch.setattr(type(pipe.unet), "set_attn_processor", lambda self, p: (calls.append(1), real(self, p)))
    plain = run(pipe).images
    assert np.array_equal(run(pipe, word_weights={"a": 1.0}).images, plain) and calls == []
    assert not np.array_equal(run(pipe, word_weights=[{"red": 0.0}, {}]).images, plain)
    assert len(calls) == 2 and all(processors(pipe)[k] is p for k, p in before.items())


def test_silencing_a_word_changes_only_its_prompts_images(pipe):
    plain = run(pipe).images
    silenced = run(pipe, word_weights=[{"red": 0.0}, {}]).images
    assert np.abs(silenced[0] - plain[0]).max() > 1e-3
    assert np.abs(silenced[1] - plain[1]).max() < 1e-5                    # explicit attention vs SDPA: rounding only


def test_reweighting_composes_with_recording_in_either_order(pipe):
    weights = [{"red": 0.0, "circle": 2.0}, {}]
    alone = run(pipe, word_weights=weights).images
    both = run(pipe, word_weights=weights, record_attention=AttentionRecorder(timeline=True))
    assert np.array_equal(both.images, alone)                              # the recorder does not undo it
    red = both.attention.word_maps(0, ["red"], normalize=None)["red"]
    assert red.abs().max() == 0                                            # it records what was used
    assert both.attention.word_timeline(0, "red", normalize=None).abs().max() == 0
    uncond = run(pipe, ["a red circle"], negative_prompt="a red circle", word_weights={"red": 0.0},
                 record_attention=AttentionRecorder(branch="uncond")).attention
    assert uncond.word_maps(0, ["red"], normalize=None)["red"].min() > 0   # the uncond branch is left alone
    # either order by hand: the weights attached inside or outside the recording block
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS)
    layout = BatchLayout(enc, (16, 16), num_inference_steps=1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    w = word_weight_matrix(layout, [{"red": 0.0}, {}])
    recording = lambda rec: rec.record(pipe.unet, layout)                                  # noqa: E731
    weighting = lambda rec: attached(pipe.unet, cross_attention_modules(pipe.unet), "weights", w)  # noqa: E731
    before, outputs = processors(pipe), []
    for outer, inner in [(recording, weighting), (weighting, recording)]:
        rec = AttentionRecorder()
        with torch.no_grad(), outer(rec), inner(rec):
            rec.set_step(0)
            outputs.append(pipe.unet(x, 500, enc.hidden_states, enc.attention_mask).sample)
        assert rec.heatmaps().word_maps(0, ["red"], normalize=None)["red"].abs().max() == 0
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert all(processors(pipe)[k] is p for k, p in before.items())


def test_diffusers_unet_reweights_and_composes_with_recording():
    pipe = diffusers_pipeline()
    before = processors(pipe)
    plain = run(pipe).images
    assert np.array_equal(run(pipe, word_weights={"a": 1.0}).images, plain)
    silenced = run(pipe, word_weights=[{"red": 0.0}, {}])
    assert np.abs(silenced.images[0] - plain[0]).max() > 1e-4 and np.abs(silenced.images[1] - plain[1]).max() < 1e-5
    both = run(pipe, word_weights=[{"red": 0.0}, {}], record_attention=True)
    assert np.array_equal(both.images, silenced.images)
    assert both.attention.word_maps(0, ["red"], normalize=None)["red"].abs().max() == 0
    assert all(processors(pipe)[k] is p for k, p in before.items())


def test_word_effects_batch_the_variants_from_one_seed(pipe):
    same = word_effects(pipe, "a red circle", ["red", "circle"], weight=1.0, settings=SamplingSettings(steps=2))
    assert all(e.abs().max() == 0 for e in same.effects.values())         # identical rows: no change at all
    silenced = word_effects(pipe, "a red circle", ["red"], weight=0.0, settings=SamplingSettings(steps=2))
    assert silenced.effects["red"].shape == (16, 16) and silenced.effects["red"].max() > 1e-3
    assert np.array_equal(np.asarray(silenced.image), np.asarray(same.image))
    assert silenced.attention.num_images == 1 and silenced.attention.words(0) == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="not a word"):
        word_effects(pipe, "a red circle", ["blue"])
    with pytest.raises(ValueError, match="'triangle' was cut off by the text encoder's 12-token limit"):
        word_effects(pipe, "a red circle above a blue square to the right of a green triangle", ["triangle"])


def test_effect_map_is_the_mean_absolute_rgb_change():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 2] = (255, 0, 0)
    e = effect_map(a, b)
    assert e.shape == (4, 4) and e[1, 2] == pytest.approx(1 / 3) and e.sum() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="differ in size"):
        effect_map(a, np.zeros((2, 2, 3)))


def test_silencing_a_colour_word_of_a_trained_model_changes_mostly_its_objects_pixels():
    """On the position-blind reference (the default before issue 16), which has no context layer over the text
    states: there a word's cross-attention column is the only way its meaning reaches the image. (On the current
    default, with a context layer, silencing "red" changes almost nothing: likely because that layer carries
    "red" into the other tokens' states too.)"""
    from pathlib import Path

    from t2i.metrics import effect_share
    from t2i.pipeline import load_pipeline
    from t2i.segment import segment
    pipe = load_pipeline(Path(__file__).resolve().parent.parent / "bench" / "position_blind")
    effects = word_effects(pipe, "a red circle", ["red"], weight=0.0, settings=SamplingSettings(steps=10))
    red = [d for d in segment(np.asarray(effects.image)) if d.colour == "red"]
    assert len(red) == 1
    assert effect_share(effects.effects["red"].numpy(), red[0].mask) > 0.5


def test_a_colour_words_attention_shows_what_it_does_better_than_a_centre_prior():
    """prompt_faithfulness (t2i evaluate --prompts, no masks): on the position-blind reference, where silencing a
    colour word recolours its object, the word's attention map correlates with that change, a centre prior less."""
    from pathlib import Path

    from t2i.attention.effects import prompt_faithfulness
    from t2i.pipeline import load_pipeline
    pipe = load_pipeline(Path(__file__).resolve().parent.parent / "bench" / "position_blind")
    result = prompt_faithfulness(pipe, ["a red circle above a blue square"], SamplingSettings(steps=10), ["red"])
    (row,) = result["rows"]
    assert row["word"] == "red" and row["effect"] > 0.02
    assert row["attention"] > 0.5 > row["centre prior"]


# -- x0 previews -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["ddpm", "euler", "dpm"])
def test_previews_end_at_the_image(scheduler):
    pipe = tiny_pipeline()
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    out = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
               previews=True)
    assert out.previews.shape == (3, 2, 3, 16, 16)
    torch.testing.assert_close(out.previews[-1], out.images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_previews_are_the_schedulers_own_x0_at_every_step(prediction_type):
    pipe = tiny_pipeline(prediction_type)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    out = pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               previews=True)
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    x, expected = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0)), []
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            pred = pipe.unet(x, t, enc.hidden_states, enc.attention_mask).sample
            step = pipe.scheduler.step(pred, t, x)
            x = step.prev_sample
            expected.append((step.pred_original_sample / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(out.previews[:, 0], torch.cat(expected), atol=1e-5, rtol=0)
    assert (out.previews[0] - out.previews[-1]).abs().max() > 1e-3


# -- the command -----------------------------------------------------------------------------------

def test_cli_effect_writes_the_panels_and_refuses_bad_words_before_sampling(tmp_path, capsys, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    base = ["effect", "a red circle", "--model", str(tmp_path / "model"), "--steps", "2", "--device", "cpu",
            "--size", "64"]
    assert main(base + ["--words", "red,circle", "--out", str(tmp_path / "e")]) == 0
    names = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert names == ["effects.json", "image.png", "maps.safetensors", "word-circle-weighted.png", "word-circle.png",
                     "word-red-weighted.png", "word-red.png"]
    summary = json.loads((tmp_path / "e" / "effects.json").read_text())
    assert summary["weight"] == 0.0 and set(summary["words"]) == {"red", "circle"}
    from PIL import Image
    assert Image.open(tmp_path / "e" / "word-red.png").width > 4 * 64
    assert main(base + ["--words", "red", "--out", str(tmp_path / "e")]) == 2
    assert "already holds files" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the words were checked")
    monkeypatch.setattr(T2IPipeline, "__call__", refuse)
    for words, message in [("blue", "'blue' is not a word"), (" , ", "--words needs at least one word")]:
        assert main(base + ["--words", words, "--out", str(tmp_path / "f")]) == 2
        assert message in capsys.readouterr().err
    long = ["effect", "a blue square above a green triangle and a red circle"] + base[2:]
    assert main(long + ["--words", "circle", "--out", str(tmp_path / "f")]) == 2   # beyond the 12-token limit
    assert "'circle' was cut off by the text encoder's 12-token limit" in capsys.readouterr().err
    assert main(base + ["--words", "red", "--weight", "inf", "--out", str(tmp_path / "f")]) == 2
    assert "--weight must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def context_pipeline():
    """tiny_pipeline with t2i's context layer, which mixes every word into every other word's state."""
    from t2i.unet import build_unet
    base = tiny_pipeline()
    torch.manual_seed(0)
    unet = build_unet("tiny", context_layers=1, cross_attention_dim=32)
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    pipe = T2IPipeline(unet, base.text_encoder, base.tokenizer, base.scheduler, caption_dropout=0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("make", [context_pipeline, diffusers_pipeline], ids=["t2i-context-layer", "diffusers"])
def test_a_silenced_word_leaves_no_trace_whatever_mixes_the_words(make):
    """Weight 0 takes the word out of the picture: with it silenced, 'a red circle' and 'a blue circle' (one
    token each, same place) draw the same image, although the text encoder's causal attention and t2i's context
    layer carry each word into the others' states. The cross-attention alone does not do it."""
    pipe = make()
    prompts = ["a red circle", "a blue circle"]
    weights = [{"red": 0.0}, {"blue": 0.0}]
    assert len(pipe.prompt_tokens(prompts[0])[0]) == len(pipe.prompt_tokens(prompts[1])[0])
    gen = lambda: [torch.Generator().manual_seed(5) for _ in prompts]  # noqa: E731
    silenced = run(pipe, prompts, word_weights=weights, generator=gen(), guidance_scale=3.0).images
    np.testing.assert_allclose(silenced[0], silenced[1], atol=1e-5)
    plain = run(pipe, prompts, generator=gen(), guidance_scale=3.0).images
    assert np.abs(plain[0] - plain[1]).max() > 1e-3                     # the words do differ
    old = run(pipe, prompts, word_weights=weights, generator=gen(), guidance_scale=3.0, reweight_text=False).images
    assert np.abs(old[0] - old[1]).max() > 1e-4                          # cross-attention alone leaves a trace


def test_weights_other_than_zero_still_mean_less_and_more():
    pipe = context_pipeline()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = run(pipe, ["a red circle"], generator=gen()).images[0]
    change = {w: np.abs(run(pipe, ["a red circle"], word_weights={"red": w}, generator=gen()).images[0] - plain).mean()
              for w in (0.0, 0.5, 1.0, 2.0)}
    assert change[1.0] < 1e-6 < change[0.5] < change[0.0]
    assert change[2.0] > 1e-4
