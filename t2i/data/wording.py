"""A caption grammar for the shapes world: the same scene said in many wordings (place before or after the
object, colour before or after the noun, lead-ins and verbs, joiners, synonyms for sizes, places and
relations, either order of a relation, punctuation and case), drawn afresh for every scene.

Every choice the grammar makes is a named element, "kind:phrase" (e.g. "place:in the upper left",
"lead:a picture of", "np:after"). A configuration holds some elements out (`holdout`): the training
wording never draws them, and the unseen-wording split of `t2i evaluate` puts at least one in every
caption. Held-out elements are made of words that training uses elsewhere ("upper" in "in the upper right",
"showing" as a lead-in of its own), so what they test is a new combination of known words, with one exception
in the shipped hold-out: "sitting" is said only by held-out frames (NEW_IN_HOLDOUT).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import numpy as np

# This module imports nothing of t2i (the config reads its hold-out): a `scene` is a t2i.data.shapes.ShapeScene.

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PLACES = {  # grid cell -> phrases; the first is the template's
    "top left": ("in the top left", "at the top left", "in the upper left", "in the top left corner",
                 "in the upper left corner", "top left"),
    "top": ("at the top", "in the top", "at the top edge", "in the top middle", "up at the top"),
    "top right": ("in the top right", "at the top right", "in the upper right", "in the top right corner",
                  "in the upper right corner", "top right"),
    "left": ("on the left", "at the left", "on the left side", "in the middle left", "to the left"),
    "center": ("in the center", "at the center", "in the middle", "in the centre", "right in the middle"),
    "right": ("on the right", "at the right", "on the right side", "in the middle right", "to the right"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the lower left", "in the bottom left corner",
                    "in the lower left corner", "bottom left"),
    "bottom": ("at the bottom", "in the bottom", "at the bottom edge", "in the bottom middle", "down at the bottom"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the lower right", "in the bottom right corner",
                     "in the lower right corner", "bottom right"),
}
RELATIONS = {  # one axis of a relation -> phrases; the first is the template's
    "above": ("above", "over", "higher than", "up from"),
    "below": ("below", "under", "beneath", "lower than", "down from"),
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
}
INVERSE = {"above": "below", "below": "above", "left": "right", "right": "left"}
# Frames: {np} a noun phrase, {place} a place phrase, {a} {b} noun phrases, {rel} a relation phrase.
LEADS = ("", "there is", "i see", "a picture of", "an image of", "a drawing of", "showing", "here is", "we see",
         "a picture showing", "an image showing")          # before a noun phrase
CLAUSE_LEADS = ("", "in this picture", "in this image", "here", "in the picture")  # before a clause with a verb
NOUN_PHRASES = ("adj", "after", "that", "bare", "one")
PLACE_FRAMES = ("{np} {place}", "{place} {np}", "{place}, {np}", "{np} is {place}", "{np} sits {place}",
                "{np} sitting {place}", "{np} placed {place}", "{place} there is {np}", "{place} is {np}",
                "{np} that is {place}")
RELATION_FRAMES = ("{a} {rel} {b}", "{a} is {rel} {b}", "{a} sits {rel} {b}", "{a} placed {rel} {b}",
                   "{a} sitting {rel} {b}", "{a}, {rel} {b}", "{a} that is {rel} {b}")
JOINERS = ("{a} and {b}", "{a} with {b}", "{a} plus {b}", "{a}, {b}", "{a} and also {b}", "{a} and {b} together",
           "{a} together with {b}", "{a} next to {b}", "both {a} and {b}")
ENDINGS = ("", ".", "!")
CASES = ("lower", "first", "upper")

# The held-out set of the shipped recipe (configs/shapes32.yaml): each element's words occur in training
# elsewhere, and each kind keeps most of its elements in training.
DEFAULT_HOLDOUT = (
    "place:in the upper left", "place:in the lower right corner", "place:at the top edge", "place:in the middle right",
    "relation:lower than", "relation:on the left of",
    "lead:a picture showing", "clause-lead:in this image", "np:after",
    "frame:{np} sitting {place}", "frame:{place} there is {np}",
    "relation-frame:{a} sitting {rel} {b}",
    "joiner:{a} together with {b}",
)
NEW_IN_HOLDOUT = ("sitting",)  # DEFAULT_HOLDOUT's one word that no training caption says


@functools.cache
def elements() -> dict[str, tuple[str, ...]]:
    """Every element of the grammar by kind: {"place": ("place:in the top left", ...), ...}."""
    kinds = {
        "size": [w for words in SIZE_WORDS.values() for w in words],
        "place": [p for phrases in PLACES.values() for p in phrases],
        "relation": [p for phrases in RELATIONS.values() for p in phrases],
        "lead": LEADS, "clause-lead": CLAUSE_LEADS, "np": NOUN_PHRASES, "frame": PLACE_FRAMES, "relation-frame": RELATION_FRAMES,
        "joiner": JOINERS, "ending": ENDINGS, "case": CASES,
    }
    return {kind: tuple(f"{kind}:{p}" for p in phrases) for kind, phrases in kinds.items()}


ALL_ELEMENTS = frozenset(e for group in elements().values() for e in group)
_ONLY_MODES = ("train", "unseen", "all")


def check_holdout(holdout) -> tuple[str, ...]:
    """The held-out elements as a tuple, each checked against the grammar; a kind keeps at least one element."""
    holdout = tuple(holdout)
    for e in holdout:
        if e not in ALL_ELEMENTS:
            kind = e.partition(":")[0]
            known = elements().get(kind)
            hint = (f"valid {kind} elements: {', '.join(known)}" if known
                    else f"the kinds are {', '.join(elements())}")
            raise ValueError(f"unknown wording element {e!r} in data.holdout_wording; {hint}")
    for kind, group in elements().items():
        if all(e in holdout for e in group):
            raise ValueError(f"data.holdout_wording holds out every {kind} element; keep at least one in training")
    return holdout


_FINITE = re.compile(r"(?<!that )\b(is|sits)\b")  # a frame with a verb of its own takes a clause lead-in


@dataclass(frozen=True)
class Caption:
    text: str
    spans: tuple[tuple[int, int, int], ...]  # (start, end, object index) of each object's own words
    used: tuple[str, ...]                     # the grammar elements the caption drew


class _Builder:
    """Text assembled piece by piece, remembering the character spans of object words."""

    def __init__(self):
        self.text, self.spans, self.finite = "", [], False

    def add(self, piece: str, obj: int | None = None) -> None:
        if not piece:
            return
        if self.text and not piece.startswith((",", ".", "!")):
            self.text += " "
        if obj is not None:
            self.spans.append((len(self.text), len(self.text) + len(piece), obj))
        self.text += piece

    def frame(self, frame: str, parts: dict) -> None:
        """Fill `frame` ("{np} is {place}"): each {slot} names a callable that adds its words."""
        self.finite |= bool(_FINITE.search(frame))
        for token in re.split(r"(\{\w+\})|\s+", frame):
            if token and token.startswith("{"):
                parts[token[1:-1]]()
            elif token:
                self.add(token.rstrip(","))
                if token.endswith(","):
                    self.add(",")


class Grammar:
    """Draws captions of shapes-world scenes. mode "train": never a held-out element; "unseen": at least one
    held-out element in every caption (the rest drawn from all); "all": any element. Captions have at most
    `max_words` words and punctuation marks."""

    def __init__(self, holdout=DEFAULT_HOLDOUT, mode: str = "train", max_words: int = 28):
        if mode not in _ONLY_MODES:
            raise ValueError(f"mode must be one of {_ONLY_MODES}, got {mode!r}")
        self.holdout, self.mode, self.max_words = frozenset(check_holdout(holdout)), mode, max_words
        if mode == "unseen" and not self.holdout:
            raise ValueError("the unseen-wording mode needs held-out elements (data.holdout_wording)")

    def caption(self, scene, rng: np.random.Generator) -> Caption:
        """A caption for `scene` stating exactly scene.stated, in a wording drawn from rng."""
        forced = None
        if self.mode == "unseen":
            applicable = [e for e in sorted(self.holdout) if _applies(e, scene)]
            if not applicable:
                raise ValueError(f"no held-out wording element applies to a scene stating {scene.stated}")
            forced = applicable[int(rng.integers(len(applicable)))]
        for _ in range(100):  # a draw too long, or one that could not use the forced element, is drawn again
            caption = self._draw(scene, rng, forced)
            if (forced is None or forced in caption.used) and len(_WORDS.findall(caption.text)) <= self.max_words:
                return caption
        raise RuntimeError(f"no caption of {self.max_words} words or fewer for a scene stating {scene.stated}")

    def _draw(self, scene, rng: np.random.Generator, forced: str | None) -> Caption:
        used: list[str] = []

        def pick(kind: str, phrases) -> str:
            names = [f"{kind}:{p}" for p in phrases]
            if forced in names:
                names = [forced]
            elif self.mode == "train":
                names = [n for n in names if n not in self.holdout]
            name = names[int(rng.integers(len(names)))]
            used.append(name)
            return name.partition(":")[2]

        body, objs, with_size = _Builder(), scene.objects, "size" in scene.stated

        def noun_phrase(k: int) -> None:
            obj, form = objs[k], pick("np", NOUN_PHRASES)
            size = pick("size", SIZE_WORDS[obj.size]) if with_size else None
            first = size or (obj.shape if form in ("after", "that") else obj.colour)
            body.add({"one": "one", "bare": ""}.get(form, "an" if first[0] in "aeiou" else "a"))
            if size:
                body.add(size, k)
            if form in ("after", "that"):
                body.add(obj.shape, k)
                body.add("in" if form == "after" else "that is")
                body.add(obj.colour, k)
            else:
                body.add(obj.colour, k)
                body.add(obj.shape, k)

        def placed(k: int) -> None:
            place = pick("place", PLACES[objs[k].position])
            body.frame(pick("frame", PLACE_FRAMES), {"np": lambda: noun_phrase(k), "place": lambda: body.add(place)})

        if "relation" in scene.stated:
            i, j = (0, 1) if rng.random() < 0.5 else (1, 0)  # "A above B" or "B below A"
            rel = " and ".join(pick("relation", RELATIONS[axis]) for axis in _axes(objs[i], objs[j]))
            body.frame(pick("relation-frame", RELATION_FRAMES),
                       {"a": lambda: noun_phrase(i), "rel": lambda: body.add(rel), "b": lambda: noun_phrase(j)})
        else:
            one = placed if "position" in scene.stated else noun_phrase

            def listed(k: int) -> None:  # objects k, k+1, ... joined pairwise
                if k == len(objs) - 1:
                    return one(k)
                body.frame(pick("joiner", JOINERS), {"a": lambda: one(k), "b": lambda: listed(k + 1)})
            listed(0)
        body.add(pick("ending", ENDINGS))
        lead = pick("clause-lead" if body.finite else "lead", CLAUSE_LEADS if body.finite else LEADS)
        shift = len(lead) + 1 if lead else 0
        text = f"{lead} {body.text}" if lead else body.text
        case = pick("case", CASES)
        text = text.upper() if case == "upper" else text[:1].upper() + text[1:] if case == "first" else text
        return Caption(text, tuple((a + shift, b + shift, k) for a, b, k in body.spans), tuple(used))


_WORDS = re.compile(r"[\w]+|[^\w\s]")


def _axes(a, b) -> list[str]:
    """Where `a` is relative to `b`, one word per axis: ["above", "left"], ["below"], ..."""
    vertical = ("above" if a.row < b.row else "below") if a.row != b.row else None
    horizontal = ("left" if a.col < b.col else "right") if a.col != b.col else None
    return [axis for axis in (vertical, horizontal) if axis]


def _applies(element: str, scene) -> bool:
    """Whether some caption of `scene` can use `element` (a relation phrase only where its axis exists)."""
    kind, _, phrase = element.partition(":")
    stated, objs = scene.stated, scene.objects
    if kind == "size":
        return "size" in stated and any(phrase in SIZE_WORDS[o.size] for o in objs)
    if kind in ("place", "frame"):
        return "position" in stated and (kind == "frame" or any(phrase in PLACES[o.position] for o in objs))
    if kind == "joiner":
        return "relation" not in stated and len(objs) > 1
    if kind in ("relation-frame", "relation"):
        return "relation" in stated and (kind == "relation-frame" or any(
            phrase in RELATIONS[axis] for x, y in (objs, objs[::-1]) for axis in _axes(x, y)))
    if kind == "clause-lead":  # only a caption with a verb takes one
        return "position" in stated or "relation" in stated
    return True  # lead-ins, noun phrases, endings, case


FUNCTION_WORDS = frozenset({"a", "an", "the", "one", "is", "there", "in", "at", "on", "of", "that", "and", "sits",
                            "sitting", "placed", "here", "i", "see", "we", "showing"})


def drop_words(caption: Caption, p: float, rng: np.random.Generator) -> Caption:
    """Word dropout: each function word (FUNCTION_WORDS, never an object's own word) left out with probability p;
    what the caption states stays stated."""
    if p <= 0:
        return caption
    keep = []
    text, spans = caption.text, list(caption.spans)
    for m in re.finditer(r"\w+ ?", text):
        if m.group().strip().lower() in FUNCTION_WORDS and rng.random() < p:
            keep.append((m.start(), m.end()))
    if not keep:
        return caption
    out, last, shifted = "", 0, []
    for a, b in keep:
        out += text[last:a]
        last = b
    out += text[last:]
    for a, b, k in spans:
        before = sum(e - s_ for s_, e in keep if e <= a)
        shifted.append((a - before, b - before, k))
    return Caption(out.strip(), tuple(shifted), caption.used)


@functools.cache
def grammar(holdout: tuple[str, ...], mode: str) -> Grammar:
    """The Grammar of a hold-out and mode, built (and its hold-out checked) once per process: the training
    stream asks for it for every scene."""
    return Grammar(holdout, mode)


def reword(scene, grammar: Grammar, rng: np.random.Generator):
    """`scene` with a caption drawn from `grammar`, and the spans of its object words."""
    caption = grammar.caption(scene, rng)
    return dataclasses.replace(scene, caption=caption.text, spans=caption.spans)


def grammar_corpus(object_words: list[str]) -> list[str]:
    """Every phrase the grammar can say (all elements, held out or not) and `object_words` (colours, shapes),
    for learning a tokenizer's vocabulary."""
    words = list(object_words) + ["a", "an", "one", "in", "that", "is", "and", ",", ".", "!"]
    phrases = [e.partition(":")[2] for e in ALL_ELEMENTS if not e.startswith(("np:", "case:"))]
    return [re.sub(r"\{\w+\}", " ", p).strip() for p in phrases if p] + words
