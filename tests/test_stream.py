"""t2i.data.stream: the order of training samples as one counter (a resume is exact), split between
processes, reshuffled every epoch unless a dataset declares its items already random."""
import os
import signal

import torch

from t2i.config import load_config
from t2i.data.stream import CounterSampler, data_stream


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n: int, shuffle: bool):
        self.n, self.shuffle = n, shuffle

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


def test_training_data_is_deterministic_and_sharded():
    one = CounterSampler(n=10, batch=2, rank=0, world=1, seed=3)
    it = iter(one)
    single = [next(it) for _ in range(20)]
    assert sorted(i for i, e in single[:10]) == list(range(10)) and {e for _, e in single[10:]} == {1}
    r0, r1 = iter(CounterSampler(10, 2, 0, 2, 3)), iter(CounterSampler(10, 2, 1, 2, 3))
    a, b = [next(r0) for _ in range(4)], [next(r1) for _ in range(4)]
    assert a[:2] + b[:2] + a[2:] + b[2:] == single[:8]  # two processes split the single-process stream
    resumed = iter(CounterSampler(10, 2, 0, 1, 3, start=6))
    assert [next(resumed) for _ in range(6)] == single[6:12]


def test_every_epoch_is_a_new_permutation_and_a_seed_fixes_them():
    def epochs(seed, count=4, n=12):
        it = iter(CounterSampler(n=n, batch=3, rank=0, world=1, seed=seed))
        keys = [next(it) for _ in range(count * n)]
        return [[i for i, e in keys[k * n:(k + 1) * n]] for k in range(count)]
    orders = epochs(seed=3)
    assert all(sorted(order) == list(range(12)) for order in orders)        # each epoch sees each item once
    assert len({tuple(order) for order in orders}) == 4                     # and in another order than the others
    assert orders == epochs(seed=3) and orders != epochs(seed=4)


def test_a_dataset_declares_whether_the_stream_shuffles_it():
    from t2i.data.folder import ImageFolderDataset
    from t2i.data.shapes import ShapesDataset
    assert ShapesDataset.shuffle is False and ImageFolderDataset.shuffle is True
    cfg = load_config(None, ["train.batch_size=5"])
    in_order = next(data_stream(Numbers(20_000_000, shuffle=False), cfg))["i"].tolist()
    shuffled = next(data_stream(Numbers(20, shuffle=True), cfg))["i"].tolist()
    assert in_order == [0, 1, 2, 3, 4] and shuffled != [0, 1, 2, 3, 4] and len(set(shuffled)) == 5
    large = next(data_stream(Numbers(10_000_001, shuffle=True), load_config(None, ["train.batch_size=2"])))["i"]
    assert large.tolist() != [0, 1]                     # a folder of over 10M images is still shuffled


def test_data_workers_leave_signals_to_the_training_process():
    """Ctrl-C reaches every process of the terminal's group: a data worker must not die of it mid-save."""
    batches = data_stream(Numbers(100, shuffle=True), load_config(None, ["train.batch_size=2", "data.num_workers=1"]))
    next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    assert all(len(next(batches)["i"]) == 2 for _ in range(20))
