"""t2i.evaluate: the report on prompt fidelity, localisation and faithfulness, its baselines, and `t2i evaluate`."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from t2i.attention import Heatmaps
from t2i.cli import main
from t2i.data.shapes import BACKGROUND, ShapesConfig, caption_corpus, render_scene
from t2i.evaluate import EvalConfig, evaluate, object_words, score_baseline_images, training_world

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


# -- fidelity of the baseline images -------------------------------------------------------------

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


# -- evaluate and the CLI on a tiny model ---------------------------------------------------------

def test_evaluate_is_deterministic_and_json_ready():
    pipe = shapes_pipeline()
    report = evaluate(pipe, TINY, world=WORLD, progress=False)
    assert set(report.fidelity) == {"seen", "held-out", "paraphrase", "unseen-wording"}
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
    out = tmp_path / "new" / "report.json"  # a missing folder is created, and said
    args = ["evaluate", "--model", str(tmp_path / "model"), "--num-prompts", "2", "--images-per-prompt", "1",
            "--steps", "2", "--calibration-prompts", "1", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (created the folder {out.parent})" in printed
    assert "## GenEval-style summary" in printed and "## Prompt fidelity" in printed and "## Heatmap localisation" in printed and "58.8" in printed
    report = json.loads(out.read_text())
    assert set(report["fidelity"]) == {"seen", "held-out", "paraphrase", "unseen-wording"}   # no train_config: assumed hold-out
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

def words(prompt: str) -> list[str]:
    """The oracle's tokens: lower-case words and punctuation marks, as CLIP's tokenizer splits them."""
    import re
    return re.findall(r"\w+|[^\w\s]", prompt.lower())


class OraclePipeline:
    """Stands in for a model on `world`: for each caption it returns that caption's scene as the image and,
    as each object word's attention map, the object's mask ("masks") or, for every token, all ones
    ("uniform"). Tokens are one per word, CLIP-style."""

    def __init__(self, world: ShapesConfig, config: EvalConfig, maps: str):
        from diffusers import DDPMScheduler

        from t2i.evaluate import paraphrase_scenes, prompt_scenes, unseen_wording_scenes
        from t2i.image_space import PixelSpace
        scenes = (prompt_scenes(world, "train", config.num_prompts, config.seed)
                  + prompt_scenes(world, "holdout", config.num_prompts, config.seed)
                  + paraphrase_scenes(world, config.num_prompts, config.seed)
                  + unseen_wording_scenes(world, config.num_prompts, config.seed)
                  + prompt_scenes(world, "train", config.calibration_prompts, config.seed + 1))
        self.scenes = {s.caption: s for s in scenes}
        self.maps, self.scheduler, self.name_or_path = maps, DDPMScheduler(), None
        self.image_space = PixelSpace()                       # a pixel model, as every pipeline says

    def prompt_tokens(self, prompt):
        from t2i.text import BOS, EOS
        return [[BOS] + [w + "</w>" for w in words(prompt)] + [EOS]]

    def __call__(self, prompts, height, width, word_weights=None, **kwargs):
        """A silenced word (weight 0) takes its object out of the image: its pixels become background."""
        from types import SimpleNamespace

        from t2i.attention.heatmaps import resolve_word
        from t2i.text import BOS, EOS
        scenes = [self.scenes[p] for p in prompts]
        tokens = [[BOS] + [w + "</w>" for w in words(p)] + [EOS] for p in prompts]
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
    for split in ("seen", "held-out", "paraphrase", "unseen-wording"):
        for word_class in ("noun", "colour"):
            p, f = perfect.localisation[split][word_class], flat.localisation[split][word_class]
            assert p["scored"] > 0 and p["no_token"] == 0, (split, word_class)
            assert p["ours"]["miou"] > 0.99 and p["ours"]["pointing"] == 1.0, (split, word_class, p["ours"])
            for metric in ("miou", "pointing"):
                assert f["ours"][metric] == pytest.approx(f["uniform"][metric]) and f["ours"][metric] < 0.5

    for split in ("seen", "held-out", "paraphrase", "unseen-wording"):
        for word_class in ("noun", "colour"):
            p, f = perfect.faithfulness[split][word_class], flat.faithfulness[split][word_class]
            assert p["scored"] > 0 and p["scored"] == f["scored"], (split, word_class)
            # silencing a word takes exactly its object out: the effect is all inside the mask
            assert p["effect"]["pointing"] == 1.0 and p["effect"]["share"] > 0.99, (split, word_class, p["effect"])
            assert p["attention"]["correlation"] > 0.95 and p["attention"]["share"] > 0.99
            assert p["uniform"]["correlation"] == 0 and p["centre prior"]["correlation"] < 0.5
            assert f["attention"] == pytest.approx(f["uniform"])       # uniform attention is the uniform baseline
    assert "## Faithfulness" in perfect.format_table() and "effect of silencing" in perfect.format_table()
