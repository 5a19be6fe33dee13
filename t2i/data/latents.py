"""The latent cache: each image's latent distribution under a frozen VAE, encoded once and kept beside the data,
so that latent training samples z = mean + std * eps each step instead of running the VAE encoder each step.

    space = LatentSpace(vae)
    cache = LatentCache(dataset, space)        # <data root>/.t2i-latents/<vae key>-<size>px/
    cache.build()                              # {"encoded": 3, "reused": 997, "damaged": 1}
    latents = CachedLatents(cache)             # {"latent_mean", "latent_std": (C, h, w), "text"}
    z = space.from_distribution(batch["latent_mean"], batch["latent_std"], generator)   # what the UNet denoises

Storage: one safetensors file per image, `<folder>/<d[:2]>/<d>.safetensors` with d a digest of the image's
`item_key` (its file, size and mtime). One file an image makes every property the cache needs a property of the
filesystem: a write is atomic (a temporary file renamed into place), an interrupted build keeps every finished
image, a changed image writes a new file of its own, damage stays in one entry, and a reader opens one small file
per sample from any DataLoader worker with no index to share or lock. 100,000 images are 100,000 files in 256
sub-folders (about 390 a folder). Chunk files would save inodes but need rewriting when one image changes.

Each file holds float32 (C, h, w) tensors `mean` and `std` (the VAE's raw units, before its scaling factor), and
`flip_mean`, `flip_std` for the mirrored image when the dataset flips; its metadata holds the item key and a
BLAKE2b checksum of the tensors' bytes, checked on every read. float32, not float16: float16 rounds a mean of
size 10 by up to 0.004, as large as the posterior std of a VAE trained with a small KL weight (SD's), the very
noise each step samples (not measured: no trained VAE offline). An SD entry at 512 px with flips is 256 KiB.
Files are not fsynced one by one: a power cut that leaves an entry empty or cut short fails its checksum, and the
next build re-encodes it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..image_space import LatentSpace

CACHE_NAME = ".t2i-latents"  # hidden: the folder walk skips it
VERSION = "1"                # of the entry format; part of every folder name
MAX_LISTED = 5               # damaged entries named in one warning
NAMES = ("mean", "std")
FLIP_NAMES = ("flip_mean", "flip_std")


class DamagedLatents(RuntimeError):
    """A cache entry read during training is missing or fails its checksum."""


def vae_key(vae) -> str:
    """12 hex digits of BLAKE2b over the VAE's class, config and weights: a changed VAE gets a new cache."""
    digest = hashlib.blake2b(digest_size=6)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not _name_or_path
    digest.update(f"{VERSION}|{type(vae).__name__}|{json.dumps(config, sort_keys=True, default=str)}".encode())
    for name, tensor in vae.state_dict().items():
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_folder(root: str | os.PathLike, vae, size: int) -> Path:
    """Where the latents of the images under `root` at `size` px live: <root>/.t2i-latents/<vae key>-<size>px."""
    return Path(root) / CACHE_NAME / f"{vae_key(vae)}-{size}px"


def _digest(item_key: str) -> str:
    return hashlib.blake2b(item_key.encode(), digest_size=16).hexdigest()


def _entry_path(folder: Path, digest: str) -> Path:
    return folder / digest[:2] / f"{digest}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_entry(path: Path, item_key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one image's tensors with its key and checksum, atomically: a temporary file renamed into place."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    data = save(tensors, metadata={"key": item_key, "checksum": _checksum(tensors), "version": VERSION})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_entry(path: Path, item_key: str) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(tensors, None) for a sound entry of `item_key`, or (None, what is wrong with it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "is missing"
    try:
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except Exception:  # safetensors and json raise many types on damaged bytes
        return None, f"is not a readable safetensors file ({len(data)} bytes)"
    if metadata.get("key") != item_key:
        return None, "holds another image"
    if metadata.get("checksum") != _checksum(tensors) or any(k not in tensors for k in NAMES):
        return None, "fails its checksum"
    return tensors, None


class LatentCache:
    """The latent distributions of every image of `dataset` (a CaptionedImages with center crops) under the VAE
    of `space`, one file per image in `folder` (default: cache_folder(dataset.root, vae, dataset.size))."""

    def __init__(self, dataset, space: LatentSpace, folder: str | os.PathLike | None = None, batch_size: int = 16):
        # 1. Check that the dataset's views can be encoded once.
        if not hasattr(dataset, "item_key") or not hasattr(dataset, "root"):
            raise ValueError(f"{type(dataset).__name__} has no stored images to cache (a procedural world draws new "
                             "ones); set data.latent_cache=off.")
        if dataset.crop != "center":
            raise ValueError(f"data.crop={dataset.crop} draws a new crop every epoch, which a latent cache cannot hold; "
                             "set data.crop=center, or data.latent_cache=off (encodes every step).")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.dataset, self.space, self.batch_size = dataset, space, batch_size
        self.folder = Path(folder) if folder is not None else cache_folder(dataset.root, space.vae, dataset.size)
        self.digests: list[str] | None = None  # per item, once built
        self.skipped: set[int] = set()         # items that did not decode: the next one stands in, as in the dataset

    def build(self, progress: bool = True) -> dict[str, int]:
        """Encode every image without a sound entry, reuse the rest, drop entries of images no longer in the
        dataset. Returns counts {"encoded", "reused", "damaged"} (damaged entries are re-encoded: counted in
        both). Stopped midway (Ctrl-C), it keeps every entry written; the next build encodes only the rest."""
        # 1. A view of the dataset that decodes and resizes as it does, unflipped: flips are encoded beside.
        view = copy.copy(self.dataset)
        view.flip, view.grounding, view.epoch = False, False, 0
        flip = self.dataset.flip
        wanted = NAMES + FLIP_NAMES if flip else NAMES
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot write the latent cache at {str(self.folder)!r} ({error.strerror}); make the "
                             "folder writable or set data.latent_cache=off.") from None

        # 2. Walk the images: reuse sound entries, batch the rest for the VAE, write each entry as it is encoded.
        keys = [self.dataset.item_key(i) for i in range(len(self.dataset))]
        digests = [_digest(k) for k in keys]
        counts, damaged, pending = {"encoded": 0, "reused": 0, "damaged": 0}, [], []
        with tqdm(total=len(keys), desc="latents", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for i, (key, digest) in enumerate(zip(keys, digests)):
                tensors, problem = read_entry(_entry_path(self.folder, digest), key)
                if tensors is not None and all(k in tensors for k in wanted):
                    counts["reused"] += 1
                    bar.update()
                    continue
                if problem not in (None, "is missing"):
                    counts["damaged"] += 1
                    damaged.append(f"{self.dataset._name(i)} ({problem})")
                pixels = view[i]["pixel_values"]  # (3, size, size) in [-1, 1]
                if i in view.unreadable:          # the dataset warned; the next image stands in at read time
                    self.skipped.add(i)
                    bar.update()
                    continue
                pending.append((i, pixels))
                if len(pending) == self.batch_size:
                    self._encode(pending, keys, digests, flip)
                    counts["encoded"] += len(pending)
                    bar.update(len(pending))
                    bar.set_postfix(counts, refresh=False)
                    pending = []
            if pending:
                self._encode(pending, keys, digests, flip)
                counts["encoded"] += len(pending)
                bar.update(len(pending))
        if damaged:
            more = f" and {len(damaged) - MAX_LISTED} more" if len(damaged) > MAX_LISTED else ""
            warnings.warn(f"re-encoded {len(damaged)} damaged latent cache entries in {self.folder}: "
                          f"{'; '.join(damaged[:MAX_LISTED])}{more}.", stacklevel=2)

        # 3. Drop entries (and temporary files of an interrupted build) that no image of the dataset owns.
        keep = {f"{d}.safetensors" for d in digests}
        for sub in self.folder.iterdir():
            for file in sub.iterdir() if sub.is_dir() else []:
                if file.name not in keep:
                    file.unlink(missing_ok=True)
        self.digests = digests
        return counts

    def _encode(self, pending: list[tuple[int, torch.Tensor]], keys: list[str], digests: list[str],
                flip: bool) -> None:
        """Encode a batch of (index, (3, H, W) pixels in [-1, 1]), with their mirror images when `flip`."""
        images = (torch.stack([p for _, p in pending]) + 1) / 2                     # (B, 3, H, W) in [0, 1]
        if flip:
            images = torch.cat([images, images.flip(-1)])                           # (2B, 3, H, W)
        with torch.no_grad():
            mean, std = (t.float().cpu() for t in self.space.distribution(images))  # (B or 2B, C, h, w)
        B = len(pending)
        for b, (i, _) in enumerate(pending):
            tensors = {"mean": mean[b], "std": std[b]}
            if flip:
                tensors.update(flip_mean=mean[B + b], flip_std=std[B + b])
            write_entry(_entry_path(self.folder, digests[i]), keys[i], tensors)


class CachedLatents(Dataset):
    """A built LatentCache as a training set: {"latent_mean": (C, h, w) float32, "latent_std": (C, h, w) float32,
    "text": caption}, the flipped image's entry exactly where the dataset would flip (seed, epoch, index).
    Holds no VAE: it pickles to DataLoader workers as the dataset does."""

    shuffle = True

    def __init__(self, cache: LatentCache):
        if cache.digests is None:
            raise ValueError("the latent cache is not built yet; call cache.build() first.")
        self.dataset, self.folder = cache.dataset, cache.folder
        self.digests, self.skipped = cache.digests, frozenset(cache.skipped)
        self.captions = cache.dataset.captions
        self.flip, self.seed, self.epoch = cache.dataset.flip, cache.dataset.seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ returns."""
        self.dataset.set_epoch(epoch)  # checks it; grounding targets replay the dataset's own flips
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images.")
        # 1. An image that did not decode at build time: the next one stands in, as CaptionedImages does.
        index = index % len(self)
        while index in self.skipped:
            index = (index + 1) % len(self)
        # 2. CaptionedImages' rule: rng of (seed, epoch, index); a center crop draws nothing; flip on < 0.5.
        rng = np.random.default_rng([self.seed, self.epoch, index])
        flipped = self.flip and rng.random() < 0.5
        # 3. The entry, checked.
        path = _entry_path(self.folder, self.digests[index])
        tensors, problem = read_entry(path, self.dataset.item_key(index))
        if tensors is None:
            raise DamagedLatents(f"latent cache entry {path} of {self.dataset._name(index)} {problem}; run training "
                                 "again: the cache is checked and re-encoded before training starts.")
        mean, std = (tensors[k] for k in (FLIP_NAMES if flipped else NAMES))
        item = {"latent_mean": mean, "latent_std": std, "text": self.captions[index]}
        if self.dataset.grounding:
            item.update(self.dataset._grounding_targets(index))
        return item
