"""t2i.scoring: what evaluate and its faithfulness pass share: a scene's object words, their maps, the
per-image seeds, and the faithfulness scores of effect and attention maps."""
import numpy as np
import pytest
import torch
from conftest import two_objects

from t2i.attention import Heatmaps
from t2i.data.shapes import ShapesConfig, render_scene
from t2i.scoring import image_seed, object_words, word_map


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


def test_an_images_seed_depends_on_its_place_alone():
    places = [(split, prompt, sample) for split in range(3) for prompt in range(4) for sample in range(2)]
    seeds = {image_seed(12345, *place) for place in places}
    assert len(seeds) == 24 and image_seed(12345, 1, 2, 0) == image_seed(12345, 1, 2, 0)
    assert image_seed(12345, 1, 2, 0) != image_seed(12346, 1, 2, 0)
