"""A user's folder of images with captions (metadata.jsonl, .txt sidecars, or a CSV) as a torch Dataset.

ImageFolderDataset: images found recursively under a root, each paired with a caption.

Captions come from any of three formats (they can be mixed; an image may have only one):
    1. metadata.jsonl, one JSON object per line: {"file_name": "a.png", "text": "a red cube"}
       (Hugging Face imagefolder; may sit in any sub-folder, file_name relative to it),
    2. a .txt file beside each image with the same stem: a.png + a.txt,
    3. metadata.csv or captions.csv with columns file_name,text (or image,caption).
Entries in metadata.jsonl / CSV files take precedence over .txt sidecars.

For the token-grounding loss (grounding=True), a metadata.jsonl line may also name a mask image per word of
its caption: {"file_name": "a.png", "text": "a red cube", "masks": {"cube": "a_cube.png"}} (paths relative to
the jsonl's folder; white = the object). Images without "masks" train without grounding.

Random crops and flips are a pure function of (seed, epoch, index): call set_epoch(e)
before each epoch (with DataLoader workers that are re-created each epoch, the default
persistent_workers=False) and a resumed run sees exactly the same samples.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .index import FolderIndex
from .transforms import CROP_MODES, CropMode, horizontal_flip, load_rgb, resize_and_crop, to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
JSONL_NAMES = ("metadata.jsonl",)
CSV_NAMES = ("metadata.csv", "captions.csv")
FILE_COLUMNS = ("file_name", "image")
MAX_LISTED = 5  # offending files named in an error or warning

CAPTION_FORMATS = (
    "Captions are read from (1) metadata.jsonl lines like "
    '{"file_name": "a.png", "text": "..."} (file_name relative to the jsonl\'s folder), '
    "(2) a .txt file beside each image with the same name (a.png -> a.txt), or "
    "(3) metadata.csv / captions.csv with columns file_name,text (or image,caption)."
)
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _listing(paths: list, root: Path) -> str:
    """First MAX_LISTED paths relative to root, comma-separated, then 'and N more'."""
    shown = ", ".join(str(_relative(p, root)) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def _walk(root: Path) -> Iterator[Path]:
    """Every file under root, skipping hidden files and folders (.git, .ipynb_checkpoints)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _is_readable_image(path: Path) -> bool:
    """True if PIL recognises the file and its structure verifies (cheap: no full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        return False


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a metadata.jsonl."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one object.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}.")
            yield number, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each data row of a CSV with a header line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            yield reader.line_num, row


def _pick_column(row: dict, names: tuple[str, ...], what: str, where: str) -> str:
    for name in names:
        if name in row:
            return name
    raise ValueError(
        f"{where}: no {what} column; looked for {' or '.join(map(repr, names))}, found {sorted(row)}. "
        + ("Pass caption_column='<name>' to use another column." if what == "caption" else "")
    )


class CaptionedImages(Dataset):
    """What every source of captioned images shares: {"pixel_values": (3, size, size) in [-1, 1], "text": str}
    with crops and flips a pure function of (seed, epoch, index), and a stand-in for an image that fails to
    decode. A subclass sets `captions` and implements `_open(index)` (a PIL image) and `_name(index)`."""

    shuffle = True  # items come in storage order: the training stream permutes them each epoch
    captions: list[str]
    grounding = False

    def _set_root(self, root: str | os.PathLike, name: str, fix: str) -> None:
        """self.root, an existing folder, or a ValueError: '<name> <root> does not exist; <fix>'."""
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise ValueError(f"{name} {str(self.root)!r} {what}; {fix}")

    def _check_view(self, size: int, crop: CropMode, flip: bool, seed: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int (image side in pixels), got {size!r}.")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        self.size, self.crop, self.flip, self.seed = size, crop, bool(flip), seed
        self.epoch = 0
        self.unreadable: set[int] = set()  # items that passed the up-front check but failed to decode

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and flips __getitem__ returns."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}.")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """{"pixel_values": float32 (3, size, size) in [-1, 1], "text": caption}. An image that fails to decode
        although it passed the up-front check (a truncated JPEG) is skipped, named in a warning and counted in
        `unreadable`; the next image that decodes stands in for it, the same one every time."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images.")
        start = index % len(self)
        for k in range(len(self)):
            index = (start + k) % len(self)
            image = self._decode(index)
            if image is not None:
                break
        else:
            raise ValueError(f"None of the {len(self)} images in {str(self.root)!r} could be decoded.")
        rng = np.random.default_rng([self.seed, self.epoch, index])  # no global RNG: resumable
        image = resize_and_crop(image, self.size, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            image = horizontal_flip(image)
        item = {"pixel_values": to_tensor(image), "text": self.captions[index]}
        if self.grounding:
            item.update(self._grounding_targets(index))
        return item

    def _decode(self, index: int) -> Image.Image | None:
        """Image `index` as RGB, or None (with a warning the first time) when it cannot be decoded."""
        if index in self.unreadable:
            return None
        try:
            return self._open(index)
        except Exception as error:  # PIL raises many types on damaged data
            self.unreadable.add(index)
            worker = torch.utils.data.get_worker_info()
            where = f" by data worker {worker.id}" if worker is not None else ""
            warnings.warn(f"skipped {self._name(index)}: it could not be decoded ({error}); the next image stands in "
                          f"for it. {len(self.unreadable)} of {len(self)} images skipped so far{where}. "
                          "Delete or re-export it to silence this.", stacklevel=4)
            return None

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def item_key(self, index: int) -> str:
        """Who image `index` is, for caches of its encoding: changes when the image's file changes."""
        raise NotImplementedError

    def _grounding_targets(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ImageFolderDataset(CaptionedImages):
    """Images under `root` (recursive) with captions, as {"pixel_values": (3, size, size) in [-1, 1], "text": str}.

    Corrupt images are skipped with one warning; images without captions, captions
    without images, and an empty folder are ValueErrors.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 32,
        crop: CropMode = "center",
        flip: bool = False,
        seed: int = 0,
        caption_column: str = "text",
        grounding: bool = False,
    ) -> None:
        # 1. Check arguments.
        self._set_root(root, "Dataset root", "pass the folder that holds your images.")
        self._check_view(size, crop, flip, seed)
        self.caption_column = caption_column
        self.grounding = grounding
        self.masks: dict[Path, list[tuple[int, int, Path]]] = {}  # image -> (start, end, mask file) per word
        self.mask_files: set[Path] = set()

        # 2. Find images and caption files.
        files = list(_walk(self.root))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise ValueError(
                f"No images found in {str(self.root)!r} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case). Check the path, or convert your images to one of these types."
            )

        # 3. Skip images PIL cannot read, with one warning; the index beside the data keeps each verdict.
        index = FolderIndex(self.root)
        ok = [index.verified(p, _is_readable_image) for p in images]
        readable = [p for p, good in zip(images, ok) if good]
        self.skipped: list[Path] = [p for p, good in zip(images, ok) if not good]
        if self.skipped:
            warnings.warn(
                f"Skipped {len(self.skipped)} of {len(images)} images that could not be read (corrupt or not "
                f"really images): {_listing(self.skipped, self.root)}. Delete or re-export them to silence this.",
                stacklevel=2,
            )
        if not readable:
            raise ValueError(f"None of the {len(images)} images in {str(self.root)!r} could be read; all are corrupt.")

        # 4. Pair each image with its caption: metadata files first, then .txt sidecars.
        captions = self._metadata_captions(files, set(images))
        readable = [p for p in readable if p not in self.mask_files]
        missing = []
        for path in readable:
            if path not in captions:
                sidecar = path.with_suffix(".txt")
                if sidecar.is_file():
                    captions[path] = sidecar.read_text(encoding="utf-8-sig").strip()
            if not captions.get(path):
                missing.append(path)
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(readable)} images have no caption (or an empty one): "
                f"{_listing(missing, self.root)}. {CAPTION_FORMATS}"
            )
        self.paths: list[Path] = readable
        self.captions: list[str] = [captions[p] for p in readable]
        index.save(images, captions)
        self.index = index

        # 5. Flipping mirrors the image but not the words.
        if self.flip:
            sided = [c for c in self.captions if _LEFT_RIGHT.search(c)]
            if sided:
                warnings.warn(
                    f"flip=True mirrors images, but {len(sided)} captions mention 'left' or 'right' "
                    f"(e.g. {sided[0]!r}), which flipping makes wrong. Pass flip=False to keep them correct.",
                    stacklevel=2,
                )

    def _metadata_captions(self, files: list[Path], images: set[Path]) -> dict[Path, str]:
        """{image path: caption} from every metadata.jsonl / metadata.csv / captions.csv under root."""
        caption_names = (self.caption_column, "caption") if self.caption_column == "text" else (self.caption_column,)
        captions: dict[Path, str] = {}
        sources: dict[Path, str] = {}
        missing_images: list[str] = []
        for table in files:
            if table.name in JSONL_NAMES:
                rows = _read_jsonl(table)
            elif table.name in CSV_NAMES:
                rows = _read_csv(table)
            else:
                continue
            for number, row in rows:
                where = f"{_relative(table, self.root)}, line {number}"
                file_name = row[_pick_column(row, FILE_COLUMNS, "file name", where)]
                caption = row[_pick_column(row, caption_names, "caption", where)]
                if not isinstance(file_name, str) or not isinstance(caption, str):
                    raise ValueError(f"{where}: file name and caption must be strings, got {file_name!r} and {caption!r}.")
                image = Path(os.path.normpath(table.parent / file_name.strip()))
                if not image.is_file():
                    missing_images.append(f"{file_name!r} ({where})")
                    continue
                if image not in images:
                    raise ValueError(
                        f"{where}: {file_name!r} is not an image under {str(self.root)!r} with a supported type "
                        f"({', '.join(IMAGE_EXTENSIONS)}); fix the entry or convert the file."
                    )
                if image in sources:
                    raise ValueError(f"{where}: {file_name!r} already has a caption from {sources[image]}; keep one entry.")
                captions[image], sources[image] = caption.strip(), where
                if isinstance(row.get("masks"), dict):  # mask images are not training images
                    self.mask_files.update(Path(os.path.normpath(table.parent / str(m))) for m in row["masks"].values())
                if self.grounding and row.get("masks"):
                    self.masks[image] = _mask_entries(row["masks"], caption.strip(), table.parent, where)
        if missing_images:
            shown = "; ".join(missing_images[:MAX_LISTED])
            more = f" and {len(missing_images) - MAX_LISTED} more" if len(missing_images) > MAX_LISTED else ""
            raise ValueError(
                f"Caption entries point to {len(missing_images)} image files that do not exist: {shown}{more}. "
                "file_name is relative to the folder holding the metadata file; fix the name or remove the entry."
            )
        return captions

    def _open(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def _name(self, index: int) -> str:
        return repr(str(_relative(self.paths[index], self.root)))

    def item_key(self, index: int) -> str:
        """'relative/path.png|size|mtime_ns', from the stat the folder index took when the dataset opened."""
        name = self.paths[index].relative_to(self.root).as_posix()
        entry = self.index.entries[name]
        return f"{name}|{entry['size']}|{entry['mtime_ns']}"

    def _grounding_targets(self, index: int) -> dict[str, torch.Tensor]:
        """Spans (K, 2) and masks (K, size, size) of the image's grounded words, cropped like the image."""
        from .shapes import MAX_GROUNDED_WORDS
        spans = torch.full((MAX_GROUNDED_WORDS, 2), -1, dtype=torch.long)
        masks = torch.zeros((MAX_GROUNDED_WORDS, self.size, self.size))
        for k, (start, end, path) in enumerate(self.masks.get(self.paths[index], [])[:MAX_GROUNDED_WORDS]):
            rng = np.random.default_rng([self.seed, self.epoch, index])  # the image's crop and flip, replayed
            mask = resize_and_crop(Image.open(path).convert("L"), self.size, self.crop, rng)
            if self.flip and rng.random() < 0.5:
                mask = horizontal_flip(mask)
            spans[k] = torch.tensor([start, end])
            masks[k] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
        return {"ground_spans": spans, "ground_masks": masks}


def _mask_entries(masks, caption: str, folder: Path, where: str) -> list[tuple[int, int, Path]]:
    """[(start, end, mask path)] for a metadata line's {"word": "mask.png"}, checked up front."""
    if not isinstance(masks, dict):
        raise ValueError(f'{where}: "masks" must map words of the caption to mask files, e.g. {{"cube": "a_cube.png"}}.')
    entries = []
    for word, name in masks.items():
        match = re.search(rf"\b{re.escape(word)}\b", caption)
        if match is None:
            raise ValueError(f"{where}: mask word {word!r} is not a word of the caption {caption!r}; fix the word.")
        path = Path(os.path.normpath(folder / str(name)))
        if not path.is_file():
            raise ValueError(f"{where}: mask file {str(path)!r} for {word!r} does not exist; add it or remove the entry.")
        entries.append((match.start(), match.end(), path))
    return entries
