"""The shapes world: determinism, exact masks, captions, hold-out splits, validation, dataset and image folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.shapes import (
    PALETTE,
    POSITIONS,
    SIZES,
    ShapesConfig,
    ShapesDataset,
    caption_corpus,
    is_held_out,
    object_side,
    render_scene,
    write_image_folder,
)

HOLDOUT = dict(holdout_pairs=("green triangle", "purple circle"), holdout_positions=("square@bottom right",))


def test_same_seed_and_index_give_the_same_scene():
    config = ShapesConfig(seed=3)
    for i in range(5):
        a, b = render_scene(config, i), render_scene(ShapesConfig(seed=3), i)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert a.caption == b.caption and a.objects == b.objects
    other = ShapesConfig(seed=4)
    assert any(not np.array_equal(render_scene(config, i).image, render_scene(other, i).image) for i in range(5))
    assert any(not np.array_equal(render_scene(config, 0).image, render_scene(config, i).image) for i in (1, 2, 3))


@pytest.mark.parametrize("size", [32, 48, 64])
def test_masks_are_exactly_the_object_pixels(size):
    config = ShapesConfig(size=size, split="all")
    for i in range(150 if size == 32 else 30):
        scene = render_scene(config, i)
        n = len(scene.objects)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.masks.shape == (n, size, size) and scene.masks.dtype == bool
        assert scene.masks.sum(0).max() <= 1, "masks overlap"
        assert np.all(scene.image[~scene.masks.any(0)] == config.background)
        assert len({o.colour for o in scene.objects}) == n
        assert len({(o.row, o.col) for o in scene.objects}) == n
        for obj, mask in zip(scene.objects, scene.masks):
            assert np.all(scene.image[mask] == PALETTE[obj.colour])
            ys, xs = np.nonzero(mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj.box[2] - obj.box[0] == object_side(config, obj.size)
            assert POSITIONS[3 * obj.row + obj.col] == obj.position
            centre_x, centre_y = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            assert (int(3 * centre_y / size), int(3 * centre_x / size)) == (obj.row, obj.col)


def test_sizes_are_clearly_different_at_32px():
    config = ShapesConfig()
    assert {s: object_side(config, s) for s in SIZES} == {"small": 8, "large": 14}


def test_captions_name_every_object_and_use_the_corpus_words():
    config = ShapesConfig()
    vocabulary = {w for caption in caption_corpus(config) for w in caption.split()}
    for i in range(300):
        scene = render_scene(config, i)
        assert scene.caption == scene.caption.lower() and scene.caption.replace(" ", "").isalpha()
        assert set(scene.caption.split()) <= vocabulary
        assert {"colour", "shape"} <= set(scene.stated)
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in scene.caption
            if "size" in scene.stated:
                assert f"{obj.size} {obj.colour} {obj.shape}" in scene.caption
            if "position" in scene.stated:
                assert obj.position in scene.caption
    assert "an orange" in " ".join(caption_corpus(config))


def test_train_split_never_shows_a_held_out_combination_and_holdout_always_does():
    train, holdout = ShapesConfig(split="train", **HOLDOUT), ShapesConfig(split="holdout", **HOLDOUT)
    for i in range(300):
        assert not any(is_held_out(train, o) for o in render_scene(train, i).objects)
        assert any(is_held_out(holdout, o) for o in render_scene(holdout, i).objects)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(colours=("red", "pink", "blue")), "pink.*valid: red, orange, yellow, green, blue, purple"),
        (dict(shapes=("circle", "star")), "star.*valid: circle, square, triangle, diamond"),
        (dict(holdout_pairs=("teal circle",)), "teal.*valid: red"),
        (dict(holdout_positions=("square@middle",)), "middle.*valid: top left, top, top right"),
        (dict(holdout_positions=("square bottom",)), "shape@position"),
        (dict(split="test"), "train"),
        (dict(split="holdout"), "holdout_pairs or holdout_positions"),
        (dict(max_objects=4), "max_objects"),
        (dict(size=8), ">= 16"),
        (dict(background=(230, 220, 40)), "too close to .*light grey"),
    ],
)
def test_invalid_configs_say_what_is_valid(kwargs, names):
    with pytest.raises(ValueError, match=names):
        ShapesConfig(**kwargs)


def test_dataset_items_and_batches():
    dataset = ShapesDataset(ShapesConfig(), length=10)
    item = dataset[3]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["text"] == dataset.scene(3).caption == render_scene(dataset.config, 3).caption
    assert len(dataset) == 10 and len(ShapesDataset()) == 1_000_000
    with pytest.raises(IndexError):
        dataset[10]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(batch["text"]) == 4


def test_write_image_folder(tmp_path):
    config = ShapesConfig(seed=1)
    out = write_image_folder(config, 5, tmp_path / "shapes", progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in out.glob("*.png")) == [r["file_name"] for r in rows]
    for i, row in enumerate(rows):
        scene = render_scene(config, i)
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), scene.image)
        assert row["text"] == scene.caption
        assert [(o["shape"], o["colour"], o["size"], o["position"], tuple(o["box"])) for o in row["objects"]] == [
            (o.shape, o.colour, o.size, o.position, o.box) for o in scene.objects
        ]


def test_make_dataset_shapes_never_writes_into_a_folder_with_files_and_writes_atomically(tmp_path, monkeypatch,
                                                                                          capsys):
    """--out is a new or empty folder: one with the user's images and captions is refused and left as it was;
    a write that fails half-way leaves no --out (nor its staging folder); --num below 1 is refused."""
    import t2i.data.shapes as shapes
    from t2i.cli import main
    mine = tmp_path / "mine"
    write_image_folder(ShapesConfig(seed=5), 3, mine, progress=False)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert main(["make-dataset", "shapes", "--num", "2", "--size", "16", "--out", str(mine)]) == 2
    assert capsys.readouterr().err == (f"t2i make-dataset: error: --out {mine} already holds files or is one; pass a "
                                       "new or empty folder (nothing is overwritten)\n")
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert main(["make-dataset", "shapes", "--num", "-5", "--out", str(tmp_path / "neg")]) == 2
    assert "--num must be at least 1 image, got -5" in capsys.readouterr().err
    real, calls = shapes.render_scene, []

    def fails_at_the_third(config, i):
        calls.append(i)
        if i == 2:
            raise OSError(28, "No space left on device")
        return real(config, i)
    monkeypatch.setattr(shapes, "render_scene", fails_at_the_third)
    (tmp_path / "empty").mkdir()
    assert main(["make-dataset", "shapes", "--num", "4", "--size", "16", "--out", str(tmp_path / "empty")]) == 2
    assert calls == [0, 1, 2] and not list((tmp_path / "empty").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # no staging folder left
    monkeypatch.setattr(shapes, "render_scene", real)
    assert main(["make-dataset", "shapes", "--num", "2", "--size", "16", "--out", str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["000000.png", "000001.png", "metadata.jsonl",
                                                                      "shapes_world.json"]
