import dataclasses
import re

import numpy as np
import pytest

from t2i.config import load_config
from t2i.data.shapes import SIZES, ShapesConfig, object_word_spans, render_scene, shapes_world
from t2i.data.wording import (ALL_ELEMENTS, DEFAULT_HOLDOUT, Grammar, check_holdout, drop_words, elements,
                              grammar_corpus, reword)
from t2i.data.wording import NEW_IN_HOLDOUT, SIZE_WORDS

WORLD = ShapesConfig(max_objects=2, position_prob=0.75)
GRAMMAR_WORLD = dataclasses.replace(WORLD, wording="grammar", holdout_wording=DEFAULT_HOLDOUT)
OWN_WORDS = set(SIZES) | {w for ws in SIZE_WORDS.values() for w in ws}


def _scenes(config, n, start=0):
    return [render_scene(config, i) for i in range(start, start + n)]


def test_training_draws_every_element_but_never_a_held_out_one():
    used, grammar, rng = set(), Grammar(DEFAULT_HOLDOUT, "train"), np.random.default_rng(0)
    for scene in _scenes(WORLD, 3000):
        used |= set(grammar.caption(scene, rng).used)
    assert not used & set(DEFAULT_HOLDOUT)
    assert used == ALL_ELEMENTS - set(DEFAULT_HOLDOUT)   # exactly what the configuration keeps in


def test_the_training_stream_keeps_out_exactly_what_the_config_holds_out():
    """What `t2i train` reads (scenes of data.wording=grammar) never says a held-out phrase, and a phrase
    the config does not hold out does appear."""
    cfg = load_config(None, ["data.wording=grammar",
                             "data.holdout_wording=[place:in the upper left corner,lead:a picture of]"])
    world = shapes_world(cfg.data, "train")
    captions = [s.caption.lower() for s in _scenes(world, 1500)]
    assert not any("in the upper left corner" in c or c.startswith("a picture of") for c in captions)
    assert any("in the upper right" in c for c in captions) and any(c.startswith("an image of") for c in captions)


def test_every_unseen_wording_caption_uses_a_held_out_element():
    grammar = Grammar(DEFAULT_HOLDOUT, "unseen")
    rng = np.random.default_rng(0)
    for scene in _scenes(WORLD, 300):
        caption = grammar.caption(scene, rng)
        assert set(caption.used) & set(DEFAULT_HOLDOUT), caption


def test_held_out_phrases_are_made_of_words_training_uses():
    """The unseen split tests new combinations of known words; the one word that only held-out elements say
    is the one wording.py names (NEW_IN_HOLDOUT)."""
    train_words = set()
    for scene in _scenes(GRAMMAR_WORLD, 3000):
        train_words |= set(re.findall(r"\w+", scene.caption.lower()))
    for element in DEFAULT_HOLDOUT:
        if element.startswith(("np:", "case:")):  # named forms, not phrases: "np:after" adds "in", "that is"
            continue
        phrase = re.sub(r"\{\w+\}", " ", element.partition(":")[2])
        assert set(re.findall(r"\w+", phrase)) - set(NEW_IN_HOLDOUT) <= train_words, element
    assert not set(NEW_IN_HOLDOUT) & train_words


def test_a_caption_states_the_scene_and_its_spans_cover_each_objects_own_words():
    for scene in _scenes(GRAMMAR_WORLD, 500):
        spans = object_word_spans(scene)
        assert scene.spans is not None or " ".join(scene.caption.split()) == scene.caption  # a template caption
        for k, obj in enumerate(scene.objects):
            said = {scene.caption[a:b].lower() for a, b, j in spans if j == k}
            assert {obj.colour, obj.shape} <= said
            assert ("size" in scene.stated) == bool(said & OWN_WORDS)
        if "position" in scene.stated and scene.spans is not None:
            words = scene.caption.lower()
            assert all(any(w in words for w in ("left", "right", "top", "bottom", "middle", "center", "centre",
                                                 "upper", "lower"))
                       for _ in scene.objects)


def test_the_grammar_is_drawn_afresh_per_scene_and_fixed_per_index():
    a, b = _scenes(GRAMMAR_WORLD, 200), _scenes(GRAMMAR_WORLD, 200)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert len({s.caption for s in a}) > 190


def test_template_wording_is_unchanged_by_the_grammar_fields():
    """Scenes and captions of the template world do not move when wording fields exist (numbers stay comparable)."""
    templates = _scenes(WORLD, 50)
    grammar = _scenes(dataclasses.replace(GRAMMAR_WORLD, grammar_share=0.0), 50)
    assert [s.caption for s in templates] == [s.caption for s in grammar]
    assert all((s.image == g.image).all() for s, g in zip(templates, grammar))


def test_word_dropout_leaves_object_words_and_keeps_spans_right():
    grammar = Grammar(DEFAULT_HOLDOUT, "train")
    rng = np.random.default_rng(0)
    dropped_any = False
    for scene in _scenes(WORLD, 200):
        caption = grammar.caption(scene, rng)
        cut = drop_words(caption, 0.5, rng)
        dropped_any |= cut.text != caption.text
        assert [cut.text[a:b] for a, b, _ in cut.spans] == [caption.text[a:b] for a, b, _ in caption.spans]
    assert dropped_any


@pytest.mark.parametrize("bad, message", [
    (("place:in the uper left",), "unknown wording element"),
    (("colour:red",), "the kinds are"),
    (tuple(elements()["np"]), "every np element"),
])
def test_a_bad_hold_out_is_refused_with_the_valid_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        check_holdout(bad)
    with pytest.raises(ValueError, match=message):  # at load time, before any training
        load_config(None, [f"data.holdout_wording=[{','.join(bad)}]", "data.wording=grammar"])


def test_the_tokenizer_corpus_of_a_grammar_world_holds_every_grammar_word():
    corpus_words = {w for c in grammar_corpus(['red', 'orange', 'yellow', 'green', 'blue', 'purple', 'circle', 'square', 'triangle', 'diamond']) for w in re.findall(r"\w+", c)}
    for scene in _scenes(GRAMMAR_WORLD, 500):
        assert set(re.findall(r"\w+", scene.caption.lower())) <= corpus_words | {"small", "large"}


def test_reword_keeps_the_scene_and_what_it_states():
    scene = render_scene(WORLD, 3)
    said = reword(scene, Grammar(DEFAULT_HOLDOUT, "unseen"), np.random.default_rng(1))
    assert said.objects == scene.objects and said.stated == scene.stated and said.caption != scene.caption
