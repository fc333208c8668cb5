"""Real preprocessed images for calibration and latency measurement.

Every int8 backend calibrates on the same images: ``num_images`` evenly spaced items of the
given dataset (normally the training split), letterboxed exactly like evaluation
(:func:`accelcore.data.preprocess.letterbox`). Random noise would give activation ranges
unlike real data and hence misleading int8 accuracy, so it is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from accelcore.data.preprocess import letterbox
from accelcore.errors import DataError


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)``; repeats when count > length."""
    if length <= 0:
        raise DataError("dataset is empty: no images to calibrate or measure with")
    if count <= length:
        return [int(i) for i in np.linspace(0, length - 1, count).round()]
    return [i % length for i in range(count)]


def load_images(dataset: Any, indices: Sequence[int], input_size: Sequence[int]) -> torch.Tensor:
    """Letterboxed float32 ``[len(indices), 3, H, W]`` (BGR 0-255) from ``dataset[i][0]``."""
    arrays = [letterbox(dataset[i][0], input_size)[0] for i in indices]
    return torch.from_numpy(np.stack(arrays))


def build_calibration(dataset: Any, input_size: Sequence[int], num_images: int = 128,
                      batch_size: int = 8) -> Callable[[], Iterator[torch.Tensor]]:
    """The ``AccelerateRequest.calibration`` callable for ``dataset``.

    Calling it returns an iterator of float32 NCHW batches (at most ``batch_size`` images each,
    ``num_images`` in total, ≥ 1). The images are decoded and letterboxed once, up front, so a
    backend may iterate several times (e.g. one pass per observer) at no extra cost.
    """
    if num_images < 1:
        raise ValueError(f"calibration needs at least one image, got {num_images}")
    images = load_images(dataset, spread_indices(len(dataset), min(num_images, len(dataset))),
                         input_size)
    return calibration_from_tensor(images, batch_size)


def calibration_from_tensor(images: torch.Tensor,
                            batch_size: int = 8) -> Callable[[], Iterator[torch.Tensor]]:
    """Wrap already preprocessed images ``[N, 3, H, W]`` as a calibration callable."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"calibration images must be [N, 3, H, W] with N >= 1, got "
                         f"{tuple(images.shape)}")
    step = max(1, int(batch_size))

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, images.shape[0], step):
            yield images[start:start + step]

    batches.num_images = int(images.shape[0])  # type: ignore[attr-defined]
    return batches
