"""The training stream: the dataset a run config names, and the order of its samples as one global
counter k -> (index, epoch), so the data position of a run is one integer and resumes exactly.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from ..config import RunConfig


def build_dataset(cfg: RunConfig) -> tuple[Dataset, list[str]]:
    """The training set and the caption corpus the offline tokenizer is learned from."""
    d, grounding = cfg.data, cfg.train.grounding_weight > 0
    if d.kind == "shapes":
        from .shapes import ShapesDataset, caption_corpus, shapes_world
        world = shapes_world(d, "train")
        return ShapesDataset(world, length=2**31 - 1, grounding=grounding), caption_corpus(world)
    if d.kind == "shards":
        from .shards import ShardDataset
        ds = ShardDataset(d.root, size=d.size, crop=d.crop, flip=d.flip, seed=d.seed, caption_column=d.caption_column)
        return ds, ds.captions
    from .folder import ImageFolderDataset
    ds = ImageFolderDataset(d.root, size=d.size, crop=d.crop, flip=d.flip, seed=d.seed, caption_column=d.caption_column,
                            grounding=grounding)
    return ds, list(ds.captions)


def latent_dataset(dataset: Dataset, cfg: RunConfig, space, progress: bool = True) -> Dataset:
    """With a VAE and an image folder or shards: the images' latent distributions, encoded once into the cache
    data.latent_cache names (default: beside the data) and drawn from each step. Otherwise (pixels, the shapes
    world, data.latent_cache=off) the dataset as it is: the trainer encodes its pixels every step."""
    if space.kind != "latents" or cfg.data.kind == "shapes" or cfg.data.latent_cache == "off":
        return dataset
    from pathlib import Path

    from .latents import CachedLatents, LatentCache, cache_folder
    root = dataset.root if cfg.data.latent_cache == "beside" else Path(cfg.data.latent_cache).expanduser()
    cache = LatentCache(dataset, space, cache_folder(root, space.vae, cfg.data.size))
    cache.build(progress=progress)
    return CachedLatents(cache)


class Epoched(Dataset):
    """Adapts a dataset to (index, epoch) keys so that random crops and flips replay exactly on resume."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        return self.ds[index]


class CounterSampler(Sampler):
    """Yields the (index, epoch) keys of global samples start, start+1, ... owned by this process.
    Sample k lives in epoch k // N at position k % N of a permutation seeded by (seed, epoch), or at
    index k % N when `shuffle` is off; process r of W takes, in each global micro-batch of W*b samples,
    the slice [r*b, (r+1)*b)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int = 0, shuffle: bool = True):
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.shuffle = shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def key(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos, epoch
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][pos]), epoch

    def __iter__(self):
        k = self.start
        while True:
            base = k // (self.world * self.b) * self.world * self.b
            for j in range(self.b):
                yield self.key(base + self.rank * self.b + j)
            k = base + self.world * self.b


def data_stream(dataset, cfg: RunConfig, rank: int = 0, world: int = 1, start: int = 0):
    """Batches of this process from global sample `start` on, in the order CounterSampler fixes. A dataset
    declares with `shuffle = False` that its items are already in random order (a procedural world);
    any other is shuffled per epoch. The loader seeds its workers from a generator of its own, never from the
    global torch RNG, which a resumed run has just restored for dropout."""
    b = cfg.train.batch_size
    sampler = CounterSampler(len(dataset), b, rank, world, cfg.train.seed, start=start,
                             shuffle=getattr(dataset, "shuffle", True))
    return iter(DataLoader(Epoched(dataset), batch_size=b, sampler=sampler, num_workers=cfg.data.num_workers,
                           drop_last=True, worker_init_fn=_leave_signals_to_the_trainer,
                           generator=torch.Generator().manual_seed(cfg.train.seed)))


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C and a cluster's SIGTERM reach the data workers too: they ignore them, and the training process
    saves a checkpoint before it ends them. A second SIGTERM (the one that ends a worker that hangs) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, signal.SIG_DFL))
