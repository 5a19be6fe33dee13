"""ImageFolderDataset and transforms: formats, crops, determinism, and the errors users hit."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.folder import ImageFolderDataset
from t2i.data.transforms import horizontal_flip, load_rgb, resize_and_crop, to_pil, to_tensor


def make_image(path, size=(24, 16), mode="RGB", seed=0):
    """Write a small noise image (W, H) = size in the given PIL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(noise).convert(mode).save(path)  # RGBA -> mode
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def check_sample(sample, size):
    x = sample["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(sample["text"], str)


def by_name(ds):
    return {p.name: c for p, c in zip(ds.paths, ds.captions)}


# ---- formats -------------------------------------------------------------------------------------


def test_jsonl_including_subfolder(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.jpg")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.jpg", "text": "a dog"}])
    make_image(tmp_path / "sub" / "c.png")
    write_jsonl(tmp_path / "sub" / "metadata.jsonl", [{"file_name": "c.png", "text": "a cow"}])
    ds = ImageFolderDataset(tmp_path, size=8)
    assert len(ds) == 3
    assert by_name(ds) == {"a.png": "a cat", "b.jpg": "a dog", "c.png": "a cow"}
    check_sample(ds[0], 8)


def test_txt_sidecars_nested_and_uppercase_extension(tmp_path):
    for rel, text in [("x.png", "one"), ("deep/er/y.JPG", "two"), ("deep/z.webp", "three\n")]:
        image = make_image(tmp_path / rel)
        image.with_suffix(".txt").write_text(text)
    ds = ImageFolderDataset(tmp_path, size=12)
    assert by_name(ds) == {"x.png": "one", "y.JPG": "two", "z.webp": "three"}
    for i in range(len(ds)):
        check_sample(ds[i], 12)


@pytest.mark.parametrize("name,header", [("metadata.csv", ["file_name", "text"]), ("captions.csv", ["image", "caption"])])
def test_csv(tmp_path, name, header):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "imgs" / "b.bmp")
    write_csv(tmp_path / name, header, [["a.png", "red, then blue"], ["imgs/b.bmp", "green"]])
    ds = ImageFolderDataset(tmp_path, size=8)
    assert by_name(ds) == {"a.png": "red, then blue", "b.bmp": "green"}


def test_custom_caption_column(tmp_path):
    make_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "short", "long": "a long caption"}])
    assert ImageFolderDataset(tmp_path, caption_column="long").captions == ["a long caption"]
    with pytest.raises(ValueError, match="caption_column"):
        ImageFolderDataset(tmp_path, caption_column="prompt")


def test_mixed_modes(tmp_path):
    modes = {"rgba.png": "RGBA", "grey.png": "L", "pal.png": "P", "la.png": "LA", "rgb.gif": "P", "bw.bmp": "1"}
    for i, (name, mode) in enumerate(modes.items()):
        make_image(tmp_path / name, mode=mode, seed=i).with_suffix(".txt").write_text(name)
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(tmp_path / "deep16.png")  # 16-bit grey
    (tmp_path / "deep16.txt").write_text("sixteen")
    ds = ImageFolderDataset(tmp_path, size=8)
    assert len(ds) == len(modes) + 1
    for i in range(len(ds)):
        check_sample(ds[i], 8)
    grey16 = ds[ds.captions.index("sixteen")]["pixel_values"]
    assert torch.allclose(grey16, torch.full_like(grey16, round(40000 / 257) / 127.5 - 1))


def test_alpha_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


# ---- transforms and determinism ------------------------------------------------------------------


def test_resize_crop_and_tensor_round_trip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert resize_and_crop(image, 10).size == (10, 10)
    assert resize_and_crop(image, 64, crop="random", rng=np.random.default_rng(1)).size == (64, 64)
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop(image, 10, crop="random")
    x = to_tensor(image)
    assert x.shape == (3, 30, 50) and x.dtype == torch.float32
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(image))
    batch = to_pil(torch.stack([x, horizontal_flip(x)]))
    assert np.array_equal(np.asarray(batch[1]), np.asarray(horizontal_flip(image)))


def test_center_vs_random_crop_determinism(tmp_path):
    for i in range(4):
        make_image(tmp_path / f"{i}.png", size=(40, 16), seed=i).with_suffix(".txt").write_text(f"image {i}")
    center = ImageFolderDataset(tmp_path, size=8)
    random = ImageFolderDataset(tmp_path, size=8, crop="random", seed=3)
    again = ImageFolderDataset(tmp_path, size=8, crop="random", seed=3)
    assert torch.equal(center[0]["pixel_values"], center[0]["pixel_values"])
    epoch0 = [random[i]["pixel_values"] for i in range(4)]
    assert all(torch.equal(a, again[i]["pixel_values"]) for i, a in enumerate(epoch0))
    assert any(not torch.equal(a, center[i]["pixel_values"]) for i, a in enumerate(epoch0))
    random.set_epoch(1)
    epoch1 = [random[i]["pixel_values"] for i in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    random.set_epoch(0)  # resuming at epoch 0 replays it exactly
    assert all(torch.equal(a, random[i]["pixel_values"]) for i, a in enumerate(epoch0))


# ---- flip warning --------------------------------------------------------------------------------


def test_flip_warns_on_left_right(tmp_path):
    make_image(tmp_path / "a.png").with_suffix(".txt").write_text("a ball on the Left")
    make_image(tmp_path / "b.png").with_suffix(".txt").write_text("a bright star")  # "bright" is not "right"
    with pytest.warns(UserWarning, match="flip=False"):
        ImageFolderDataset(tmp_path, flip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageFolderDataset(tmp_path, flip=False)


def test_flip_without_sided_captions_is_silent_and_deterministic(tmp_path):
    for i in range(6):
        make_image(tmp_path / f"{i}.png", seed=i).with_suffix(".txt").write_text("a bright star")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flipped = ImageFolderDataset(tmp_path, size=16, flip=True, seed=1)
    plain = ImageFolderDataset(tmp_path, size=16)
    outcomes = []
    for i in range(6):
        x, ref = flipped[i]["pixel_values"], plain[i]["pixel_values"]
        assert torch.equal(x, flipped[i]["pixel_values"])
        assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))
        outcomes.append(torch.equal(x, ref))
    assert len(set(outcomes)) == 2  # some flipped, some not (fixed by seed=1)


# ---- bad input -----------------------------------------------------------------------------------


def test_corrupt_image_skipped_with_one_warning(tmp_path):
    make_image(tmp_path / "good.png").with_suffix(".txt").write_text("fine")
    for name in ("bad1.png", "bad2.jpg"):
        (tmp_path / name).write_bytes(b"this is not an image" * 10)
    with pytest.warns(UserWarning, match=r"Skipped 2 of 3 images") as record:
        ds = ImageFolderDataset(tmp_path)  # the corrupt files have no captions: skipped, not an error
    assert len(record) == 1 and "bad1.png" in str(record[0].message)
    assert len(ds) == 1 and [p.name for p in ds.skipped] == ["bad1.png", "bad2.jpg"]


def test_missing_captions_error_lists_offenders(tmp_path):
    make_image(tmp_path / "a.png").with_suffix(".txt").write_text("ok")
    for i in range(7):
        make_image(tmp_path / f"nocap{i}.png")
    with pytest.raises(ValueError, match=r"7 of 8 images have no caption") as error:
        ImageFolderDataset(tmp_path)
    message = str(error.value)
    assert "nocap0.png" in message and "nocap6.png" not in message  # first few only
    assert "metadata.jsonl" in message and ".txt" in message and "captions.csv" in message


def test_caption_for_missing_image_errors(tmp_path):
    make_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}])
    with pytest.raises(ValueError, match="gone.png"):
        ImageFolderDataset(tmp_path)


def test_empty_and_missing_root(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"No images found.*\.png.*\.jpg"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def write_damaged_images(folder):
    """A truncated JPEG and a PNG with damaged pixel data: both pass PIL's verify(), neither decodes."""
    import io
    import struct
    import zlib
    noise = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    at = png.index(b"IDAT")
    n = struct.unpack(">I", png[at - 4:at])[0]
    png[at + 14:at + 34] = b"\xff" * 20                               # damage the compressed pixels
    png[at + 4 + n:at + 8 + n] = struct.pack(">I", zlib.crc32(bytes(png[at:at + 4 + n])))  # with a valid CRC
    (folder / "damaged.png").write_bytes(bytes(png))
    for name in ("truncated.jpg", "damaged.png"):
        (folder / name).with_suffix(".txt").write_text(f"a {name}")


def test_images_that_fail_only_when_decoded_are_skipped_and_counted(tmp_path):
    from t2i.config import load_config
    from t2i.data.stream import data_stream
    for i in range(3):
        make_image(tmp_path / f"good{i}.png", seed=i).with_suffix(".txt").write_text(f"good {i}")
    write_damaged_images(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolderDataset(tmp_path, size=16)                   # both pass the up-front check
    assert len(ds) == 5
    bad = [i for i, p in enumerate(ds.paths) if "good" not in p.name]
    with pytest.warns(UserWarning, match=r"skipped .*(truncated.jpg|damaged.png).* could not be decoded") as record:
        items = [ds[i] for i in bad]
    assert len(record) == 2 and len(ds.unreadable) == 2
    for i, item in zip(bad, items):
        check_sample(item, 16)
        assert item["text"].startswith("good")                       # the next readable image stands in
        assert torch.equal(ds[i]["pixel_values"], item["pixel_values"])  # the same one each time: resumable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = data_stream(ds, load_config(None, ["train.batch_size=5"]))
        assert all(next(batches)["pixel_values"].shape == (5, 3, 16, 16) for _ in range(3))


def test_index_beside_the_data_is_reused_and_invalidated_per_file(tmp_path, monkeypatch):
    import t2i.data.folder as folder
    from t2i.data.index import INDEX_NAME
    for i in range(3):
        make_image(tmp_path / f"{i}.png", seed=i)
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    first = ImageFolderDataset(tmp_path, size=8)
    assert (first.index.checked, first.index.reused) == (3, 0)
    saved = json.loads((tmp_path / INDEX_NAME).read_text())["files"]
    assert saved["1.png"]["verified"] is True and saved["1.png"]["caption"] == "caption 1" and saved["1.png"]["size"] > 0

    def no_verify(path):
        raise AssertionError(f"{path} verified again")

    monkeypatch.setattr(folder, "_is_readable_image", no_verify)  # a later run (or process) verifies nothing
    again = ImageFolderDataset(tmp_path, size=8)
    assert (again.index.checked, again.index.reused) == (0, 3) and again.captions == first.captions
    monkeypatch.undo()
    (tmp_path / "1.png").write_bytes(b"not an image any more")  # a changed file is verified again, alone
    (tmp_path / "2.png").unlink()
    (tmp_path / "2.txt").unlink()
    with pytest.warns(UserWarning, match="Skipped 1 of 2"):
        changed = ImageFolderDataset(tmp_path, size=8)
    assert (changed.index.checked, changed.index.reused) == (1, 1) and changed.captions == ["caption 0"]
    assert sorted(json.loads((tmp_path / INDEX_NAME).read_text())["files"]) == ["0.png", "1.png"]


@pytest.mark.parametrize("files", [[], {"0.png": []}, {"0.png": {"size": 1}}])
def test_a_hand_edited_index_is_rebuilt(tmp_path, files):
    from t2i.data.index import INDEX_NAME
    for i in range(2):
        make_image(tmp_path / f"{i}.png", seed=i)
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"version": 1, "files": files}))
    ds = ImageFolderDataset(tmp_path, size=8)
    assert (ds.index.checked, ds.index.reused) == (2, 0) and ds.captions == ["caption 0", "caption 1"]
