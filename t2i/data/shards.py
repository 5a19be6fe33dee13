"""Sharded input for datasets past one folder walk: Arrow shards written by Hugging Face `datasets`
(`t2i make-dataset shards`), or Parquet files, memory-mapped by every process and read by index.

ShardDataset: captioned images stored in shards, for data.kind=shards.

`t2i make-dataset shards --from FOLDER --out DIR` verifies an image folder once and writes its images (the
encoded file bytes, not pixels) and captions as `DIR/data-0000k-of-0000n.arrow` with `datasets`'
`save_to_disk`. Every training process memory-maps the shards: opening them costs no pass over the data, and
a shared filesystem serves all machines. A folder of Parquet files (a Hub dataset saved locally) also works;
`datasets` converts it once into its cache, on the main process first.

Shard sizes do not matter for distributed training: each process indexes the whole dataset and the training
stream hands it `batch_size` samples of every global batch (`t2i.data.stream.CounterSampler`), so no process
runs out of data before the others (the hang of a split-by-shard reader whose shards are uneven).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from .folder import CaptionedImages, ImageFolderDataset
from .transforms import CropMode, load_rgb

NEEDS_DATASETS = "data.kind=shards needs the Hugging Face datasets library: pip install datasets"
IMAGE_COLUMNS = ("image", "img", "jpg", "png")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError(NEEDS_DATASETS) from None
    return datasets


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000
                 ) -> tuple[int, int]:
    """Verify the image folder (captions, readable images; see ImageFolderDataset) and write its images and
    captions as Arrow shards of at most `shard_size` rows in the new folder `out`. Returns (rows, shards)."""
    datasets = _datasets()
    out = Path(out)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{str(out)!r} is not empty; pass a new folder for the shards (nothing is overwritten).")
    source = ImageFolderDataset(folder)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def rows():
        for path, caption in zip(source.paths, source.captions):
            yield {"image": {"bytes": path.read_bytes(), "path": path.name}, "text": caption}

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a writer that was killed
        if not _alive(stale.suffixes[-2][1:]):
            shutil.rmtree(stale, ignore_errors=True)
    # beside --out, on its disk, not in $TMPDIR: from_generator's cache, then the shards, renamed into place
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=f".{os.getpid()}.tmp", dir=out.parent))
    try:
        try:
            table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(stage / "cache"))
            shards = math.ceil(len(table) / shard_size)
            table.save_to_disk(str(stage / "shards"), num_shards=shards)
        except Exception as e:
            if not _full_disk(e):
                raise
            raise OSError(f"no space left on the disk of {out.parent} while writing the shards of {out}; nothing was "
                          "written: free space, then run it again") from None
        try:
            os.rename(stage / "shards", out)  # replaces a missing or empty --out only: one of two writers wins
        except OSError:
            raise ValueError(f"{str(out)!r} was filled by another writer meanwhile; its shards stay, these were "
                             "not written. Pass a new folder.") from None
        return len(table), shards
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _full_disk(e: BaseException | None) -> bool:
    """Whether `e` or an error it was raised from says the disk is full (datasets wraps the system's error)."""
    from ..checkpoint import no_space
    seen = set()
    while e is not None and id(e) not in seen:
        if no_space(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _alive(pid: str) -> bool:
    """Whether process `pid` (a string, as in a staging folder's name) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class ShardDataset(CaptionedImages):
    """Rows of Arrow shards (save_to_disk) or Parquet files under `root`, as {"pixel_values": (3, size, size)
    in [-1, 1], "text": str}, with the crops and flips of ImageFolderDataset (same seed, same pixels)."""

    def __init__(self, root: str | os.PathLike, size: int = 32, crop: CropMode = "center", flip: bool = False,
                 seed: int = 0, caption_column: str = "text") -> None:
        # 1. Check arguments and open the shards.
        datasets = _datasets()
        self._set_root(root, "Shard folder", "write one with `t2i make-dataset shards`.")
        self._check_view(size, crop, flip, seed)
        parquet = sorted(str(p) for p in self.root.rglob("*.parquet"))
        if (self.root / "state.json").is_file():
            table = datasets.load_from_disk(str(self.root))
            files = [f["filename"] for f in table.cache_files]
            self.sources = _row_counts(files, "arrow")
        elif parquet:
            files = parquet
            self.sources = _row_counts(parquet, "parquet")
            if not any(n for _, n in self.sources):
                raise ValueError(f"the Parquet files in {str(self.root)!r} hold no rows.")
            try:
                table = datasets.load_dataset("parquet", data_files=parquet, split="train")
            except Exception as e:
                if not _full_disk(e):
                    raise
                cache = datasets.config.HF_DATASETS_CACHE
                raise OSError(f"no space left on the disk of the datasets cache (HF_DATASETS_CACHE={cache}) while "
                              f"converting the Parquet files of {self.root}: free space there, or set "
                              "HF_DATASETS_CACHE to a folder on a disk with room") from None
        else:
            raise ValueError(f"{str(self.root)!r} holds no shards (no state.json of datasets' save_to_disk, no "
                             "*.parquet files); write them with `t2i make-dataset shards --from FOLDER --out DIR`.")
        self.stamps = [_stamp(f) for f in files]  # 'name|size|mtime_ns' of each source file
        if not isinstance(table, datasets.Dataset):
            raise ValueError(f"{str(self.root)!r} holds several splits; pass the folder of one (e.g. {self.root}/train).")

        # 2. Find the image and caption columns.
        columns = list(table.features)
        images = [c for c in columns if isinstance(table.features[c], datasets.Image)] or \
                 [c for c in IMAGE_COLUMNS if c in columns]
        wanted = (caption_column, "caption") if caption_column == "text" else (caption_column,)
        captions = [c for c in wanted if c in columns]
        if not images:
            raise ValueError(f"the shards in {str(self.root)!r} have no image column (an Image feature, or one named "
                             f"{', '.join(IMAGE_COLUMNS)}); their columns are {columns}.")
        if not captions:
            raise ValueError(f"the shards in {str(self.root)!r} have no caption column ({' or '.join(map(repr, wanted))}); "
                             f"their columns are {columns}. Pass data.caption_column=<name> for another caption column.")
        self.image_column, caption_column = images[0], captions[0]
        kind = table.features[caption_column]
        if getattr(kind, "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"the caption column {caption_column!r} of the shards in {str(self.root)!r} holds "
                             f"{getattr(kind, 'dtype', None) or 'lists'}, not text; pass data.caption_column=<name> "
                             f"of a text column (the columns are {columns}).")
        self.table = table.cast_column(self.image_column, datasets.Image(decode=False))  # bytes: we decode
        self._images = None  # the image column as Arrow, looked up per process (see _open)

        # 3. Every row needs a caption.
        self.captions = [(c or "").strip() for c in table.data.column(caption_column).to_pylist()]
        empty = [i for i, c in enumerate(self.captions) if not c]
        if not self.captions:
            raise ValueError(f"the shards in {str(self.root)!r} hold no rows.")
        if empty:
            raise ValueError(f"{len(empty)} of {len(self.captions)} rows have no caption (or an empty one), e.g. "
                             f"{'; '.join(self._row(i) for i in empty[:3])}; fix the source and write the shards again.")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # a data worker reopens the memory map, not a copy of the data

    def _open(self, index: int) -> Image.Image:
        if self._images is None:  # the column, not the row: 7 us a read instead of 66 us
            self._images = self.table.data.column(self.image_column)
        cell = self._images[index].as_py()
        if cell.get("bytes") is None:  # a Parquet row that points at a file instead of holding it
            return load_rgb(self.root / cell["path"])
        return load_rgb(io.BytesIO(cell["bytes"]))

    def _name(self, index: int) -> str:
        return f"{self._row(index)} of the shards in {str(self.root)!r}"

    def item_key(self, index: int) -> str:
        """'shard file name|size|mtime_ns|row', the row counted from 0 in its file."""
        k, row = self._source(index)
        return f"{self.stamps[k]}|{row}"

    def _row(self, index: int) -> str:
        """'row r of FILE' for global row `index`: the file it came from, counted from 0."""
        k, row = self._source(index)
        return f"row {row} of {self.sources[k][0]}" if k < len(self.sources) else f"row {row}"

    def _source(self, index: int) -> tuple[int, int]:
        """(which source file, row in it) of global row `index`."""
        for k, (_, rows) in enumerate(self.sources):
            if index < rows:
                return k, index
            index -= rows
        return len(self.sources), index


def _stamp(file: str) -> str:
    stat = os.stat(file)
    return f"{os.path.basename(file)}|{stat.st_size}|{stat.st_mtime_ns}"


def _row_counts(files: list[str], kind: str) -> list[tuple[str, int]]:
    """(file name, rows) of each shard file in order, from the Parquet footers or the Arrow memory maps."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if kind == "parquet":
        return [(os.path.basename(f), pq.ParquetFile(f).metadata.num_rows) for f in files]
    return [(os.path.basename(f), sum(b.num_rows for b in pa.ipc.open_stream(pa.memory_map(f)))) for f in files]
