"""Sharded input (data.kind=shards): `t2i make-dataset shards`, reading back, errors, and two processes on
uneven shards."""

import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("datasets")

from t2i.cli import main  # noqa: E402
from t2i.data.folder import ImageFolderDataset  # noqa: E402
from t2i.data.shards import ShardDataset  # noqa: E402

from conftest import TINY_RUN  # noqa: E402


def image_folder(path, n, side=20):
    """n noise images of assorted sizes with .txt captions."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (side + i % 3, side + 2 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i:02d}.png")
        (path / f"{i:02d}.txt").write_text(f"a {['red', 'blue', 'green'][i % 3]} {['circle', 'square'][i % 2]} {i}")
    return path


def test_shards_hold_the_folder_and_give_its_samples(tmp_path):
    folder = image_folder(tmp_path / "images", 7)
    assert main(["make-dataset", "shards", "--from", str(folder), "--shard-size", "3", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.arrow")) == [f"data-0000{k}-of-00003.arrow" for k in range(3)]
    view = dict(size=16, crop="random", flip=True, seed=5)
    shards, images = ShardDataset(tmp_path / "s", **view), ImageFolderDataset(folder, **view)
    assert len(shards) == 7 and shards.captions == images.captions
    for epoch in (0, 3):
        shards.set_epoch(epoch), images.set_epoch(epoch)
        for i in range(7):
            a, b = shards[i], images[i]
            assert a["text"] == b["text"] and torch.equal(a["pixel_values"], b["pixel_values"])
    # a data worker gets the memory map, not a copy of the images
    shipped = len(pickle.dumps(shards))
    assert shipped < sum(p.stat().st_size for p in (tmp_path / "s").glob("*.arrow")) / 2
    assert torch.equal(pickle.loads(pickle.dumps(shards))[6]["pixel_values"], shards[6]["pixel_values"])


def test_parquet_files_read_as_shards(tmp_path):
    import datasets
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(5)],
            "caption": [f"a red circle {i}" for i in range(5)]}
    table = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                         "caption": datasets.Value("string")}))
    (tmp_path / "pq").mkdir()
    table.select(range(4)).to_parquet(tmp_path / "pq" / "a.parquet")
    table.select([4]).to_parquet(tmp_path / "pq" / "b.parquet")
    ds = ShardDataset(tmp_path / "pq", size=8)
    assert len(ds) == 5 and ds[4]["text"] == "a red circle 4"
    assert torch.allclose(ds[2]["pixel_values"], torch.full((3, 8, 8), 2 * 40 / 127.5 - 1))


def _png(i):
    import io
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_shard_errors_name_the_problem_and_the_fix(tmp_path):
    folder = image_folder(tmp_path / "images", 2)
    with pytest.raises(ValueError, match="holds no shards .*make-dataset shards"):
        ShardDataset(folder)
    with pytest.raises(ValueError, match="Shard folder .*nowhere' does not exist; write one with"):
        ShardDataset(tmp_path / "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["make-dataset", "shards", "--out", str(tmp_path / "s")]) == 2  # no --from
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "s")]) == 0
    with pytest.raises(ValueError, match=r"no caption column \('words'\).*columns are \['image', 'text'\]"):
        ShardDataset(tmp_path / "s", caption_column="words")
    from t2i.config import load_config
    with pytest.raises(ValueError, match="data.kind=shards needs data.root"):
        load_config(None, ["data.kind=shards"])
    with pytest.raises(ValueError, match="only image folders carry"):
        load_config(None, ["data.kind=shards", "data.root=x", "train.grounding_weight=0.1"])


TRACED = '''
import os, sys
from t2i.data import shards
real = shards.ShardDataset.__getitem__
def traced(self, index):
    with open(os.environ["T2I_TRACE"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {index} {self.epoch}\\n")
    return real(self, index)
shards.ShardDataset.__getitem__ = traced
from t2i.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_two_processes_get_equal_samples_from_uneven_shards(tmp_path):
    """11 images in shards of 4, 4 and 3; two processes of batch 2 for 3 steps draw 12 samples: each process 6,
    and together every image of epoch 0 once before epoch 1 begins."""
    folder = image_folder(tmp_path / "images", 11, side=16)
    assert main(["make-dataset", "shards", "--from", str(folder), "--shard-size", "4", "--out", str(tmp_path / "s")]) == 0
    (tmp_path / "traced.py").write_text(TRACED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2I_TRACE": str(tmp_path / "trace.txt"),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "traced.py"), "train",
           *TINY_RUN, "data.kind=shards", f"data.root={tmp_path / 's'}", "train.batch_size=2",
           f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.checkpoint_every=3"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    drawn = [tuple(map(int, line.split())) for line in (tmp_path / "trace.txt").read_text().splitlines()]
    assert Counter(rank for rank, _, _ in drawn) == {0: 6, 1: 6}
    first = sorted(index for _, index, epoch in drawn if epoch == 0)
    assert first == list(range(11)) and [epoch for _, _, epoch in drawn].count(1) == 1


# ---- issue 19: nothing lost, round 2 ---------------------------------------------------------------


def test_make_dataset_shards_stages_beside_out_and_one_of_two_writers_wins(tmp_path, monkeypatch, capsys):
    import tempfile

    import datasets

    import t2i.data.shards as shards
    folder = image_folder(tmp_path / "images", 3)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))           # $TMPDIR: nothing may be written there
    seen = []
    real_save = datasets.Dataset.save_to_disk

    def save(self, path, **kw):
        seen.append(list(tmp.iterdir()))
        return real_save(self, path, **kw)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save)
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "s")]) == 0
    assert seen == [[]] and not list(tmp.iterdir()) and len(ShardDataset(tmp_path / "s")) == 3
    assert "wrote 3 images in 1 shard to" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "s", "tmpdir"]      # no staging folder left

    def other_writer_meanwhile(self, path, **kw):                # a second writer fills --out first
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "theirs.arrow").write_text("theirs")
        return real_save(self, path, **kw)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", other_writer_meanwhile)
    capsys.readouterr()
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "t")]) == 2
    assert "was filled by another writer meanwhile" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["theirs.arrow"]

    def interrupted(self, path, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", interrupted)
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "u")]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"t2i make-dataset: stopped; nothing was written to {tmp_path / 'u'}", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "s", "t", "tmpdir"]
    (tmp_path / ".v.abc.999999999.tmp").mkdir()                  # what a writer killed with -9 left
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    assert shards.write_shards(folder, tmp_path / "v") == (3, 1)
    assert not (tmp_path / ".v.abc.999999999.tmp").exists()


def test_bad_parquet_columns_and_rows_are_named(tmp_path):
    import datasets
    image = datasets.Image()

    def parquet(name, rows, features, file="a.parquet"):
        (tmp_path / name).mkdir(exist_ok=True)
        datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(tmp_path / name / file)
        return tmp_path / name
    pngs = [{"bytes": _png(i), "path": None} for i in range(3)]
    zero = parquet("zero", {"image": [], "text": []}, {"image": image, "text": datasets.Value("string")})
    with pytest.raises(ValueError, match="the Parquet files in .*zero' hold no rows"):
        ShardDataset(zero)
    ints = parquet("ints", {"image": pngs, "text": [1, 2, 3]}, {"image": image, "text": datasets.Value("int64")})
    with pytest.raises(ValueError, match="caption column 'text' of the shards in .* holds int64, not text"):
        ShardDataset(ints)
    lists = parquet("lists", {"image": pngs, "text": [["a"]] * 3}, {"image": image,
                                                                   "text": datasets.Sequence(datasets.Value("string"))})
    with pytest.raises(ValueError, match="holds lists, not text"):
        ShardDataset(lists)
    no_image = parquet("noimg", {"pic": [1], "text": ["a"]}, {"pic": datasets.Value("int64"), "text": datasets.Value("string")})
    with pytest.raises(ValueError, match=r"have no image column \(an Image feature.*columns are \['pic', 'text'\]\.$"):
        ShardDataset(no_image)
    strings = {"image": image, "text": datasets.Value("string")}
    parquet("gaps", {"image": pngs, "text": ["a", "b", "c"]}, strings)
    gaps = parquet("gaps", {"image": pngs, "text": ["a", "", "c"]}, strings, file="b.parquet")
    with pytest.raises(ValueError, match=r"1 of 6 rows have no caption .*e\.g\. row 1 of b\.parquet;"):
        ShardDataset(gaps)


def test_a_full_disk_under_the_shards_or_the_datasets_cache_is_one_line(tmp_path, monkeypatch, capsys):
    """datasets wraps the system's 'No space left on device' in its own errors (three chained tracebacks):
    make-dataset shards and a Parquet folder's conversion into HF_DATASETS_CACHE say it in one line instead."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    def full(self, *a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ArrowWriter, "finalize", full)
    folder = image_folder(tmp_path / "images", 3)
    assert main(["make-dataset", "shards", "--from", str(folder), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"t2i make-dataset: error: no space left on the disk of {tmp_path} while writing "
                                    f"the shards of {tmp_path / 's'}; nothing was written: free space, then run it "
                                    "again"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    (tmp_path / "pq").mkdir()
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(2)], "text": ["a red circle"] * 2}
    monkeypatch.undo()
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                 "text": datasets.Value("string")})
                               ).to_parquet(tmp_path / "pq" / "a.parquet")
    monkeypatch.setattr(ArrowWriter, "finalize", full)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(OSError, match=rf"^no space left on the disk of the datasets cache \(HF_DATASETS_CACHE="
                                      rf"{tmp_path / 'cache'}\) while converting the Parquet files of "
                                      rf"{tmp_path / 'pq'}: free space there, or set HF_DATASETS_CACHE to a folder "
                                      rf"on a disk with room$"):
        ShardDataset(tmp_path / "pq", size=8)
