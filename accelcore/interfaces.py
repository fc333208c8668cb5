"""Small data types passed across the hook contract (see ``accelcore.hookspecs``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: What a plugin can declare. "feature": a training-time switch (``train.features``);
#: "reference": a plain-runtime baseline row measured beside the accelerated methods.
KINDS = ("model", "data", "strategy", "precision", "feature", "backend", "reference", "reporter")


@dataclass(frozen=True)
class Declaration:
    """One thing a plugin provides: a model, a strategy, a backend method, …"""

    kind: str
    name: str
    summary: str
    available: bool = True
    reason: str = ""
    # Backends and references: the precision the method computes in ("fp32", "bf16", "fp16",
    # "int8"); ``accelerate.methods: auto`` and ``doctor`` skip methods emulated on this CPU.
    compute: str = ""
    # References: measured under the stock runtime (no allocator tuning, default threads) —
    # what a user has before installing accelcore — instead of the project's tuned setup.
    stock_runtime: bool = False
    # Models: the one a recipe without ``model.name`` builds (at most one per installation).
    default: bool = False
    #: Distributions whose versions shape what this provides (recorded in run manifests).
    packages: tuple[str, ...] = ()

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


@runtime_checkable
class Detector(Protocol):
    """What the core needs from a model: the whole model contract (YOLOX is one implementation).

    ``accelcore_build_model`` returns a ``torch.nn.Module`` that also has these members; the core
    checks them once, when it builds the model (a model missing any gets one error naming
    ``model.name`` and the missing members), and never looks inside the module otherwise.

    * Train: ``model.train(); losses = model(images, targets)`` → dict of scalar tensors holding
      every key of ``loss_keys``; ``"total_loss"`` (required in ``loss_keys``) is back-propagated,
      the others are logged. ``images``: float32 ``[B, 3, H, W]`` BGR 0-255; ``targets``: float32
      ``[B, max_labels, 5]`` = (class, cx, cy, w, h) in input pixels, all-zero rows = padding.
    * Eval, ``output_mode == "decoded"`` (the default): ``model(images)`` → decoded output, ready
      for ``postprocess``. ``output_mode == "raw"``: undecoded float32 ``[B, N, K]``, the graph a
      backend converts (no data-dependent control flow); ``decode(raw, input_hw)`` turns it into
      exactly the decoded output, in fp32. Accelerated methods and evaluation use raw + decode.
    * ``postprocess(decoded, conf_thre, nms_thre)`` → one float32 ``(K, 6)`` numpy array per
      image: x1, y1, x2, y2, score, class index, in network-input pixels.
    * ``input_size``: the default ``(H, W)`` (``model.input_size`` in a recipe overrides it by
      being passed to the plugin); ``num_classes``: the number of classes predicted.
    * ``meta``: plain values (str/int/float/bool/list) saved with checkpoints and artifacts; at
      least ``name``, ``num_classes`` and ``input_size``.
    * ``start_no_augmentation()``: called at the start of each of the last
      ``train.no_aug_epochs`` epochs (mosaic/mixup closed); YOLOX switches on its L1 loss there.
      Must be idempotent; models with nothing to change do nothing.
    * Optional, not checked: ``deploy_form()`` → an eval copy computing exactly the same raw
      output with ops graph runtimes run fast (YOLOX folds its Focus stem's strided slices into
      one convolution); graph backends convert that form
      (:func:`accelcore.inference.export.deploy_form`). ``postprocess_raw(raw, input_hw,
      conf_thre, nms_thre)`` → exactly ``postprocess(decode(raw, input_hw), conf_thre,
      nms_thre)``, computed faster (YOLOX decodes only the anchors that can pass the score
      threshold); :class:`~accelcore.predictor.Predictor` uses it when present.

    What a saved checkpoint was made for (model name, class count) is read before any model
    exists, so it is not a member here: the model plugin answers the
    ``accelcore_checkpoint_info`` hook.
    """

    meta: dict[str, Any]
    output_mode: str
    loss_keys: tuple[str, ...]

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def decode(self, raw: Any, input_hw: tuple[int, int]) -> Any: ...

    def postprocess(self, decoded: Any, conf_thre: float, nms_thre: float) -> list[Any]: ...

    def start_no_augmentation(self) -> None: ...


#: Every member of :class:`Detector`, for error messages that name what is missing.
DETECTOR_MEMBERS: tuple[str, ...] = tuple(sorted(
    {*Detector.__annotations__}
    | {n for n, v in vars(Detector).items()
       if not n.startswith("_") and (callable(v) or isinstance(v, property))}))


def missing_detector_members(model: Any) -> list[str]:
    """The :class:`Detector` members ``model`` lacks (``[]``: it satisfies the contract)."""
    missing = [name for name in DETECTOR_MEMBERS if not hasattr(model, name)]
    loss_keys = getattr(model, "loss_keys", None)
    if "loss_keys" not in missing and "total_loss" not in tuple(loss_keys or ()):
        missing.append("'total_loss' in loss_keys")
    return missing


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

    Calling it with letterboxed BGR images — float32 NCHW 0-255 or uint8 NHWC — returns the
    model's raw output (:class:`Detector` in ``output_mode "raw"``, ``[B, N, K]``) as a float32
    torch tensor. ``forward`` is the native entry: it takes images in ``input_format``
    (:data:`IMAGE_FORMATS`), so a backend that does the layout change and scaling inside its
    graph can take the 4× smaller uint8 batch straight from the decoder; ``__call__`` converts
    (losslessly: letterboxed pixels are integers) when handed the other format. ``save(folder)``
    writes the artifact payload (the core writes the manifest beside it); ``None`` if the
    method cannot be saved.
    """

    method: str
    precision: str
    forward: Callable[[Any], Any]
    save: Callable[[Path], None] | None = None
    details: dict = field(default_factory=dict)
    input_format: str = "float32_nchw"

    def __call__(self, images: Any) -> Any:
        from accelcore.inference.image_format import to_format

        return self.forward(to_format(images, self.input_format))


@dataclass
class TrainJob:
    """Everything a strategy needs to run the core training loop."""

    recipe: Any
    run_dir: Path
    resume: Path | None = None
    extra: dict = field(default_factory=dict)
