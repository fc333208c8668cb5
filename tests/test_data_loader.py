"""Training/eval loaders: epoch coverage, sharding, reshuffling, per-sample seeding."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from accelcore.data.loader import (
    EpochBatchSampler,
    build_eval_loader,
    build_train_loader,
    collate_train,
    network_input,
)
from accelcore.data.mosaic import MosaicDetection
from accelcore.errors import DataError


class IndexDataset:
    """Image i is filled with value i (mod 250) and carries one box of class i % 3."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def pull_item(self, i: int):
        img = np.full((48 + i % 5 * 8, 64, 3), i % 250, np.uint8)
        img[8:30, 10:40] = (255, 255, 255)
        boxes = np.array([[10, 8, 40, 30, i % 3]], np.float32)
        return img, boxes, img.shape[:2], 1000 + i


def seen_indices(world: int, n: int, bs: int, epoch: int, seed: int = 3) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = EpochBatchSampler(n, bs, seed=seed, rank=rank, world_size=world, drop_last=True)
        s.set_epoch(epoch)
        out.append([i for batch in s for i, _, _ in batch])
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_covers_every_index_once_across_ranks(world: int) -> None:
    n, bs = 48, 3
    orders = []
    for epoch in range(3):
        per_rank = seen_indices(world, n, bs, epoch)
        flat = [i for r in per_rank for i in r]
        assert sorted(flat) == list(range(n))  # exactly once, across ranks
        for a in range(world):  # disjoint shards, equal lengths
            assert len(per_rank[a]) == n // world
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert seen_indices(world, n, bs, 1) == seen_indices(world, n, bs, 1)  # reproducible
    assert seen_indices(world, n, bs, 1, seed=4) != seen_indices(world, n, bs, 1)


def test_sampler_drop_last_and_padding() -> None:
    s = EpochBatchSampler(10, 4, world_size=1, drop_last=True)
    assert len(s) == 2 and sum(len(b) for b in s) == 8
    s = EpochBatchSampler(10, 4, rank=1, world_size=3, drop_last=False)
    # 10 samples on 3 ranks: padded by wrap-around to 4 per rank, one batch of 4
    assert len(s) == 1 and len(next(iter(s))) == 4
    seeds = [seed for b in EpochBatchSampler(64, 8) for _, seed, _ in b]
    assert len(set(seeds)) == 64  # each sample gets its own augmentation seed
    # ... and a fresh one every epoch and on every rank, even for the same image.
    by_epoch_rank = []
    for epoch, rank in ((0, 0), (1, 0), (0, 1)):
        s = EpochBatchSampler(64, 8, seed=2, rank=rank, world_size=2, drop_last=False)
        s.set_epoch(epoch)
        by_epoch_rank.append({i: seed for b in s for i, seed, _ in b})
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert set(by_epoch_rank[a].values()).isdisjoint(by_epoch_rank[b].values())
    with pytest.raises(DataError, match="no batch"):
        EpochBatchSampler(5, 8)


def make_wrap(n: int = 12) -> MosaicDetection:
    return MosaicDetection(IndexDataset(n), (64, 64), mosaic_prob=0.5, enable_mixup=False,
                           max_labels=10)


def collect(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_train_loader_shapes_and_worker_independence() -> None:
    wrap = make_wrap()
    single = build_train_loader(wrap, batch_size=4, num_workers=0, seed=11)
    multi = build_train_loader(make_wrap(), batch_size=4, num_workers=2, seed=11)
    try:
        assert len(single) == 3
        a0, b0 = collect(single, 0), collect(multi, 0)
        a1, b1 = collect(single, 1), collect(multi, 1)  # persistent workers, second epoch
        for (ia, ta), (ib, tb) in zip(a0 + a1, b0 + b1, strict=True):
            assert ia.shape == (4, 64, 64, 3) and ia.dtype == torch.uint8
            assert ta.shape == (4, 10, 5) and ta.dtype == torch.float32
            # Augmentation is a function of (seed, epoch, rank, position), not of the workers.
            assert torch.equal(ia, ib) and torch.equal(ta, tb)
        batches = [x for x, _ in a0 + a1]
        for i in range(len(batches)):  # never the same batch twice
            for j in range(i + 1, len(batches)):
                assert not torch.equal(batches[i], batches[j])
        # Another epoch over the same images looks different (fresh augmentation + order).
        assert not torch.equal(torch.cat([x for x, _ in a0]), torch.cat([x for x, _ in a1]))
        again = collect(single, 0)
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a0, again, strict=True))

        # close_mosaic in the main process reaches the persistent workers.
        multi.close_mosaic()
        multi.set_epoch(2)
        wrap_ref = make_wrap()
        wrap_ref.close_mosaic()
        ref = build_train_loader(wrap_ref, batch_size=4, num_workers=0, seed=11)
        ref.set_epoch(2)
        for (x, t), (y, u) in zip(multi, ref, strict=True):
            assert torch.equal(x, y) and torch.equal(t, u)
    finally:
        del multi


class RecordingDataset(IndexDataset):
    """Appends every image index a (worker) process pulls to a file."""

    def __init__(self, n: int, log: str) -> None:
        super().__init__(n)
        self.log = log

    def pull_item(self, i: int):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return super().pull_item(i)


def test_workers_run_on_into_the_next_epoch_and_resume_without_making_skipped_batches(
        tmp_path) -> None:
    import time

    log = tmp_path / "pulls.txt"

    def wrap(dataset):
        return MosaicDetection(dataset, (64, 64), mosaic=False, max_labels=10)

    loader = build_train_loader(wrap(RecordingDataset(16, str(log))), 4, num_workers=1,
                                seed=3, epochs=3)
    reference = build_train_loader(wrap(IndexDataset(16)), 4, num_workers=0, seed=3)
    try:
        for epoch in range(3):
            got = collect(loader, epoch)
            time.sleep(1.0)  # time for the worker to run ahead, if it does
            pulled = len(log.read_text().split())
            # Epoch 0 and 1: the worker already made (prefetch_factor 2) batches of the next
            # epoch; after the run's last epoch it stops.
            assert pulled == 16 * (epoch + 1) + (8 if epoch < 2 else 0), (epoch, pulled)
            for (x, t), (y, u) in zip(got, collect(reference, epoch), strict=True):
                assert torch.equal(x, y) and torch.equal(t, u)
        # A resumed run: epoch 1 from its third batch, the first two never made.
        log.write_text("")
        loader.set_epoch(1)
        loader.set_start_batch(2)
        got = list(loader)
        want = collect(reference, 1)[2:]
        assert len(got) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(got, want,
                                                                               strict=True))
        time.sleep(0.5)
        pulled = [int(v) for v in log.read_text().split()]
        # Batches 2-3 of epoch 1 and, run ahead, 0-1 of epoch 2: none of batches 0-1 made.
        assert pulled[:8] == [int(i) for i in loader.sampler.indices(1)[8:]]
        assert len(pulled) == 16
    finally:
        del loader


def test_ranks_get_disjoint_data() -> None:
    ds = IndexDataset(16)
    wrap = MosaicDetection(ds, (64, 64), mosaic=False, hsv_prob=0.0, flip_prob=0.0,
                           max_labels=4)
    values = []
    for rank in range(2):
        loader = build_train_loader(wrap, 4, num_workers=0, seed=5, rank=rank, world_size=2)
        loader.set_epoch(0)
        for images, _ in loader:
            values += [int(v) for v in images[:, 40, 5, 0]]  # pixel value = image index
    assert sorted(values) == list(range(16))


def test_collate_rejects_variable_shapes() -> None:
    class Raw(IndexDataset):
        def __getitem__(self, i):
            return self.pull_item(i)

    loader = build_train_loader(Raw(8), 4, num_workers=0)
    with pytest.raises(DataError, match="fixed shapes"):
        next(iter(loader))


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batch_becomes_the_float_network_input(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8, generator=g)
    targets = np.zeros((10, 5), np.float32)
    images, _ = collate_train([(pixels[0].numpy(), targets), (pixels[1].numpy(), targets)])
    assert images.dtype == torch.uint8 and torch.equal(images, pixels)
    x = network_input(images, channels_last)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 24, 40)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)
    # BGR channel order and every value kept: the CHW float YOLOX trains on.
    for b in range(2):
        expected = torch.from_numpy(pixels[b].numpy().transpose(2, 0, 1).astype(np.float32))
        assert torch.equal(x[b], expected)


def test_float_chw_items_still_collate_and_pass_through() -> None:
    chw = np.random.default_rng(0).uniform(0, 255, (3, 16, 20)).astype(np.float32)
    images, _ = collate_train([(chw, np.zeros((4, 5), np.float32))] * 2)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 20)
    x = network_input(images, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, images)


def test_collate_rejects_wrong_image_layout() -> None:
    chw_bytes = np.zeros((3, 16, 16), np.uint8)  # 8-bit but channels first
    with pytest.raises(DataError, match=r"uint8 HWC images with 3 channels.*got uint8 \(3, 16"):
        collate_train([(chw_bytes, np.zeros((4, 5), np.float32))])
    hwc_bytes, hwc_floats = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32)
    with pytest.raises(DataError, match=r"uint8 HWC images.*got float32 \(16, 16, 3\)"):
        collate_train([(hwc_bytes, np.zeros((4, 5), np.float32)),
                       (hwc_floats, np.zeros((4, 5), np.float32))])


def test_eval_loader_letterboxes_in_order() -> None:
    ds = IndexDataset(5)
    loader = build_eval_loader(ds, batch_size=2, input_size=(32, 32), num_workers=0)
    seen = []
    for images, ratios, ids, sizes in loader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        for k, (r, hw) in enumerate(zip(ratios, sizes, strict=True)):
            assert r == pytest.approx(min(32 / hw[0], 32 / hw[1]))
            if hw[0] < hw[1]:  # wider than tall: padding at the bottom
                assert float(images[k, 0, 31, 31]) == 114.0
            assert float(images[k, 0, 0, 0]) == (ids[k] - 1000) % 250  # top-left placement
        seen += ids
    assert seen == [1000, 1001, 1002, 1003, 1004]
    sub = build_eval_loader(ds, 4, (32, 32), indices=[3, 1])
    assert next(iter(sub))[2] == [1003, 1001]


class PriorityDataset(IndexDataset):
    """Stamps each image with the nice value of the process that produced it."""

    def pull_item(self, i: int):
        img, boxes, hw, image_id = super().pull_item(i)
        img[:4, :4] = os.getpriority(os.PRIO_PROCESS, 0)  # a block survives the resize
        return img, boxes, hw, image_id


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="per-thread nice values are a Linux property")
def test_loader_workers_yield_the_cores_to_the_step() -> None:
    """Worker processes run LOADER_NICE lower than the training step; the step keeps its own."""
    from accelcore.runtime import LOADER_NICE

    main_nice = os.getpriority(os.PRIO_PROCESS, 0)
    wrap = MosaicDetection(PriorityDataset(8), (64, 64), mosaic=False, enable_mixup=False,
                           max_labels=10, flip_prob=0.0, hsv_prob=0.0)
    for workers, expected in ((2, min(19, main_nice + LOADER_NICE)), (0, main_nice)):
        loader = build_train_loader(wrap, batch_size=4, num_workers=workers, seed=1)
        images = torch.cat([images for images, _ in collect(loader, 0)])
        # The stamped pixel went through letterbox (top-left stays put) and HWC -> CHW.
        assert set(images[:, 0, 0, 0].round().int().tolist()) == {expected}, workers
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_nice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the Linux default")
def test_loader_workers_fork_even_in_a_spawned_process() -> None:
    """A spawned process (bench configuration, spawn-strategy rank) defaults to "spawn"; the
    loader still forks its workers, which leave with os._exit instead of finalising the
    interpreter under a half-pickled batch (SIGABRT at shutdown)."""
    import multiprocessing

    wrap = MosaicDetection(IndexDataset(8), (64, 64), mosaic=False, enable_mixup=False,
                           max_labels=10, flip_prob=0.0, hsv_prob=0.0)
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)  # what a spawned process inherits
    try:
        loader = build_train_loader(wrap, batch_size=4, num_workers=1, seed=1)
        assert loader.loader.multiprocessing_context.get_start_method() == "fork"
        assert len(collect(loader, 0)) == 2
    finally:
        multiprocessing.set_start_method(previous, force=True)
    spawn = multiprocessing.get_context("spawn")
    explicit = build_train_loader(wrap, batch_size=4, num_workers=1, seed=1,
                                  multiprocessing_context=spawn)
    assert explicit.loader.multiprocessing_context is spawn


def test_workers_reuse_their_batch_buffers_and_never_overwrite_a_kept_batch(
        tmp_path, monkeypatch) -> None:
    """Persistent workers stack batches into a ring of shared buffers: over 40 batches (with a
    stream restart mid-epoch and close_mosaic) they allocate only a ring's worth, every batch
    equals the 0-worker loader's, and batches kept un-copied stay intact."""
    from accelcore.data import shared_batches

    made = tmp_path / "allocations.txt"
    allocate = shared_batches.shared_tensor

    def counted(shape, dtype):
        with open(made, "a") as f:
            f.write(f"{os.getpid()}\n")
        return allocate(shape, dtype)

    monkeypatch.setattr(shared_batches, "shared_tensor", counted)  # forked workers inherit it
    loader = build_train_loader(make_wrap(16), 4, num_workers=2, seed=5)
    reference = build_train_loader(make_wrap(16), 4, num_workers=0, seed=5)
    kept, kept_copies = [], []
    try:
        for epoch in range(10):
            if epoch == 7:
                loader.close_mosaic()
                reference.close_mosaic()
            loader.set_epoch(epoch)
            reference.set_epoch(epoch)
            for k, ((x, t), (y, u)) in enumerate(zip(loader, reference, strict=True)):
                assert torch.equal(x, y) and torch.equal(t, u), (epoch, k)
                if k == 1:  # keep one batch an epoch, as it is
                    kept.append(x)
                    kept_copies.append(x.clone())
                if epoch == 3 and k == 2:
                    break  # out of order: the stream restarts and drops its prefetched batches
            if epoch == 3:
                loader.set_epoch(3)
                loader.set_start_batch(3)
                reference.set_epoch(3)
                assert torch.equal(next(iter(loader))[0], list(reference)[3][0])
        assert all(torch.equal(a, b) for a, b in zip(kept, kept_copies, strict=True))
        allocations = made.read_text().split()
        per_worker = {pid: allocations.count(pid) for pid in set(allocations)}
        ring = loader.loader.prefetch_factor + loader.SPARE_BUFFERS
        assert len(per_worker) == 2
        # A ring per worker, plus at most one new buffer for each batch kept.
        assert all(n <= ring + len(kept) for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) <= 2 * ring + len(kept), per_worker
    finally:
        del loader


def test_ring_collate_outside_a_worker_is_a_plain_collate() -> None:
    from accelcore.data.loader import collate_train
    from accelcore.data.shared_batches import BatchBoard

    items = [(np.full((8, 8, 3), i, np.uint8), np.zeros((2, 5), np.float32)) for i in range(3)]
    images, targets, lease = BatchBoard(1, 2).collate(collate_train)(items)
    assert lease is None and images.shape == (3, 8, 8, 3) and targets.shape == (3, 2, 5)
    assert not images.is_shared()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc process states")
def test_workers_paused_stops_the_worker_processes_and_continues_them() -> None:
    import time
    from pathlib import Path

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    loader = build_train_loader(make_wrap(16), 4, num_workers=2, seed=5)
    reference = build_train_loader(make_wrap(16), 4, num_workers=0, seed=5)
    try:
        got = iter(collect(loader, 0))  # workers started (and, persistent, still there)
        pids = [pid for pid in loader._worker_pids.tolist() if pid > 0]
        assert len(pids) == 2
        with loader.workers_paused():
            assert all(state(pid) in "Tt" for pid in pids)
        time.sleep(0.1)
        assert all(state(pid) not in "Tt" for pid in pids)
        for (x, _), (y, _) in zip(got, collect(reference, 0), strict=True):
            assert torch.equal(x, y)
        with loader.workers_paused():
            pass
        for (x, _), (y, _) in zip(collect(loader, 1), collect(reference, 1), strict=True):
            assert torch.equal(x, y)
    finally:
        del loader
