"""Shapes world: procedural scenes of 1 to 3 flat-coloured shapes on a light background, with captions and masks.

Rendering uses a hard pixel grid with no antialiasing: a pixel belongs to an object exactly when its centre lies
inside the shape (triangle rows are tested at their lower edge so the apex row is never empty), and then it has
exactly the object's palette colour. So `masks[k]` is exactly the set of pixels painted in object k's colour.

Layout: the image is a 3x3 grid of cells; each object sits in its own cell (centred, with a small jitter; a large
object is pulled inward to keep a 1 px margin); the boxes of two objects never touch, and no two objects share a
colour. Everything is deterministic given (config.seed, index).
"""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ..config import DataConfig

RGB = tuple[int, int, int]

# Well separated in RGB: the closest pair (orange, yellow) is 91 apart; every colour is >= 200 from the background.
PALETTE: dict[str, RGB] = {
    "red": (210, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 225, 30),
    "green": (40, 170, 70),
    "blue": (40, 90, 225),
    "purple": (150, 50, 190),
}
BACKGROUND: RGB = (235, 235, 235)
SHAPES = ("circle", "square", "triangle", "diamond")  # the segmenter tells all four apart at 32 px, blurred or noisy
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4375}  # side of the object's box / side of the image
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major: POSITIONS[3 * row + col], row 0 at the top, col 0 on the left
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
SPLITS = ("train", "holdout", "all")
WORDINGS = ("templates", "grammar")
_MAX_ATTEMPTS = 1000
MAX_OBJECTS = 3  # the most objects a scene holds (the layout grid and the grounding targets are sized for it)


@dataclass(frozen=True)
class ShapesConfig:
    """Which scenes the world draws. Held-out combinations: "colour shape" pairs and "shape@position" strings.

    split="train" never draws a held-out combination; "holdout" puts at least one in every scene; "all" ignores them.
    """

    size: int = 32
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    seed: int = 0
    background: RGB = BACKGROUND
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    holdout_pairs: tuple[str, ...] = ()
    holdout_positions: tuple[str, ...] = ()
    split: str = "train"
    jitter: bool = True
    position_prob: float = 0.5  # share of one-object and "A and B" captions that state grid positions
    wording: str = "templates"  # "templates" (five fixed caption templates) or "grammar" (t2i.data.wording)
    holdout_wording: tuple[str, ...] = ()  # grammar elements training never draws ("place:in the upper left")
    grammar_share: float = 1.0  # wording="grammar": share of captions the grammar says; the rest keep the template
    word_dropout: float = 0.0   # wording="grammar": each function word of a grammar caption left out with this chance

    def __post_init__(self):
        for name in ("background", "colours", "shapes", "holdout_pairs", "holdout_positions", "holdout_wording"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML gives lists
        if self.size < 16:
            raise ValueError(f"ShapesConfig.size must be >= 16 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {self.min_objects} and {self.max_objects}"
            )
        if self.seed < 0:
            raise ValueError(f"ShapesConfig.seed must be >= 0, got {self.seed}")
        if not 0 <= self.position_prob <= 1:
            raise ValueError(f"ShapesConfig.position_prob must be in [0, 1], got {self.position_prob}")
        _check_names("colour", self.colours, tuple(PALETTE))
        _check_names("shape", self.shapes, SHAPES)
        if len(set(self.colours)) < self.max_objects:
            raise ValueError(f"max_objects={self.max_objects} needs at least that many distinct colours")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple in 0..255, got {self.background}")
        for name in self.colours:
            if np.linalg.norm(np.subtract(PALETTE[name], self.background)) < 100:
                raise ValueError(f"background {self.background} is too close to {name}; use a light grey")
        if not 0 <= self.word_dropout < 1:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")
        if not 0 <= self.grammar_share <= 1:
            raise ValueError(f"grammar_share must be in [0, 1], got {self.grammar_share}")
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {WORDINGS}, got {self.wording!r}")
        from .wording import check_holdout
        check_holdout(self.holdout_wording)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for pair in self.holdout_pairs:
            colour, _, shape = pair.partition(" ")
            _check_names("colour", (colour,), self.colours, f" (in holdout_pairs entry {pair!r})")
            _check_names("shape", (shape,), self.shapes, f" (in holdout_pairs entry {pair!r})")
        for entry in self.holdout_positions:
            shape, _, position = entry.partition("@")
            _check_names("shape", (shape,), self.shapes, f" (in holdout_positions entry {entry!r}, 'shape@position')")
            _check_names("position", (position,), POSITIONS, f" (in holdout_positions entry {entry!r})")
        if self.split == "holdout" and not (self.holdout_pairs or self.holdout_positions):
            raise ValueError("split='holdout' needs holdout_pairs or holdout_positions")
        if self.split == "train" and all(
            _is_held_out(self, c, s, p) for c in self.colours for s in self.shapes for p in POSITIONS
        ):
            raise ValueError("the hold-out covers every colour-shape-position combination; split='train' is empty")


def shapes_world(data: DataConfig, split: str = "train") -> ShapesConfig:
    """The world a run config's data section describes (t2i.config.DataConfig), for one split."""
    return ShapesConfig(size=data.size, min_objects=data.min_objects, max_objects=data.max_objects, seed=data.seed,
                        holdout_pairs=data.holdout_pairs, holdout_positions=data.holdout_positions,
                        position_prob=data.position_prob, wording=data.wording,
                        holdout_wording=data.holdout_wording, grammar_share=data.grammar_share,
                        word_dropout=data.word_dropout, split=split)


def _check_names(kind: str, names, valid, where: str = "") -> None:
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {kind} {name!r}{where}; valid: {', '.join(valid)}")


def _is_held_out(config: ShapesConfig, colour: str, shape: str, position: str) -> bool:
    return f"{colour} {shape}" in config.holdout_pairs or f"{shape}@{position}" in config.holdout_positions


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. `box` = (x0, y0, x1, y1) in pixels, end-exclusive: mask[y0:y1, x0:x1] holds it."""

    shape: str
    colour: str
    size: str
    position: str
    row: int
    col: int
    box: tuple[int, int, int, int]


def is_held_out(config: ShapesConfig, obj: ShapeObject) -> bool:
    """Whether `obj` has a colour-shape pair or shape-position combination that `config` holds out."""
    return _is_held_out(config, obj.colour, obj.shape, obj.position)


@dataclass(frozen=True, eq=False)
class ShapeScene:
    """A rendered scene. image: uint8 (H, W, 3); masks: bool (n, H, W), one per object, disjoint.

    stated: what the caption says about every object: "colour" and "shape", plus "size" and either "position"
    (its grid cell) or "relation" (its place relative to the other object) when the caption says them.
    spans: (start, end, object index) of each object's own words in the caption, where the caption is not a
    template's (None: object_word_spans reads them off the "[size] colour shape" phrases).
    """

    image: np.ndarray
    caption: str
    objects: tuple[ShapeObject, ...]
    masks: np.ndarray
    stated: tuple[str, ...]
    spans: tuple[tuple[int, int, int], ...] | None = None


# 1. Geometry: each shape as a predicate on box coordinates u, v in [-1, 1] (v grows downwards).

def _inside(shape: str, u: np.ndarray, v: np.ndarray, v_low: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex up, base at the bottom; a row's width is taken at its lower edge
        return np.abs(u) <= (v_low + 1.0) / 2.0
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def shape_mask(shape: str, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Bool (height, width) mask of `shape` filling the square `box` = (x0, y0, x1, y1), end-exclusive."""
    x0, y0, x1, y1 = box
    side = x1 - x0
    u = (np.arange(x0, x1) + 0.5 - x0) * (2.0 / side) - 1.0  # pixel centres, (side,)
    v = (np.arange(y0, y1) + 0.5 - y0) * (2.0 / side) - 1.0
    v_low = v + 1.0 / side
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = _inside(shape, u[None, :], v[:, None], v_low[:, None])
    return mask


def object_side(config: ShapesConfig, size: str) -> int:
    """Side in pixels of a `size` object's box: 8 (small) and 14 (large) at 32 px."""
    return int(round(SIZES[size] * config.size))


# 2. Layout: pick objects cell by cell, rejecting scenes whose boxes touch or break the split.

def _place(config: ShapesConfig, rng: np.random.Generator, size: str, cell: int) -> tuple[int, int, int, int]:
    side, n = object_side(config, size), config.size
    margin = max(1, n // 32)
    jitter = margin if config.jitter else 0
    row, col = divmod(cell, 3)
    x0 = int(round((col + 0.5) * n / 3 - side / 2)) + int(rng.integers(-jitter, jitter + 1))
    y0 = int(round((row + 0.5) * n / 3 - side / 2)) + int(rng.integers(-jitter, jitter + 1))
    x0 = min(max(x0, margin), n - margin - side)
    y0 = min(max(y0, margin), n - margin - side)
    return x0, y0, x0 + side, y0 + side


def _touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two end-exclusive boxes overlap or have no background pixel between them."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _draw_objects(config: ShapesConfig, rng: np.random.Generator) -> list[ShapeObject]:
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    held_out = config.holdout_pairs + config.holdout_positions
    for _ in range(_MAX_ATTEMPTS):
        objects: list[ShapeObject] = []
        for k in range(n):
            colours = [c for c in config.colours if c not in {o.colour for o in objects}]
            cells = [i for i in range(9) if i not in {3 * o.row + o.col for o in objects}]
            colour, shape, cell = rng.choice(colours), rng.choice(config.shapes), rng.choice(cells)
            if config.split == "holdout" and k == 0:  # force one held-out combination into the scene
                forced = held_out[rng.integers(len(held_out))]
                if "@" in forced:
                    shape, position = forced.split("@")
                    cell = POSITIONS.index(position)
                else:
                    colour, shape = forced.split(" ")
            size = rng.choice(tuple(SIZES))
            box = _place(config, rng, size, int(cell))
            row, col = divmod(int(cell), 3)
            obj = ShapeObject(str(shape), str(colour), str(size), POSITIONS[cell], row, col, box)
            if any(_touch(box, o.box) for o in objects):
                break
            if config.split == "train" and is_held_out(config, obj):
                break
            objects.append(obj)
        if len(objects) == n:
            return [objects[i] for i in rng.permutation(n)]
    raise RuntimeError(f"could not lay out a scene in {_MAX_ATTEMPTS} attempts; loosen the hold-out or max_objects")


# 3. Captions: lower-case words, no punctuation; "an" before a vowel.

def _noun_phrase(obj: ShapeObject, with_size: bool, with_position: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    phrase = " ".join([article] + words)
    return f"{phrase} {POSITION_PHRASES[obj.position]}" if with_position else phrase


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b` in grid cells: "above", "to the left of", "below and to the right of", ..."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    if not (vertical or horizontal):
        raise ValueError("two objects in the same cell have no relation")
    return " and ".join(w for w in (vertical, horizontal) if w)


def _caption(objects: list[ShapeObject], rng: np.random.Generator,
             position_prob: float = 0.5) -> tuple[str, tuple[str, ...]]:
    """A caption for the scene and what it states about each object."""
    # Templates: one object (size half the time, position with position_prob); two objects: "A <relation> B" or
    # "A and B" (with positions at position_prob); three objects: "A and B and C" with sizes or positions or neither.
    with_size, with_position = bool(rng.random() < 0.5), bool(rng.random() < position_prob)
    use_relation = len(objects) == 2 and bool(rng.random() < 0.5)
    if len(objects) == 3 and with_size and with_position:
        with_size = with_position = False  # keep three-object captions short
    if use_relation:
        a, b = objects
        caption = f"{_noun_phrase(a, with_size, False)} {relation(a, b)} {_noun_phrase(b, with_size, False)}"
    else:
        caption = " and ".join(_noun_phrase(o, with_size, with_position) for o in objects)
    stated = ("colour", "shape") + (("size",) if with_size else ()) + (
        ("relation",) if use_relation else ("position",) if with_position else ()
    )
    return caption, stated


def caption_corpus(config: ShapesConfig) -> list[str]:
    """Captions covering every word the caption templates (and the grammar, when `config` uses it) can produce
    for `config`, for building a vocabulary."""
    from .wording import grammar_corpus
    corpus = grammar_corpus(list(config.colours) + list(config.shapes)) if config.wording == "grammar" else []
    for colour in config.colours:
        for shape in config.shapes:
            for size in (None,) + tuple(SIZES):
                for position in (None,) + POSITIONS:
                    obj = ShapeObject(shape, colour, size or "small", position or "center", 1, 1, (0, 0, 1, 1))
                    corpus.append(_noun_phrase(obj, size is not None, position is not None))
    a = ShapeObject(config.shapes[0], config.colours[0], "small", "center", 1, 1, (0, 0, 1, 1))
    for row in range(3):
        for col in range(3):
            if (row, col) != (1, 1):
                b = ShapeObject(config.shapes[-1], config.colours[-1], "large", POSITIONS[3 * row + col], row, col,
                                (0, 0, 1, 1))
                corpus.append(f"{_noun_phrase(a, False, False)} {relation(a, b)} {_noun_phrase(b, False, False)}")
    corpus.append(f"{_noun_phrase(a, False, False)} and {_noun_phrase(a, False, False)}")
    return corpus


# 4. Scenes, the dataset, and an image-folder writer.

def render_scene(config: ShapesConfig, index: int) -> ShapeScene:
    """Scene number `index` (>= 0) of the world; deterministic in (config.seed, index)."""
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = np.random.default_rng((config.seed, index))
    objects = _draw_objects(config, rng)
    caption, stated = _caption(objects, rng, config.position_prob)
    spans = None
    said_rng = np.random.default_rng((config.seed, index, 1))  # its own stream: the scene is the templates' scene
    if config.wording == "grammar" and said_rng.random() < config.grammar_share:  # said in a wording drawn afresh
        from .wording import drop_words, grammar
        said = grammar(config.holdout_wording, "all" if config.split == "all" else "train").caption(
            ShapeScene(None, caption, tuple(objects), None, stated), said_rng)
        said = drop_words(said, config.word_dropout, said_rng)
        caption, spans = said.text, said.spans
    n = config.size
    masks = np.stack([shape_mask(o.shape, o.box, n, n) for o in objects])  # (k, H, W)
    image = np.empty((n, n, 3), dtype=np.uint8)
    image[:] = config.background
    for obj, mask in zip(objects, masks):
        image[mask] = PALETTE[obj.colour]
    image.flags.writeable = False
    masks.flags.writeable = False
    return ShapeScene(image, caption, tuple(objects), masks, stated, spans)


def object_word_spans(scene: ShapeScene) -> list[tuple[int, int, int]]:
    """(start, end, object index) character spans of each object's own words in `scene.caption`: its size
    (when stated), colour and shape noun. Colours are unique in a scene, and a noun phrase is always
    "[size] colour shape", so the words are found from the colour's place (a grammar caption brings its own)."""
    if scene.spans is not None:
        return list(scene.spans)
    starts, pos = [], 0
    words = scene.caption.split(" ")
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    spans = []
    for k, obj in enumerate(scene.objects):
        i = words.index(obj.colour)
        own = [i - 1, i, i + 1] if "size" in scene.stated else [i, i + 1]
        spans += [(starts[j], starts[j] + len(words[j]), k) for j in own]
    return spans


MAX_GROUNDED_WORDS = 3 * MAX_OBJECTS  # (size, colour, shape) of each object


def grounding_targets(scene: ShapeScene) -> dict[str, torch.Tensor]:
    """Padded grounding targets of a scene: "ground_spans" long (K, 2) character spans of object words
    (-1 where unused) and "ground_masks" float (K, H, W), the mask of each word's object."""
    spans = object_word_spans(scene)
    n = scene.image.shape[0]
    out_spans = torch.full((MAX_GROUNDED_WORDS, 2), -1, dtype=torch.long)
    out_masks = torch.zeros((MAX_GROUNDED_WORDS, n, n), dtype=torch.float32)
    for j, (a, b, k) in enumerate(spans):
        out_spans[j] = torch.tensor([a, b])
        out_masks[j] = torch.from_numpy(scene.masks[k].astype(np.float32))
    return {"ground_spans": out_spans, "ground_masks": out_masks}


class ShapesDataset(torch.utils.data.Dataset):
    """Scenes generated on the fly: item i is always scene i, so a run can resume at any index.

    Items: {"pixel_values": float32 (3, H, W) in [-1, 1], "text": caption}, plus `grounding_targets`
    when `grounding=True`.
    """

    shuffle = False  # scene i is already a random draw: the training stream reads items in order

    def __init__(self, config: ShapesConfig = ShapesConfig(), length: int = 1_000_000, grounding: bool = False):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.config, self.length, self.grounding = config, length, grounding

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> ShapeScene:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        return render_scene(self.config, i)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        scene = self.scene(i)
        pixels = np.ascontiguousarray(scene.image.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0  # (3, H, W)
        item = {"pixel_values": torch.from_numpy(pixels), "text": scene.caption}
        return {**item, **grounding_targets(scene)} if self.grounding else item


WORLD_FILE = "shapes_world.json"  # beside a written folder's images: the ShapesConfig that drew them


def write_image_folder(config: ShapesConfig, num: int, out_dir: str | Path, progress: bool = True) -> Path:
    """Write scenes 0..num-1 as PNGs plus metadata.jsonl (Hugging Face imagefolder layout) and the world that drew
    them (WORLD_FILE) into the new or empty folder `out_dir`, atomically: into a folder beside it, renamed into
    place when complete. Returns out_dir."""
    out = Path(out_dir)
    if num < 1:
        raise ValueError(f"--num must be at least 1 image, got {num}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already holds files or is one; pass a new or empty folder (nothing is "
                         "overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # on --out's disk
    try:
        digits = max(6, len(str(num - 1)))
        with open(stage / "metadata.jsonl", "w") as meta:
            for i in tqdm(range(num), desc="shapes", disable=not progress):
                scene = render_scene(config, i)
                name = f"{i:0{digits}d}.png"
                Image.fromarray(scene.image).save(stage / name)
                objects = [
                    {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position,
                     "row": o.row, "col": o.col, "box": list(o.box)}
                    for o in scene.objects
                ]
                meta.write(json.dumps({"file_name": name, "text": scene.caption, "objects": objects}) + "\n")
        (stage / WORLD_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")  # for t2i evaluate
        try:
            os.rename(stage, out)  # replaces a missing or empty folder only
        except OSError:
            raise ValueError(f"--out {out} was filled by another writer meanwhile; its files stay, these were not "
                             "written. Pass a new folder.") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
