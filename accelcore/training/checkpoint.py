"""Crash-safe checkpoints and RNG state capture.

``atomic_save`` writes to a temp file in the destination folder, fsyncs it and ``os.replace``s
it over the target, so a kill at any moment leaves either the old or the new file — never a
truncated one. Everything is stored as tensors / plain types so ``torch.load(weights_only=True)``
can read it back (no pickled Python objects from disk).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelcore.errors import CheckpointError, one_line


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Persist the rename itself (directory entry) before we report success.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely; one-line :class:`CheckpointError` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, …
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(exc)}") from None


def clean_stale_temps(folder: str | Path) -> None:
    """Remove temp files left by a save that was killed (they are never valid checkpoints)."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])


def export_weights(src: str | Path, dst: str | Path) -> Path:
    """Write a slim, deployable copy of a training checkpoint: the (EMA) weights under
    ``"model"`` — the official YOLOX layout — plus ``"meta"``, without optimizer/RNG state."""
    ckpt = load_checkpoint(src)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{src}: not a training checkpoint (no 'model' weights)")
    slim = {"model": ckpt["model"]}
    if "meta" in ckpt:
        slim["meta"] = ckpt["meta"]
    return atomic_save(slim, dst)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m accelcore.training.checkpoint SRC.pth DST.pth")
    print(export_weights(sys.argv[1], sys.argv[2]))
