"""The hook contract between the accelcore core and its plugins (pluggy project ``accelcore``).

Every stage of the pipeline is one of these hooks. A plugin is any module (usually a package
registered under the ``accelcore`` entry-point group) that implements some of them with
``@accelcore.hookimpl``. Built-in plugins are loaded exactly like third-party ones.

Dispatch by name: hooks marked ``firstresult`` are called until one implementation returns
something other than ``None``; an implementation returns ``None`` for names it does not own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from accelcore.interfaces import (
        AcceleratedModel,
        AccelerateRequest,
        Declaration,
        Precision,
    )

PROJECT = "accelcore"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def accelcore_declare() -> list[Declaration]:
    """Say what this plugin provides and whether it can run on this machine.

    Return one :class:`~accelcore.interfaces.Declaration` per model, data source, strategy,
    precision, backend method or reporter. Must be cheap: check availability with
    ``importlib.util.find_spec`` / package metadata, never by importing a heavy dependency.
    """


@hookspec(firstresult=True)
def accelcore_build_model(config: Any) -> Any:
    """Build the ``torch.nn.Module`` named by ``config.name`` (a ``ModelConfig``).

    The module must satisfy :class:`~accelcore.interfaces.Detector` (checked by the core). Load
    ``config.checkpoint`` if set. Return ``None`` for model names this plugin does not own.
    """


@hookspec(firstresult=True)
def accelcore_build_data(config: Any, split: str, run_dir: Path) -> Any:
    """Build the dataset for ``split`` ("train" or "val") from a ``DataConfig``.

    ``run_dir`` is where generated data (e.g. the synthetic default set) may be cached. The core
    names no data source: the plugin that recognises the config answers; return ``None`` if this
    plugin does not.
    """


@hookspec(firstresult=True)
def accelcore_precision(name: str) -> Precision | None:
    """Return a :class:`~accelcore.interfaces.Precision` for ``name`` ("64", "32", "16", "bf16")."""


@hookspec(firstresult=True)
def accelcore_launch(strategy: str, fn: Callable[[int, int], Any], nprocs: int,
                     recipe: Any) -> Any:
    """Run ``fn(rank, world_size)`` on ``nprocs`` processes with the named strategy.

    The strategy's ``Launcher`` owns the processes and their wiring (rendezvous, process group,
    core pinning, the runtime setup of each worker, failure handling); ``fn`` is what each rank
    runs — the core training loop, a benchmark step, … — and never knows which strategy ran it.
    ``recipe`` carries the strategy's own options (``recipe.train.options[strategy]``). Return
    rank 0's return value unchanged (it is opaque: the core wraps it, so that a function
    returning ``None`` still counts as run); return ``None`` for strategies this plugin does not
    own.
    """


@hookspec(firstresult=True)
def accelcore_prepare_training(model: Any, optimizer: Any, config: Any) -> tuple | None:
    """Apply the training-time features this plugin owns to ``(model, optimizer)``.

    ``config`` is the recipe's ``TrainConfig``; a plugin acts only if ``config.features`` names
    a feature it declared (declaration kind ``"feature"``), with its options from
    ``config.options[name]``. Return the new pair, or ``None`` to leave them. Raise
    :class:`~accelcore.errors.BackendUnavailable` if asked for something that cannot run.
    """


@hookspec(firstresult=True)
def accelcore_accelerate(method: str, model: Any,
                         request: AccelerateRequest) -> AcceleratedModel | None:
    """Turn an eval-mode model into an accelerated callable for ``method``.

    ``model`` is in raw-output mode: float32 NCHW BGR 0-255 images in, undecoded head output
    ``[B, N, 5 + C]`` out. The returned callable keeps exactly that contract (decode and NMS stay
    in fp32 in the core). Raise :class:`~accelcore.errors.BackendUnavailable` with the reason if
    the method cannot run here. Return ``None`` for methods this plugin does not own.
    """


@hookspec(firstresult=True)
def accelcore_load_artifact(method: str, folder: Path, manifest: dict) -> AcceleratedModel | None:
    """Load a saved artifact folder written for ``method``; ``None`` if not this plugin's."""


@hookspec(firstresult=True)
def accelcore_validate(predictor: Any, dataset: Any, options: Any, input_size: tuple[int, int],
                       out_dir: Path | None) -> dict | None:
    """Compute metrics (COCO AP50:95, AP50, …) for ``predictor`` on ``dataset``.

    ``predictor(images[B,3,H,W]) -> list of (K, 6) arrays`` in network-input pixels;
    ``options`` is the recipe's ``ValidateConfig``; per-image detections and per-class AP go to
    ``out_dir`` when given. Return ``None`` for datasets this plugin does not own.
    """


@hookspec(firstresult=True)
def accelcore_checkpoint_info(checkpoint: dict) -> dict | None:
    """What model a loaded checkpoint (a weights-only ``torch.load`` result) was made for.

    Return ``{"name", "num_classes", "input_size"}`` as far as the weights tell (keys may be
    missing), or ``None`` if this model plugin does not recognise the checkpoint.
    """


@hookspec
def accelcore_report(results: dict, run_dir: Path, formats: list[str]) -> list[Path]:
    """Write ``results`` in each format this reporter owns and that ``formats`` names.

    Every reporter is called; return the paths written (empty if none).
    """
