"""Opening and reading a training set: an image folder (cold: every image verified; warm: the index beside the
data reused) against the same images as Arrow shards (`t2i make-dataset shards`), in one process.
Reference: the warm image folder, what every run after the first opens today.

    python bench/data.py                      # 4,000 shapes images at 32 px, shards of 1,000
    python bench/data.py --num 20000 --shard-size 5000
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def seconds(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--reads", type=int, default=1000, help="random items read from each dataset")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import numpy as np
    from datasets.utils.logging import disable_progress_bar

    from t2i.data.folder import ImageFolderDataset
    from t2i.data.index import INDEX_NAME
    from t2i.data.shapes import ShapesConfig, write_image_folder
    from t2i.data.shards import ShardDataset, write_shards
    disable_progress_bar()

    root = Path(tempfile.mkdtemp(prefix="t2i-bench-data-"))
    try:
        write_image_folder(ShapesConfig(size=32), args.num, root / "images")
        (root / "images" / INDEX_NAME).unlink(missing_ok=True)
        cold, _ = seconds(lambda: ImageFolderDataset(root / "images"))
        warm, folder = seconds(lambda: ImageFolderDataset(root / "images"))
        write, _ = seconds(lambda: write_shards(root / "images", root / "shards", args.shard_size))
        opened, shards = seconds(lambda: ShardDataset(root / "shards"))
        order = np.random.default_rng(0).integers(0, args.num, args.reads)
        rows = []
        for name, ds, open_s in [("image folder, cold", None, cold), ("image folder, warm (reference)", folder, warm),
                                 ("Arrow shards", shards, opened)]:
            read = seconds(lambda: [ds[int(i)] for i in order])[0] if ds is not None else None
            rows.append((name, open_s, read))
        print(f"{args.num} images of 32 px; writing the shards took {write:.2f} s ({args.shard_size} per shard)\n")
        print(f"| source | open s | x reference | {args.reads} random reads, items/s | x reference |")
        print("|---|---|---|---|---|")
        ref_open, ref_read = warm, rows[1][2]
        for name, open_s, read in rows:
            rate = f"{args.reads / read:.0f} | {ref_read / read:.2f}" if read else "- | -"
            print(f"| {name} | {open_s:.3f} | {open_s / ref_open:.2f} | {rate} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
