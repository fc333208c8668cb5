"""Artifact folders: one accelerated model, ready to predict without the training code.

Layout of ``<folder>/``::

    manifest.json   method, precision, input size, batch size, model name + classes, metrics,
                    versions — everything needed to rebuild the forward and the decoding
    <payload>       written by the backend's ``AcceleratedModel.save`` (e.g. ``model.pt2``)

:func:`load_artifact` asks the ``accelcore_load_artifact`` hook for the forward and builds the
fp32 decode + NMS from ``create_model(**manifest["model"])`` (its weights are not used), so
every method is post-processed by the same code (:class:`accelcore.predictor.Predictor`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelcore.errors import AccelcoreError, PluginError
from accelcore.interfaces import AcceleratedModel

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def folder_size_mb(folder: Path) -> float:
    """Total size of the files under ``folder`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def save_artifact(folder: str | Path, accelerated: AcceleratedModel, manifest: dict) -> Path:
    """Write ``accelerated``'s payload (``accelerated.save(folder)``) and ``manifest.json``.

    ``manifest`` should hold at least ``input_size`` and ``model`` (``{"name", "num_classes"}``);
    ``method``, ``precision``, ``format_version``, ``created`` and ``size_mb`` are filled in.
    Raises :class:`AccelcoreError` if the method cannot be saved.
    """
    if accelerated.save is None:
        raise AccelcoreError(f"method '{accelerated.method}' cannot be saved as an artifact")
    missing = [k for k in ("input_size", "model") if k not in manifest]
    if missing:
        raise ValueError(f"artifact manifest is missing {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    accelerated.save(folder)
    full = {"format_version": FORMAT_VERSION, "method": accelerated.method,
            "precision": accelerated.precision,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **manifest}
    full["method"], full["precision"] = accelerated.method, accelerated.precision
    full["size_mb"] = round(folder_size_mb(folder), 3)  # payload only (manifest not yet there)
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
    return folder


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """``(folder, manifest)`` for an artifact folder or its ``manifest.json``."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST else path
    file = folder / MANIFEST
    if not file.is_file():
        raise AccelcoreError(f"{folder}: not an accelcore artifact (no {MANIFEST}); artifacts "
                             "are written to <run>/artifacts/<method>/")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AccelcoreError(f"{file}: corrupt manifest: {exc}") from None
    for key in ("method", "input_size", "model"):
        if key not in manifest:
            raise AccelcoreError(f"{file}: manifest has no '{key}'")
    return folder, manifest


class LoadedModel:
    """A loaded artifact: ``predict(list of BGR images) -> list of (K, 6) detections``.

    Detections are float32 ``x1, y1, x2, y2, score, class_index`` in *original* image pixels.
    ``class_names[int(class_index)]`` names the class.
    """

    def __init__(self, folder: Path, manifest: dict, accelerated: AcceleratedModel,
                 decoder: Any) -> None:
        self.folder = folder
        self.manifest = manifest
        self.accelerated = accelerated
        self.decoder = decoder
        self.method: str = manifest["method"]
        self.precision: str = manifest.get("precision", accelerated.precision)
        self.input_size: tuple[int, int] = tuple(int(v) for v in manifest["input_size"])
        self.batch_size: int = int(manifest.get("batch_size") or 1)
        model = manifest["model"]
        self.class_names: list[str] = list(manifest.get("class_names") or [
            str(i) for i in range(int(model["num_classes"]))])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw head output ``[B, N, 5 + C]`` (float32) for letterboxed images."""
        return self.accelerated(images)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray, conf: float = 0.3,
                nms: float = 0.45, batch_size: int | None = None) -> list[np.ndarray]:
        """Detect objects in BGR uint8 images (one array or a list); one (K, 6) array each."""
        from accelcore.data.preprocess import preprocess_batch
        from accelcore.predictor import Predictor

        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        predictor = Predictor(self.accelerated, self.decoder, raw=True, conf_thre=conf,
                              nms_thre=nms)
        step = max(1, batch_size or self.batch_size)
        results: list[np.ndarray] = []
        for start in range(0, len(images), step):
            batch, ratios = preprocess_batch(images[start:start + step], self.input_size)
            for dets, ratio in zip(predictor(batch), ratios, strict=False):
                dets = np.asarray(dets, dtype=np.float32).copy()
                dets[:, :4] /= ratio  # network-input pixels -> original pixels
                results.append(dets)
        return results

    __call__ = predict

    def __repr__(self) -> str:
        return (f"LoadedModel(method={self.method!r}, precision={self.precision!r}, "
                f"input_size={self.input_size}, classes={len(self.class_names)})")


def load_artifact(path: str | Path, pm: Any = None) -> LoadedModel:
    """Load an artifact folder (or its manifest.json) for prediction."""
    from accelcore.plugins import get_plugin_manager
    from accelcore.registry import create_model

    folder, manifest = read_manifest(path)
    pm = pm or get_plugin_manager()
    accelerated = pm.hook.accelcore_load_artifact(method=manifest["method"], folder=folder,
                                                  manifest=manifest)
    if accelerated is None:
        raise PluginError(f"{folder}: no loaded plugin can load artifacts of method "
                          f"'{manifest['method']}' (is its backend plugin installed?)")
    # The model config recorded at save time (older manifests: name and num_classes only).
    model = dict(manifest["model"])
    decoder = create_model(model.pop("name"), **model)
    decoder.eval()
    return LoadedModel(folder, manifest, accelerated, decoder)
