import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from t2i.attention import Heatmaps
from t2i.cli import main
from t2i.data.shapes import BACKGROUND, ShapesConfig, caption_corpus, render_scene
from t2i.evaluate import EvalConfig, evaluate, object_words, score_baseline_images, training_world, word_map
from t2i.metrics import (DAAM_TAU, TAUS, calibrate_tau, centre_prior_map, iou_curve, normalise_map, pointing,
                         score_fidelity, uniform_map)
from t2i.segment import segment

WORLD = ShapesConfig(size=16, max_objects=2, holdout_pairs=("green triangle", "purple circle"),
                     holdout_positions=("square@bottom right",))
TINY = EvalConfig(num_prompts=2, images_per_prompt=1, steps=2, calibration_prompts=2, batch_size=3)


def shapes_pipeline():
    """tiny_pipeline() with a vocabulary learned from the shapes captions, so no caption word is truncated."""
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer
    pipe = tiny_pipeline()
    pipe.tokenizer = build_offline_tokenizer(caption_corpus(ShapesConfig()), max_length=24)
    pipe.text_encoder = build_offline_text_encoder(pipe.tokenizer, width=32, layers=1, heads=2, seed=0)
    return pipe


def two_objects(size=32):
    """Two disjoint square masks (N=1 each) in a size x size image."""
    a, b = np.zeros((1, size, size), bool), np.zeros((1, size, size), bool)
    a[0, 2:10, 2:10] = True
    b[0, 20:28, 18:26] = True
    return a, b


# -- heatmap metrics on hand-made cases ----------------------------------------------------------

def test_perfect_and_wrong_maps():
    a, b = two_objects()
    perfect = a.astype(np.float32)
    np.testing.assert_allclose(iou_curve(perfect, a), 1.0)
    assert pointing(perfect, a)[0] == 1.0
    wrong = b.astype(np.float32)
    np.testing.assert_allclose(iou_curve(wrong, a), 0.0)
    assert pointing(wrong, a)[0] == 0.0


def test_uniform_map_scores_area_fraction():
    a, _ = two_objects()
    fraction = a.sum() / a.size
    flat = uniform_map(32, 32)[None]
    np.testing.assert_allclose(iou_curve(flat, a), fraction)            # every tau
    np.testing.assert_allclose(pointing(flat, a), fraction)             # ties split over the image


def test_normalise_and_centre_prior():
    m = np.array([[0.0, 2.0], [1.0, -1.0]])
    np.testing.assert_allclose(normalise_map(m), [[0, 1], [0.5, 0]])
    np.testing.assert_array_equal(normalise_map(np.zeros((3, 3))), np.ones((3, 3)))
    c = centre_prior_map(32, 32)
    assert c.max() == pytest.approx(1.0, abs=0.01) and c[15:17, 15:17].min() == c.max()
    assert c[0, 0] < 0.05
    with pytest.raises(ValueError, match="both be"):
        iou_curve(np.zeros((1, 4, 4)), np.zeros((1, 5, 5), bool))


def test_calibration_picks_the_threshold_between_object_and_halo():
    masks = np.zeros((5, 16, 16), bool)
    maps = np.full((5, 16, 16), 0.2, np.float32)
    for i in range(5):
        y, x = 2 + i, 3 + i
        maps[i, y - 2:y + 8, x - 2:x + 8] = 0.55                       # a halo around the object
        maps[i, y:y + 6, x:x + 6] = 0.65                               # the object itself
        masks[i, y:y + 6, x:x + 6] = True
    tau, mean = calibrate_tau(maps / 0.65, masks)                      # normalised: object 1, halo 0.85, rest 0.31
    assert tau == 0.9 and mean.max() == pytest.approx(1.0)
    tau, mean = calibrate_tau(maps, masks)                             # raw values: only 0.6 separates them
    assert tau == 0.6 and mean[TAUS.index(0.6)] == pytest.approx(1.0)
    tau, mean = calibrate_tau(np.zeros((0, 16, 16)), np.zeros((0, 16, 16), bool))
    assert tau == DAAM_TAU and np.isnan(mean).all()


# -- fidelity ------------------------------------------------------------------------------------

def test_rendered_images_score_perfectly_and_noise_and_other_scenes_do_not():
    world = ShapesConfig(size=32, max_objects=2, seed=12345)
    scenes = [render_scene(world, i) for i in range(40)]
    scores = score_baseline_images(scenes, seed=0, split_id=1)
    truth = scores["training images"][0]
    for m in ("recall", "colour", "shape", "size", "position", "relation", "count"):
        assert truth.rate(m) >= 0.97, m
    assert truth.rate("exact") >= 0.95
    noise, other = scores["noise"][0], scores["another prompt's scene"][0]
    assert noise.rate("recall") < 0.2 and noise.rate("exact") == 0.0
    assert other.rate("recall") < 0.6 and other.rate("exact") < 0.2


def test_fidelity_counts_only_stated_attributes():
    scene = next(s for s in (render_scene(ShapesConfig(max_objects=1), i) for i in range(50))
                 if s.stated == ("colour", "shape"))
    tally = score_fidelity(scene, segment(scene.image))
    assert tally.trials["size"] == tally.trials["position"] == tally.trials["relation"] == 0
    assert tally.rate("exact") == 1.0
    blank = np.full_like(scene.image, 235)
    tally = score_fidelity(scene, segment(blank))
    assert tally.rate("recall") == 0.0 and tally.rate("colour") is None and tally.rate("exact") == 0.0


def test_object_words_number_repeated_nouns():
    scene = next(s for s in (render_scene(ShapesConfig(min_objects=2, max_objects=2), i) for i in range(200))
                 if s.objects[0].shape == s.objects[1].shape)
    labels = object_words(scene)
    words = scene.caption.split()
    first = min(range(2), key=lambda k: words.index(scene.objects[k].colour))
    assert labels[first]["noun"] == scene.objects[0].shape
    assert labels[1 - first]["noun"] == scene.objects[0].shape + "#2"
    assert {lab["colour"] for lab in labels} == {o.colour for o in scene.objects}


def test_word_map_reads_heatmaps_at_image_size():
    tokens = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    maps = torch.rand(1, 5, 4, 4)
    h = Heatmaps(maps=maps, tokens=[tokens], prompts=["a red circle"], image_size=(16, 16), layers=["x"], steps=[0])
    m = word_map(h, 0, "circle")
    assert m.shape == (16, 16) and m.dtype == np.float32
    assert m.mean() == pytest.approx(maps[0, 3].mean().item(), rel=1e-4)
    assert word_map(h, 0, "square") is None                             # not in the tokens: skipped


def test_mass_share_and_correlation():
    from t2i.metrics import correlation, effect_share, mass_share
    a, b = two_objects()
    both = (a | b).astype(np.float32)
    assert mass_share(both, a)[0] == pytest.approx(0.5) and effect_share(a[0] * 3.0, a[0]) == 1.0
    assert mass_share(np.zeros_like(both), a)[0] == pytest.approx(a.mean())    # no change: counts as uniform
    assert correlation(a, a)[0] == pytest.approx(1.0) and correlation(a, b)[0] < 0
    assert correlation(np.ones_like(both), a)[0] == 0                            # a constant map says nothing


def test_faithfulness_sets_attention_against_the_effect_and_the_effect_against_the_mask():
    from t2i.faithfulness import EffectSet, score_faithfulness
    a, b = two_objects()
    found = EffectSet()
    found.effects["colour"].append(b[0].astype(np.float32))   # the word changed object b ...
    found.maps["colour"].append(b[0].astype(np.float32))      # ... where its attention was ...
    found.masks["colour"].append(a[0])                        # ... but its object is a
    score = score_faithfulness(found, 32)["colour"]
    assert score["scored"] == 1 and score["attention"]["correlation"] == pytest.approx(1.0)
    assert score["effect"]["pointing"] == 0 and score["effect"]["share"] == 0 and score["effect"]["correlation"] is None
    assert score["uniform"]["share"] == pytest.approx(a.mean()) and score["uniform"]["correlation"] == 0
    assert score_faithfulness(EffectSet(), 32)["noun"]["attention"]["pointing"] is None


# -- evaluate and the CLI on a tiny model ---------------------------------------------------------

def test_evaluate_is_deterministic_and_json_ready():
    pipe = shapes_pipeline()
    report = evaluate(pipe, TINY, world=WORLD, progress=False)
    assert set(report.fidelity) == {"seen", "held-out", "paraphrase"}
    assert report.fidelity["seen"]["model"]["images"] == 2
    assert report.fidelity["held-out"]["training images"]["recall"]["rate"] == 1.0
    loc = report.localisation["seen"]["noun"]
    assert loc["scored"] + loc["not_found"] == report.fidelity["seen"]["model"]["recall"]["trials"]
    assert loc["no_token"] == 0
    faith = report.faithfulness["seen"]["colour"]                      # 2 prompts' colour words, each silenced
    assert set(report.faithfulness) == set(report.fidelity) and faith["scored"] + faith["not_found"] > 0
    json.dumps(report.to_dict())
    table = report.format_table()
    assert "Prompt fidelity" in table and "DAAM" in table and "held-out" in table
    again = evaluate(pipe, dataclasses.replace(TINY, batch_size=1), world=WORLD, progress=False)
    assert again.fidelity == report.fidelity and again.localisation == report.localisation


def test_eval_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_prompts"):
        EvalConfig(num_prompts=0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        EvalConfig(scheduler="nope")


def test_cli_evaluate_prints_table_and_writes_json(tmp_path, capsys):
    from t2i.card import write_model_card
    from t2i.config import load_config
    shapes_pipeline().save_pretrained(tmp_path / "model")
    write_model_card(tmp_path / "model", load_config())
    out = tmp_path / "report.json"
    args = ["evaluate", "--model", str(tmp_path / "model"), "--num-prompts", "2", "--images-per-prompt", "1",
            "--steps", "2", "--calibration-prompts", "1", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## GenEval-style summary" in printed and "## Prompt fidelity" in printed and "## Heatmap localisation" in printed and "58.8" in printed
    report = json.loads(out.read_text())
    assert set(report["fidelity"]) == {"seen", "held-out", "paraphrase"}   # no train_config: assumed hold-out
    assert report["config"]["num_prompts"] == 2 and report["config"]["steps"] == 2
    card = (tmp_path / "model" / "README.md").read_text()  # the model card now holds the table, once
    assert "## Prompt fidelity" in card and "Not evaluated yet" not in card and card.count("## Evaluation") == 1
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--num-prompts", "0"]) == 2
    assert "num_prompts" in capsys.readouterr().err


def test_training_world_reads_train_config(tmp_path):
    from t2i.config import DataConfig, RunConfig, save_config
    pipe = shapes_pipeline()
    pipe.save_pretrained(tmp_path)
    save_config(RunConfig(data=DataConfig(size=16, max_objects=1, holdout_pairs=("red circle",))),
                tmp_path / "train_config.yaml")
    from t2i.pipeline import load_pipeline
    world, source = training_world(load_pipeline(str(tmp_path)))
    assert world.holdout_pairs == ("red circle",) and world.max_objects == 1 and "train_config" in source


# -- localisation scoring with known maps -----------------------------------------------------------

class OraclePipeline:
    """Stands in for a model on `world`: for each caption it returns that caption's scene as the image and,
    as each object word's attention map, the object's mask ("masks") or, for every token, all ones
    ("uniform"). Tokens are one per word, CLIP-style."""

    def __init__(self, world: ShapesConfig, config: EvalConfig, maps: str):
        from diffusers import DDPMScheduler

        from t2i.evaluate import paraphrase_scenes, prompt_scenes
        scenes = (prompt_scenes(world, "train", config.num_prompts, config.seed)
                  + prompt_scenes(world, "holdout", config.num_prompts, config.seed)
                  + paraphrase_scenes(world, config.num_prompts, config.seed)
                  + prompt_scenes(world, "train", config.calibration_prompts, config.seed + 1))
        self.scenes = {s.caption: s for s in scenes}
        self.maps, self.scheduler, self.name_or_path = maps, DDPMScheduler(), None

    def prompt_tokens(self, prompt):
        from t2i.text import BOS, EOS
        return [[BOS] + [w + "</w>" for w in prompt.split()] + [EOS]]

    def __call__(self, prompts, height, width, word_weights=None, **kwargs):
        """A silenced word (weight 0) takes its object out of the image: its pixels become background."""
        from types import SimpleNamespace

        from t2i.attention.heatmaps import resolve_word
        from t2i.text import BOS, EOS
        scenes = [self.scenes[p] for p in prompts]
        tokens = [[BOS] + [w + "</w>" for w in p.split()] + [EOS] for p in prompts]
        maps = torch.zeros(len(prompts), max(map(len, tokens)), height, width)
        for row, (scene, toks) in enumerate(zip(scenes, tokens)):
            if self.maps == "uniform":
                maps[row, : len(toks)] = 1.0
                continue
            for mask, labels in zip(scene.masks, object_words(scene)):
                for word in labels.values():
                    maps[row, resolve_word(toks, word)[1]] = torch.tensor(mask, dtype=torch.float32)
        images = np.stack([s.image for s in scenes]).astype(np.float32) / 255
        for row, weights in enumerate(word_weights or []):
            for mask, labels in zip(scenes[row].masks, object_words(scenes[row])):
                if any(weights.get(word) == 0 for word in labels.values()):
                    images[row][mask] = np.array(BACKGROUND, np.float32) / 255
        return SimpleNamespace(images=images, attention=Heatmaps(maps=maps, tokens=tokens, prompts=list(prompts),
                                                                 image_size=(height, width), layers=["oracle"],
                                                                 steps=[0]))


def test_maps_equal_to_the_masks_score_full_marks_and_uniform_maps_the_uniform_baseline():
    world = dataclasses.replace(WORLD, size=32)
    config = EvalConfig(num_prompts=6, images_per_prompt=1, steps=1, calibration_prompts=3, batch_size=4,
                        effect_prompts=4)
    perfect = evaluate(OraclePipeline(world, config, "masks"), config, world=world, progress=False)
    flat = evaluate(OraclePipeline(world, config, "uniform"), config, world=world, progress=False)
    for split in ("seen", "held-out", "paraphrase"):
        for word_class in ("noun", "colour"):
            p, f = perfect.localisation[split][word_class], flat.localisation[split][word_class]
            assert p["scored"] > 0 and p["no_token"] == 0, (split, word_class)
            assert p["ours"]["miou"] > 0.99 and p["ours"]["pointing"] == 1.0, (split, word_class, p["ours"])
            for metric in ("miou", "pointing"):
                assert f["ours"][metric] == pytest.approx(f["uniform"][metric]) and f["ours"][metric] < 0.5

    for split in ("seen", "held-out", "paraphrase"):
        for word_class in ("noun", "colour"):
            p, f = perfect.faithfulness[split][word_class], flat.faithfulness[split][word_class]
            assert p["scored"] > 0 and p["scored"] == f["scored"], (split, word_class)
            # silencing a word takes exactly its object out: the effect is all inside the mask
            assert p["effect"]["pointing"] == 1.0 and p["effect"]["share"] > 0.99, (split, word_class, p["effect"])
            assert p["attention"]["correlation"] > 0.95 and p["attention"]["share"] > 0.99
            assert p["uniform"]["correlation"] == 0 and p["centre prior"]["correlation"] < 0.5
            assert f["attention"] == pytest.approx(f["uniform"])       # uniform attention is the uniform baseline
    assert "## Faithfulness" in perfect.format_table() and "effect of silencing" in perfect.format_table()
