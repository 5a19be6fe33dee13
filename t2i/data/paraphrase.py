"""Paraphrases of shapes-world captions in wordings that the training templates never use (other
prepositions, word orders, joiners, sentence frames), stating exactly what the original states, so
`t2i evaluate` can score a model on what a person would type rather than on its training templates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .shapes import ShapeObject, ShapeScene, relation

# grid cell -> prepositional phrases the templates never produce ("in the top left" is the template's)
_POSITIONS = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("in the top", "at the top edge", "up at the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("at the left", "on the left side", "to the left"),
    "center": ("at the center", "in the middle", "right in the center"),
    "right": ("at the right", "on the right side", "to the right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("in the bottom", "at the bottom edge", "down at the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_JOINERS = ("{a} with {b}", "{a} as well as {b}", "{a} plus {b}", "there is {a} and {b}", "{a} and also {b}")
_RELATION_FRAMES = ("there is {a} {rel} {b}", "the {a_bare} is {rel} the {b_bare}", "{a} placed {rel} {b}",
                    "{a} that is {rel} {b}")
_SINGLE_FRAMES = ("there is {a}", "the {a_bare}", "{a} on a grey background", "just {a}")


def _bare(obj: ShapeObject, with_size: bool) -> str:
    return " ".join(([obj.size] if with_size else []) + [obj.colour, obj.shape])


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def paraphrase(scene: ShapeScene, rng: np.random.Generator) -> ShapeScene:
    """`scene` with a new caption that states the same attributes (scene.stated) in an unseen wording."""
    objs, stated = scene.objects, scene.stated
    with_size = "size" in stated
    bare = [_bare(o, with_size) for o in objs]
    phrases = [_article(b) for b in bare]

    def pick(options):
        return options[int(rng.integers(len(options)))]

    if "relation" in stated:
        a, b = objs
        caption = pick(_RELATION_FRAMES).format(a=phrases[0], b=phrases[1], a_bare=bare[0], b_bare=bare[1],
                                                rel=relation(a, b))
    elif "position" in stated:
        located = [(phrases[k], pick(_POSITIONS[o.position])) for k, o in enumerate(objs)]
        if len(objs) == 1:
            (a, where), = located
            caption = pick((f"there is {a} {where}", f"{where} there is {a}", f"{a} {where}",
                            f"the {bare[0]} is {where}"))
        else:
            caption = pick((" and ".join(f"{where} {a}" for a, where in located),
                            " with ".join(f"{a} {where}" for a, where in located)))
    elif len(objs) == 1:
        caption = pick(_SINGLE_FRAMES).format(a=phrases[0], a_bare=bare[0])
    else:
        caption = phrases[0]
        for p in phrases[1:]:
            caption = pick(_JOINERS).format(a=caption, b=p)
    return dataclasses.replace(scene, caption=caption)
