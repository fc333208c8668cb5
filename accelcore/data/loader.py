"""Training and evaluation data loaders.

Training: one shuffled pass per epoch, reshuffled from (seed, epoch), disjoint per-rank shards,
fixed-shape float tensors. Each sample carries its own augmentation seed drawn from
(seed, epoch, rank), so augmentation differs every epoch, never repeats across workers, and does
not depend on how many workers there are (persistent workers cannot be re-seeded per epoch by
``worker_init_fn``, so the seed travels with the index instead). The mosaic on/off flag travels
the same way: ``close_mosaic()`` in the main process reaches persistent workers.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from accelcore.data.preprocess import letterbox
from accelcore.data.shared_batches import Allocate, BatchBoard, new_tensor
from accelcore.errors import DataError
from accelcore.runtime import LOADER_NICE, lower_priority


def _mix(*values: int) -> int:
    """A 32-bit seed from several integers (stable across processes, unlike hash())."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


class EpochBatchSampler:
    """Batches of ``(index, sample_seed, mosaic)`` for this rank; call ``set_epoch`` each epoch.

    The epoch permutation depends only on (seed, epoch), so all ranks agree on it; rank r takes
    every world_size-th element. With ``drop_last`` the permutation is cut to a multiple of
    world_size and the last incomplete batch is dropped; without it, shards are padded by
    wrapping around (like ``DistributedSampler``) so every rank runs the same number of steps.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
        dataset: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.dataset = dataset  # read for its mosaic flag at iteration time
        self.mosaic = True
        if len(self) == 0:
            raise DataError(
                f"dataset of {self.size} images gives no batch of {self.batch_size} per rank "
                f"(world_size {self.world_size}, drop_last={self.drop_last}); use a smaller batch"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _per_rank(self) -> int:
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's dataset indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        total = self._per_rank() * self.world_size
        if total > self.size:
            order = np.resize(order, total)  # wrap around to pad
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def _mosaic_flag(self) -> bool:
        flag = getattr(self.dataset, "enable_mosaic", True) if self.dataset is not None else True
        return bool(flag) and self.mosaic

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int) -> Iterator[list[tuple[int, int, bool]]]:
        """The batches of ``epoch`` (the mosaic flag as it stands when this is called)."""
        idx = self.indices(epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, self.rank, 0xA06])
        seeds = rng.integers(0, 2**63 - 1, size=len(idx), dtype=np.int64)
        mosaic = self._mosaic_flag()
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(int(i), int(s), mosaic) for i, s in zip(idx[sl], seeds[sl], strict=True)]


class _SeededItems(torch.utils.data.Dataset):
    """Turns sampler keys into dataset calls with per-sample seeding."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.native = hasattr(dataset, "close_mosaic") and hasattr(dataset, "enable_mosaic")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, bool]) -> Any:
        index, seed, mosaic = key
        if self.native:
            return self.dataset[(index, seed, mosaic)]
        # Any other dataset: make global RNG use deterministic per sample.
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        return self.dataset[index]


def collate_train(batch: Sequence[Any], allocate: Allocate = new_tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, targets [max_labels, 5], …)`` items into ``(images, targets)``.

    8-bit HWC items (what ``MosaicDetection`` gives) stack to ``uint8 [B, H, W, 3]``: a worker
    then hands the training process a quarter of the bytes of a float batch, and
    :func:`network_input` makes the float input there in one pass. Items of any other dtype are
    taken as CHW images and stack to ``float32 [B, 3, H, W]``. The images are stacked straight
    into ``allocate(shape, dtype)``: by default, in a loader worker, a shared-memory tensor, so
    sending the batch copies nothing more (:mod:`accelcore.data.shared_batches`).
    """
    first = np.asarray(batch[0][0])
    pixels = first.dtype == np.uint8
    try:
        images = [np.asarray(item[0]) if pixels else np.asarray(item[0], dtype=np.float32)
                  for item in batch]
        targets = np.stack([np.asarray(item[1], dtype=np.float32) for item in batch])
    except ValueError as e:
        raise _shape_error(batch, e) from None
    shape_ok = first.ndim == 3 and (first.shape[-1] == 3 if pixels else first.shape[0] == 3)
    # dtype too: a float item among 8-bit ones would not be 8-bit HWC.
    odd = next((im for im in images if im.dtype != images[0].dtype), images[0])
    if not shape_ok or odd is not images[0] or targets.ndim != 3 or targets.shape[-1] != 5:
        expected = "uint8 HWC" if pixels else "CHW"
        raise DataError(
            f"training items must be {expected} images with 3 channels and [max_labels, 5] "
            f"targets, got {odd.dtype} {odd.shape} and {targets.shape[1:]}"
        )
    out = allocate((len(images), *first.shape), torch.uint8 if pixels else torch.float32)
    try:
        np.stack(images, out=out.numpy())
    except ValueError as e:
        raise _shape_error(batch, e) from None
    return out, torch.from_numpy(targets)


def _shape_error(batch: Sequence[Any], error: Exception) -> DataError:
    shapes = sorted({(np.shape(item[0]), np.shape(item[1])) for item in batch})
    return DataError(f"training items must have fixed shapes (wrap the dataset in "
                     f"MosaicDetection); got image/target shapes {shapes}: {error}")


def network_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The ``float32 [B, 3, H, W]`` network input of a training batch, in the memory format asked.

    A ``uint8 [B, H, W, 3]`` batch is converted and laid out by one copy (its HWC order already
    is channels_last); a float ``[B, 3, H, W]`` batch is only laid out.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if images.dtype != torch.uint8:
        return images.contiguous(memory_format=fmt)
    b, h, w, c = images.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32, memory_format=fmt)
    return out.copy_(images.permute(0, 3, 1, 2))


def _worker_init(seed: int, rank: int, worker_id: int) -> None:
    # Fallback seeding for anything that still uses global RNGs; distinct per (seed, rank, worker).
    s = _mix(seed, rank, worker_id, 0xC0FFEE)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    lower_priority(LOADER_NICE)  # augmentation yields the cores to the training step
    # Deliberately no cv2.setNumThreads() here: reconfiguring OpenCV's thread pool inherited
    # through fork() deadlocks (pthread_cond_destroy on the parent's pool state).


def _worker_context() -> Any:
    """Fork where the platform has it, whatever this process's default start method is.

    A process that was itself spawned (the bench's per-configuration processes, the spawn
    strategy's ranks) inherits "spawn" as its default, and a spawned worker exits through the
    interpreter's finalisation: a batch still being pickled by its queue feeder thread then
    dies inside a tensor's deallocation ("terminate called without an active exception",
    SIGABRT; 5 of 6 bench runs on a 2-core Zen 4 with the workers at lower priority). A forked
    worker leaves with ``os._exit`` and needs no re-import of torch at start.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


class _WorkerInit:
    """Picklable worker_init_fn (also works with the spawn start method); with ``pids`` (a
    shared tensor, one entry per worker), each worker writes its process id there."""

    def __init__(self, seed: int, rank: int, pids: torch.Tensor | None = None) -> None:
        self.seed, self.rank, self.pids = seed, rank, pids

    def __call__(self, worker_id: int) -> None:
        _worker_init(self.seed, self.rank, worker_id)
        if self.pids is not None:
            self.pids[worker_id] = os.getpid()


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` if it is a child of this process (a worker, not a recycled
    id), else ``""``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return fields[0] if int(fields[1]) == os.getpid() else ""


class _ContinuousBatches:
    """What the DataLoader samples from: the batches of epoch after epoch, from ``start``
    ``(epoch, batch)`` to the end of ``last_epoch`` (None: no end)."""

    def __init__(self, sampler: EpochBatchSampler, last_epoch: int | None) -> None:
        self.sampler = sampler
        self.last_epoch = last_epoch
        self.start = (0, 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        epoch, skip = self.start
        last = None if self.last_epoch is None else max(self.last_epoch, epoch)
        while last is None or epoch <= last:
            for k, keys in enumerate(self.sampler.epoch_batches(epoch)):
                if k >= skip:
                    yield keys
            epoch, skip = epoch + 1, 0


class TrainLoader:
    """Iterable of ``(images, targets [B, max_labels, 5] float32)`` batches; images are
    ``uint8 [B, H, W, 3]`` (or ``float32 [B, 3, H, W]``, see :func:`collate_train`).

    One epoch per iteration (``set_epoch`` first), but the workers' stream runs on: while the
    last batches of an epoch train, they already make the first ones of the next, where a
    DataLoader started afresh each epoch would have the step wait for a whole batch of
    augmentation (on coco128 at batch 64, every second step). Iterating out of order (another
    epoch, a resumed position via ``set_start_batch``) or ``close_mosaic`` restarts the stream.
    ``epochs`` (the run's length) stops it after the last epoch instead of making batches
    nobody takes.

    Persistent workers stack their batches into a ring of shared-memory buffers they reuse
    (:mod:`accelcore.data.shared_batches`); a buffer is written again only once nothing holds
    the batch that was in it, so batches may be kept as long as wanted.
    """

    #: Buffers a worker may have beyond ``prefetch_factor``: the batch being trained on, the one
    #: before it (still bound while the next is fetched) and two for batches kept longer.
    SPARE_BUFFERS = 4

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        multiprocessing_context: Any = None,
        pin_memory: bool = False,
        epochs: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = EpochBatchSampler(
            len(dataset), batch_size, seed, rank, world_size, drop_last, dataset=dataset
        )
        self._batches = _ContinuousBatches(self.sampler, None if epochs is None else epochs - 1)
        self._stream: Iterator[Any] | None = None
        self._next = (0, 0)  # the (epoch, batch) the stream gives next
        self._start_batch = 0
        kwargs: dict[str, Any] = {}
        self._board: BatchBoard | None = None
        collate: Any = collate_train
        if num_workers > 0 and persistent_workers and not pin_memory:
            self._board = BatchBoard(num_workers, prefetch_factor + self.SPARE_BUFFERS)
            collate = self._board.collate(collate_train)
        self._worker_pids = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        if num_workers > 0:
            kwargs.update(
                persistent_workers=persistent_workers,
                prefetch_factor=prefetch_factor,
                worker_init_fn=_WorkerInit(seed, rank, self._worker_pids),
                multiprocessing_context=multiprocessing_context or _worker_context(),
            )
        self.loader = DataLoader(
            _SeededItems(dataset),
            batch_sampler=self._batches,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            **kwargs,
        )

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_start_batch(self, batch: int) -> None:
        """The next iteration starts at ``batch`` of the epoch (a resumed run): the batches
        before it are skipped without being made."""
        self._start_batch = int(batch)

    def close_mosaic(self) -> None:
        """No mosaic/mixup from the next epoch on, in every worker (persistent ones included)."""
        self.sampler.mosaic = False
        if hasattr(self.dataset, "close_mosaic"):
            self.dataset.close_mosaic()
        self._stream = None  # batches already asked for were made with mosaic

    def __len__(self) -> int:
        return len(self.sampler)

    @contextlib.contextmanager
    def workers_paused(self) -> Iterator[None]:
        """The worker processes stopped (SIGSTOP) for the block, then continued where they were:
        a benchmark's compute-only steps interleaved with end-to-end ones then share nothing
        with the loader, and the end-to-end steps find it exactly as they left it."""
        pids = [pid for pid in self._worker_pids.tolist() if pid > 0 and _process_state(pid)]
        stopped = []
        try:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            deadline = time.monotonic() + 1.0  # a signal is delivered soon, not at once
            while (time.monotonic() < deadline
                   and any(_process_state(pid) not in ("T", "t", "") for pid in stopped)):
                time.sleep(0.001)
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = (self.sampler.epoch, self._start_batch)
        self._start_batch = 0
        last = self._batches.last_epoch
        if self._stream is None or self._next != start or (last is not None and start[0] > last):
            self._batches.start = start
            self._stream = iter(self.loader)
            self._next = start
        return self._epoch(*start)

    def _epoch(self, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in range(first, len(self)):
            # Yielded straight from the call: a local would hold the batch while suspended.
            yield self._take((epoch, batch + 1))
        self._next = (epoch + 1, 0)

    def _take(self, then: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._board is not None:
            self._board.release_unused()
        item = next(self._stream)
        self._next = then
        if self._board is None:
            return item
        images, targets, lease = item
        self._board.received(lease, images)
        return images, targets


def build_train_loader(
    dataset: Any,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    **kwargs: Any,
) -> TrainLoader:
    """Training loader over ``dataset`` (normally a ``MosaicDetection``); see :class:`TrainLoader`.

    ``batch_size`` is per rank. Extra kwargs: ``persistent_workers``, ``prefetch_factor``,
    ``multiprocessing_context``, ``pin_memory``, ``epochs``.
    """
    return TrainLoader(
        dataset, batch_size, num_workers, seed, rank, world_size, drop_last, **kwargs
    )


class _EvalItems(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, input_size: Sequence[int], indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.indices = list(indices)
        pull = getattr(dataset, "pull_item", None)
        self._pull = pull if pull is not None else dataset.__getitem__

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, float, int, tuple[int, int]]:
        img, _, _, img_id = self._pull(self.indices[i])
        chw, ratio = letterbox(img, self.input_size)
        return chw, ratio, int(img_id), (int(img.shape[0]), int(img.shape[1]))


def collate_eval(
    batch: Sequence[tuple[np.ndarray, float, int, tuple[int, int]]],
) -> tuple[torch.Tensor, list[float], list[int], list[tuple[int, int]]]:
    images, ratios, ids, sizes = zip(*batch, strict=True)
    return torch.from_numpy(np.stack(images)), list(ratios), list(ids), list(sizes)


def build_eval_loader(
    dataset: Any,
    batch_size: int,
    input_size: Sequence[int],
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """In-order loader of ``(images [B,3,H,W], ratios, image_ids, [(h, w), …])`` (letterboxed)."""
    if indices is None:
        indices = range(len(dataset))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["worker_init_fn"] = _WorkerInit(0, 0)
    return DataLoader(
        _EvalItems(dataset, input_size, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
        **kwargs,
    )
