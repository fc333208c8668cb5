"""Shared-memory batch buffers that loader workers reuse instead of allocating one per batch.

Why: a worker that stacks every batch into a fresh shared-memory segment pays the kernel for
zeroing each page of it (about 22 ms of system time for the 33 MB of a batch of 64 images at
416 px on a Sapphire Rapids), and the training process maps the new segment and faults it in
again, on the step's critical path. Here each worker keeps a small ring of segments and the
training process keeps every segment it has seen mapped (torch's sharing cache then hands back
the same mapping), so a reused slot costs neither.

The protocol runs over one shared ``int64 [workers, slots]`` board made before the workers
start (persistent workers only: a worker process and its ring live as long as the loader):

- a worker takes a slot whose entry is 0, writes its running batch number there (the stamp),
  stacks the batch into the slot's segment and sends ``(images, targets, lease)``;
- the training process sets the entry back to 0 once nothing but its own mapping holds the
  segment: the batch's tensors and every view of them are gone. A batch the user keeps is never
  overwritten: the worker takes another slot, and when every slot is in use it gives the slot
  of its oldest batch a new segment (the batch keeps the old one);
- batches a restarted DataLoader discarded never arrive. A worker makes its batches one after
  another, so when a batch stamped ``n`` arrives, any slot of that worker stamped below ``n``
  that did not arrive was discarded, and is freed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

Lease = tuple[int, int, int]  # (worker, slot, stamp)
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in a fresh shared-memory segment."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, in a fresh shared-memory segment (sending it
    then copies nothing, as with torch's default collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return shared_tensor(shape, dtype)


def _use_count(storage: torch.UntypedStorage) -> float:
    """How many holders the storage has (tensors, views, storage objects). Without the counter
    (a torch that lacks it) slots are never freed: the workers fall back to fresh segments."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return counter(storage._cdata) if counter is not None else math.inf


class BatchBoard:
    """The training process's side: the board, the mapping of every slot, and the slots whose
    batch may still be in use."""

    def __init__(self, workers: int, slots: int) -> None:
        self.board = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self._entries = self.board.numpy()
        self._mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
        self._out: dict[tuple[int, int], int] = {}  # slot -> stamp of the batch handed out

    def collate(self, collate: Callable[[Sequence[Any], Allocate], Any]) -> RingCollate:
        """The workers' collate function writing into this board's slots."""
        return RingCollate(self.board, collate)

    def received(self, lease: Lease | None, images: torch.Tensor) -> None:
        """A batch arrived from a worker: keep its segment mapped, note it as handed out, and
        free the slots of batches that worker made before it that never arrived."""
        if lease is None:
            return
        worker, slot, stamp = lease
        self._mapped[worker, slot] = images.untyped_storage()
        self._out[worker, slot] = stamp
        row = self._entries[worker]
        for other in np.flatnonzero((row > 0) & (row < stamp)):
            if self._out.get((worker, int(other))) != row[other]:
                row[other] = 0

    def release_unused(self) -> None:
        """Free every handed-out slot whose batch nobody holds any more (unless the worker has
        given the slot a new segment meanwhile: then its entry is another batch's)."""
        for key in [key for key in self._out if _use_count(self._mapped[key]) <= 1]:
            if self._entries[key] == self._out.pop(key):
                self._entries[key] = 0


class RingCollate:
    """Collate in a loader worker into a slot of the worker's ring (see the module's protocol);
    returns ``(images, targets, lease)``. Outside a worker, a plain collate with no lease."""

    def __init__(self, board: torch.Tensor,
                 collate: Callable[[Sequence[Any], Allocate], Any]) -> None:
        self.board = board
        self.collate = collate
        self._ring: list[torch.Tensor | None] = []
        self._made = 0

    def __call__(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, Lease | None]:
        info = get_worker_info()
        if info is None:
            return (*self.collate(batch, new_tensor), None)
        leases: list[Lease] = []

        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            self._made += 1
            entries = self.board[info.id].numpy()
            free = np.flatnonzero(entries[:len(self._ring)] == 0)
            if len(free):
                slot = int(free[0])
            elif len(self._ring) < len(entries):
                slot = len(self._ring)
                self._ring.append(None)
            else:  # every slot is in use: the oldest batch keeps its segment, the slot a new one
                slot = int(np.argmin(entries))
                self._ring[slot] = None
            held = self._ring[slot]
            if held is None or held.shape != shape or held.dtype != dtype:
                self._ring[slot] = shared_tensor(shape, dtype)
            entries[slot] = self._made
            leases.append((info.id, slot, self._made))
            return self._ring[slot]

        images, targets = self.collate(batch, allocate)
        return images, targets, leases[0] if leases else None
