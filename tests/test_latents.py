"""The latent cache: what it holds equals encoding the dataset's pixels, a rebuild re-encodes only what changed,
damaged entries are named and re-encoded, an interrupted build resumes, and random crops are refused."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.folder import ImageFolderDataset
from t2i.data.latents import CachedLatents, DamagedLatents, LatentCache, cache_folder
from t2i.image_space import LatentSpace

from sd_models import vae
from test_folder import write_damaged_images


def make_folder(root, n=5, seed=0):
    """n noise images of 40 x 32 px (the center crop cuts them) with captions in metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n"
                                                 for i in range(n)))
    return root


def entries(cache):
    return sorted(p.name for p in cache.folder.rglob("*") if p.is_file())


def encoding(space, pixels):
    """LatentSpace.distribution of one (3, H, W) item in [-1, 1], as the cache stores it: ((C, h, w), (C, h, w))."""
    with torch.no_grad():
        mean, std = space.distribution((pixels[None] + 1) / 2)
    return mean[0], std[0]


def built(root, space, **view):
    cache = LatentCache(ImageFolderDataset(root, size=32, **view), space, batch_size=2)
    return cache, cache.build(progress=False)


@pytest.fixture
def space():
    return LatentSpace(vae())


# ---- (a) what the cache holds ----------------------------------------------------------------------------------


def test_cached_latents_are_the_encoding_of_the_datasets_pixels(tmp_path, space):
    cache, counts = built(make_folder(tmp_path), space)
    assert counts == {"encoded": 5, "reused": 0, "damaged": 0}
    latents = CachedLatents(cache)
    assert len(latents) == 5 and latents.captions == cache.dataset.captions and latents.shuffle
    for i in range(5):
        item = latents[i]
        assert item["latent_mean"].shape == (4, 16, 16) and item["latent_mean"].dtype == torch.float32
        assert item["text"] == f"image {i}"
        mean, std = encoding(space, cache.dataset[i]["pixel_values"])
        torch.testing.assert_close(item["latent_mean"], mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(item["latent_std"], std, atol=1e-6, rtol=1e-5)


def test_flipped_entries_are_chosen_where_the_dataset_flips(tmp_path, space):
    cache, counts = built(make_folder(tmp_path), space, flip=True, seed=3)
    latents = pickle.loads(pickle.dumps(CachedLatents(cache)))  # as a DataLoader worker gets it
    dataset, chosen = cache.dataset, set()
    for epoch in range(4):
        latents.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for i in range(5):
            pixels = dataset[i]["pixel_values"]                  # flipped or not by the dataset's own rule
            unflipped = ImageFolderDataset(tmp_path, size=32)[i]["pixel_values"]
            chosen.add(not torch.equal(pixels, unflipped))
            mean, std = encoding(space, pixels)
            torch.testing.assert_close(latents[i]["latent_mean"], mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(latents[i]["latent_std"], std, atol=1e-6, rtol=1e-5)
    assert chosen == {True, False}                               # both entries were served


# ---- (b) what a rebuild re-encodes -----------------------------------------------------------------------------


def test_a_rebuild_reuses_everything_and_a_changed_image_reencodes_only_itself(tmp_path, space):
    root = make_folder(tmp_path)
    cache, _ = built(root, space)
    before = entries(cache)
    assert built(root, space)[1] == {"encoded": 0, "reused": 5, "damaged": 0}
    stat = os.stat(root / "1.png")                               # touched: same pixels, new mtime
    os.utime(root / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert built(root, space)[1] == {"encoded": 1, "reused": 4, "damaged": 0}
    Image.new("RGB", (40, 32), "red").save(root / "2.png")       # changed pixels
    cache, counts = built(root, space)
    assert counts == {"encoded": 1, "reused": 4, "damaged": 0}
    assert len(entries(cache)) == 5 and len(set(entries(cache)) & set(before)) == 3  # the old two are dropped
    mean, _ = encoding(space, cache.dataset[2]["pixel_values"])
    torch.testing.assert_close(CachedLatents(cache)[2]["latent_mean"], mean, atol=1e-6, rtol=1e-5)
    (root / "4.png").unlink()                                    # removed: its entry goes too
    lines = (root / "metadata.jsonl").read_text().splitlines()[:4]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cache, counts = built(root, space)
    assert counts == {"encoded": 0, "reused": 4, "damaged": 0} and len(entries(cache)) == 4


def test_flip_turned_on_reencodes_and_a_changed_vae_gets_a_new_folder(tmp_path, space):
    root = make_folder(tmp_path)
    built(root, space)
    assert built(root, space, flip=True)[1] == {"encoded": 5, "reused": 0, "damaged": 0}
    assert built(root, space)[1]["reused"] == 5                  # flipped entries hold the unflipped too
    assert cache_folder(root, vae(), 32) == cache_folder(root, space.vae, 32)  # the same VAE, built again
    assert cache_folder(root, vae(), 32).parent == root / ".t2i-latents"
    assert cache_folder(root, vae(), 64) != cache_folder(root, vae(), 32)
    changed = vae()
    with torch.no_grad():
        changed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3       # one weight
    assert cache_folder(root, changed, 32) != cache_folder(root, vae(), 32)
    assert cache_folder(root, vae(groups=1), 32) != cache_folder(root, vae(), 32)  # its config
    cache = LatentCache(ImageFolderDataset(root, size=32), LatentSpace(changed))
    assert cache.build(progress=False)["encoded"] == 5


# ---- (c) damage ------------------------------------------------------------------------------------------------


def test_a_damaged_entry_is_named_and_reencoded_never_returned(tmp_path, space):
    cache, _ = built(make_folder(tmp_path), space)
    good = [CachedLatents(cache)[i]["latent_mean"] for i in range(5)]
    files = {i: next(cache.folder.rglob(f"{cache.digests[i]}.safetensors")) for i in (1, 3)}
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-100])                            # cut short
    data = bytearray(files[3].read_bytes())
    data[-7] ^= 0x10                                             # one bit of a tensor
    files[3].write_bytes(bytes(data))
    latents = CachedLatents(cache)
    for i in (1, 3):
        with pytest.raises(DamagedLatents, match=rf"'{i}.png' (is not a readable|fails its checksum).*run training again"):
            latents[i]
    with pytest.warns(UserWarning, match=r"re-encoded 2 damaged .*'1.png' \(is not a readable.*'3.png' \(fails its checksum"):
        cache, counts = built(tmp_path, space)
    assert counts == {"encoded": 2, "reused": 3, "damaged": 2}
    for i in range(5):
        torch.testing.assert_close(CachedLatents(cache)[i]["latent_mean"], good[i], atol=1e-6, rtol=1e-5)


def test_an_image_that_does_not_decode_gets_no_entry_and_the_next_stands_in(tmp_path, space):
    make_folder(tmp_path, n=3)
    write_damaged_images(tmp_path)
    with pytest.warns(UserWarning, match="could not be decoded"):
        cache, counts = built(tmp_path, space)
    assert counts["encoded"] == 3 and len(cache.skipped) == 2 and len(entries(cache)) == 3
    latents = CachedLatents(cache)
    for i in cache.skipped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert latents[i]["text"] == cache.dataset[i]["text"]   # the dataset's own stand-in


# ---- (d) an interrupted build ----------------------------------------------------------------------------------


class Interrupted(LatentSpace):
    """A LatentSpace whose VAE is stopped (Ctrl-C) at its `after`+1-th batch."""

    def __init__(self, vae, after):
        super().__init__(vae)
        self.after = after

    def distribution(self, images):
        if self.after == 0:
            raise KeyboardInterrupt
        self.after -= 1
        return super().distribution(images)


def test_an_interrupted_build_keeps_finished_entries_and_a_rerun_encodes_the_rest(tmp_path, space):
    root = make_folder(tmp_path)
    dataset = ImageFolderDataset(root, size=32)
    with pytest.raises(KeyboardInterrupt):
        LatentCache(dataset, Interrupted(vae(), after=2), batch_size=2).build(progress=False)
    cache = LatentCache(dataset, space, batch_size=2)
    assert len(entries(cache)) == 4                              # two batches of two, no temporary files
    assert cache.build(progress=False) == {"encoded": 1, "reused": 4, "damaged": 0}


# ---- (e) what cannot be cached ---------------------------------------------------------------------------------


def test_random_crops_are_refused_in_one_line(tmp_path, space):
    with pytest.raises(ValueError, match=r"data.crop=random .* set data.crop=center, or data.latent_cache=off") as e:
        LatentCache(ImageFolderDataset(make_folder(tmp_path), size=32, crop="random"), space)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="call cache.build"):
        CachedLatents(LatentCache(ImageFolderDataset(tmp_path, size=32), space))


def test_shards_are_cached_per_row_and_file(tmp_path, space):
    pytest.importorskip("datasets")
    from datasets.utils.logging import disable_progress_bar

    from t2i.data.shards import ShardDataset, write_shards
    disable_progress_bar()
    write_shards(make_folder(tmp_path / "images"), tmp_path / "shards", shard_size=2)
    shards = ShardDataset(tmp_path / "shards", size=32, flip=True)
    keys = [shards.item_key(i) for i in range(5)]
    assert len(set(keys)) == 5 and keys[2].startswith("data-00001-of-00003.arrow|") and keys[2].endswith("|0")
    cache = LatentCache(shards, space)
    assert cache.folder.parent == tmp_path / "shards" / ".t2i-latents"
    assert cache.build(progress=False) == {"encoded": 5, "reused": 0, "damaged": 0}
    assert LatentCache(ShardDataset(tmp_path / "shards", size=32, flip=True), space).build(progress=False)["reused"] == 5
    latents = CachedLatents(cache)
    mean, _ = encoding(space, shards[3]["pixel_values"])
    torch.testing.assert_close(latents[3]["latent_mean"], mean, atol=1e-6, rtol=1e-5)
