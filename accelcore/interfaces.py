"""Small data types passed across the hook contract (see ``accelcore.hookspecs``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("model", "data", "strategy", "precision", "backend", "reporter")


@dataclass(frozen=True)
class Declaration:
    """One thing a plugin provides: a model, a strategy, a backend method, …"""

    kind: str
    name: str
    summary: str
    available: bool = True
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Declaration.kind must be one of {KINDS}, got {self.kind!r}")


class Precision:
    """How the training loop runs in one numeric precision (Lightning Fabric's ``Precision`` shape).

    The loop calls these in order each step: ``convert_input`` → ``forward_context`` (forward +
    loss) → ``backward`` → ``optimizer_step``. Subclasses override what differs.
    """

    name: str = "32"

    def convert_module(self, module: Any) -> Any:
        """Cast parameters/buffers if the precision keeps them in another dtype."""
        return module

    def convert_input(self, tensor: Any) -> Any:
        return tensor

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Context for forward + loss (autocast for mixed precision)."""
        yield

    def backward(self, loss: Any) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@dataclass
class AccelerateRequest:
    """What a backend may use while converting a model for one method."""

    batch_size: int
    input_size: tuple[int, int]
    work_dir: Path
    calibration: Callable[[], Iterator[Any]] | None = None
    options: dict = field(default_factory=dict)


@dataclass
class AcceleratedModel:
    """An accelerated callable with the raw-output contract of the eval model.

    ``forward(images)`` takes float32 NCHW BGR 0-255 images and returns the raw head output
    ``[B, N, 5 + C]`` as a float32 torch tensor. ``save(folder)`` writes the artifact payload
    (the core writes the manifest beside it); ``None`` if the method cannot be saved.
    """

    method: str
    precision: str
    forward: Callable[[Any], Any]
    save: Callable[[Path], None] | None = None
    details: dict = field(default_factory=dict)

    def __call__(self, images: Any) -> Any:
        return self.forward(images)


@dataclass
class TrainJob:
    """Everything a strategy needs to run the core training loop."""

    recipe: Any
    run_dir: Path
    resume: Path | None = None
    extra: dict = field(default_factory=dict)
