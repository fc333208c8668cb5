"""Run records: ``metrics.jsonl`` (one line per iteration), ``epochs.csv``, the summary.

Only rank 0 writes. On resume the files are cut back to the checkpoint's position so lines
written after the last checkpoint (by the killed run) are not duplicated. The loss columns are
the model's own (``Detector.loss_keys``); the others are the loop's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def epoch_fields(loss_keys: Sequence[str]) -> tuple[str, ...]:
    """Columns of ``epochs.csv``: position, the model's loss parts, speed and accuracy."""
    return ("epoch", "iterations", "lr", *loss_keys, "img_per_s", "train_s", "ap50_95", "ap50",
            "no_aug")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # json has no NaN/inf
    return value


class RunRecords:
    def __init__(self, run_dir: str | Path, loss_keys: Sequence[str] = ("total_loss",),
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.fields = epoch_fields(loss_keys)
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.epochs_path = Path(run_dir) / "epochs.csv"
        self._metrics = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)

    def truncate(self, iteration: int, epoch: int) -> None:
        """Keep only records up to global ``iteration`` and completed ``epoch`` (for resume)."""
        if not self.enabled:
            return
        if self.metrics_path.is_file():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line)["iter"] <= iteration:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a half-written last line from the kill
            self.metrics_path.write_text("".join(k + "\n" for k in kept))
        if self.epochs_path.is_file():
            rows = list(csv.DictReader(io.StringIO(self.epochs_path.read_text())))
            keep = [r for r in rows if r.get("epoch") and int(r["epoch"]) <= epoch]
            self._write_epochs(keep)

    def _write_epochs(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        self.epochs_path.write_text(buf.getvalue())

    def log_iter(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def flush(self) -> None:
        if self._metrics is not None:
            self._metrics.flush()

    def log_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.flush()
        new = not self.epochs_path.is_file()
        with open(self.epochs_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in self.fields})

    def write_summary(self, summary: dict[str, Any], path: str | Path) -> None:
        if not self.enabled:
            return
        Path(path).write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class Meter:
    """Running means of the loss parts over one epoch (checkpointed for mid-epoch resume)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.seconds = 0.0

    def update(self, values: dict[str, float], images: int, seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "images": self.images,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.images = int(state["images"])
        self.seconds = float(state["seconds"])
