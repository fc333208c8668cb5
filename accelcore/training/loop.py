"""The training loop every strategy runs: ``fit(job, rank, world_size)``.

YOLOX recipe (official ``Trainer`` semantics): SGD + Nesterov over three parameter groups,
per-iteration "quadwarm_cos_flat" lr, EMA of the weights, multiscale input every
``multiscale_interval`` iterations, mosaic/mixup closed and the model told so
(``Detector.start_no_augmentation``: YOLOX's L1 loss) for the last ``no_aug_epochs`` (where
evaluation runs every epoch), evaluation of the EMA weights, best/last
checkpoints. Distributed-ready: with ``world_size > 1`` (process group already initialised by the
strategy) the model is wrapped in DDP, each rank reads its shard of every epoch, BN statistics
are averaged before evaluation, and only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from accelcore.build import build_data, build_model
from accelcore.errors import PluginError, RecipeError
from accelcore.interfaces import Precision, TrainJob
from accelcore.plugins import PluginManager, get_plugin_manager
from accelcore.runtime import RuntimeSetup, describe_runtime
from accelcore.training.auto_precision import resolve_precision
from accelcore.training.checkpoint import (
    atomic_save,
    clean_stale_temps,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from accelcore.training.ema import ModelEMA, unwrap
from accelcore.training.lr_scheduler import LRScheduler
from accelcore.training.optim import build_optimizer, set_lr
from accelcore.training.records import Meter, RunRecords

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def check_classes(dataset: Any, recipe: Any, split: str) -> None:
    n = getattr(dataset, "num_classes", None)
    if n is not None and int(n) != recipe.model.num_classes:
        raise RecipeError(
            f"{recipe.source}: model.num_classes: {recipe.model.num_classes} but the {split} data "
            f"has {n} classes; set model.num_classes: {n}")


def get_precision(pm: PluginManager, name: str) -> Precision:
    precision = pm.hook.accelcore_precision(name=name)
    if precision is None:
        options = ", ".join(pm.names("precision")) or "none"
        raise PluginError(f"train.precision: unknown precision '{name}'; available: {options}")
    return precision


def build_train_loader(dataset: Any, recipe: Any, input_size: tuple[int, int], rank: int,
                       world_size: int) -> Any:
    """The data package's mosaic wrapper + seeded, sharded loader (nothing re-implemented)."""
    from accelcore.data.loader import build_train_loader as _build
    from accelcore.data.mosaic import MosaicDetection

    wrapped = MosaicDetection.from_config(dataset, input_size, recipe.data.augment,
                                          on_bad_image=recipe.data.on_bad_image)
    return _build(wrapped, recipe.train.batch_size // world_size,
                  num_workers=recipe.data.num_workers, seed=recipe.train.seed, rank=rank,
                  world_size=world_size, drop_last=True, epochs=recipe.train.epochs)


def prepare_training(pm: PluginManager, model: nn.Module, optimizer: torch.optim.Optimizer,
                     cfg: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Apply ``train.features`` in order; every name must be a declared, available feature.

    The check comes first, so a feature that cannot run here fails before any training with
    its plugin's reason. Each feature is then offered to the plugins on its own (a config whose
    ``features`` holds only that name), so every feature's plugin gets its turn even though the
    hook stops at the first plugin that returns a pair.
    """
    for i, name in enumerate(cfg.features):
        pm.require("feature", name, f"train.features[{i}]")
    for name in cfg.features:
        prepared = pm.hook.accelcore_prepare_training(
            model=model, optimizer=optimizer, config=dataclasses.replace(cfg, features=[name]))
        if prepared is not None:
            model, optimizer = prepared
    return model, optimizer


def all_reduce_norm(model: nn.Module, world_size: int) -> None:
    """Average BN running stats over ranks so the evaluated/saved model is rank-independent."""
    if world_size <= 1 or not torch.distributed.is_initialized():
        return
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    torch.distributed.all_reduce(buf)
                    buf.div_(world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------- evaluation


def evaluate_model(model: nn.Module, val_set: Any, recipe: Any, precision: Precision,
                   channels_last: bool, progress: bool = False) -> dict[str, float]:
    """COCO AP of ``model`` (the EMA copy) through the shared Predictor + evaluation module."""
    from accelcore.evaluation import evaluate_predictor
    from accelcore.predictor import Predictor

    was_training = model.training
    model.eval()
    mode = model.output_mode
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(images: torch.Tensor) -> torch.Tensor:
        return model(precision.convert_input(images).contiguous(memory_format=fmt))

    try:
        model.output_mode = "raw"  # decode runs in fp32 inside the Predictor
        predictor = Predictor(forward, model, raw=True, conf_thre=recipe.validate.conf_thre,
                              nms_thre=recipe.validate.nms_thre)
        input_size = tuple(unwrap(model).input_size)
        metrics = evaluate_predictor(predictor, val_set, input_size=input_size,
                                     batch_size=recipe.validate.batch_size,
                                     max_images=recipe.validate.max_images,
                                     progress=progress)
    finally:
        model.output_mode = mode
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------- state


@dataclasses.dataclass
class TrainState:
    iteration: int = 0  # global iterations done
    epoch: int = 0  # epochs fully done (including their evaluation)
    best_ap: float = -1.0
    best_epoch: int = 0
    last_ap: float | None = None
    train_seconds: float = 0.0
    images_seen: int = 0


class Trainer:
    """One training run; ``fit`` below is the public entry point."""

    def __init__(self, job: TrainJob, rank: int = 0, world_size: int = 1,
                 write: bool = True) -> None:
        self.job = job
        self.recipe = job.recipe
        # `train.precision: auto` becomes a concrete precision + layout for this CPU, once.
        self.precision_choice = resolve_precision(job.recipe.train.precision,
                                                  job.recipe.train.channels_last)
        self.cfg = dataclasses.replace(job.recipe.train,
                                       precision=self.precision_choice.precision,
                                       channels_last=self.precision_choice.channels_last)
        self.rank, self.world_size = rank, world_size
        self.main = rank == 0
        self.write = write and self.main
        self.run_dir = Path(job.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.meter = Meter()

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        self.setup_runtime()
        self.setup_data()
        self.setup_model()
        if self.job.resume is not None:
            self.resume(Path(self.job.resume))
        elif self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.wrap_model()

    def setup_runtime(self) -> None:
        setup = RuntimeSetup.from_recipe(self.recipe)
        if self.world_size > 1:
            # With several ranks the launcher already pinned cores and sized threads per rank.
            setup = dataclasses.replace(setup, threads=None)
        setup.apply()
        self.pm = get_plugin_manager(self.recipe.plugins)
        if self.main and self.precision_choice.reason.startswith("auto"):
            print(f"accelcore: train.precision {self.precision_choice.precision}, channels_last "
                  f"{self.cfg.channels_last} ({self.precision_choice.reason})", file=sys.stderr)

    def setup_data(self, loader: Any = None) -> None:
        """Datasets and the training loader (``loader`` given: reuse it, e.g. in benchmarks)."""
        recipe, cfg = self.recipe, self.cfg
        seed_everything(cfg.seed)
        # The model's input size is needed for the mosaic canvas; building it is cheap.
        self.input_size = _input_size(self.pm, recipe)
        self.val_set = None
        if loader is None:
            train_set = build_data(self.pm, recipe, "train", self.run_dir)
            check_classes(train_set, recipe, "train")
            if self.main:
                self.val_set = build_data(self.pm, recipe, "val", self.run_dir)
                check_classes(self.val_set, recipe, "val")
            loader = build_train_loader(train_set, recipe, self.input_size, self.rank,
                                        self.world_size)
        self.loader = loader
        self.iters_per_epoch = len(self.loader)
        self.total_iters = self.iters_per_epoch * cfg.epochs
        self.stop_at = min(self.total_iters, cfg.max_iters or self.total_iters)

    def setup_model(self) -> None:
        """Model, precision, layout, optimizer, lr schedule, plugin preparation, EMA."""
        cfg = self.cfg
        seed_everything(cfg.seed)  # same initial weights on every rank and in every config
        model = build_model(self.pm, self.recipe)
        # The loss parts this model reports: logged per iteration and as epochs.csv columns.
        self.loss_keys = tuple(model.loss_keys)
        self.records = RunRecords(self.run_dir, self.loss_keys, enabled=self.write)
        self.precision = get_precision(self.pm, cfg.precision)
        model = self.precision.convert_module(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.scheduler = LRScheduler(
            cfg.scheduler, cfg.basic_lr_per_img * cfg.batch_size, self.iters_per_epoch,
            cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr_start=cfg.warmup_lr,
            no_aug_epochs=cfg.no_aug_epochs, min_lr_ratio=cfg.min_lr_ratio)
        optimizer = build_optimizer(model, cfg, self.scheduler.lr_at(0))
        model, optimizer = prepare_training(self.pm, model, optimizer, cfg)
        self.model, self.optimizer = model, optimizer
        self.ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None

    def wrap_model(self) -> None:
        """DDP (world_size > 1) and torch.compile around the model used for training steps."""
        train_model: nn.Module = self.model
        if self.world_size > 1:
            if not torch.distributed.is_initialized():
                raise PluginError("world_size > 1 but torch.distributed is not initialised; "
                                  "the strategy must call init_process_group first")
            train_model = nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
        if self.cfg.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

    # -------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        eval_model = self.ema.ema if self.ema is not None else unwrap(self.model)
        return {
            "version": CHECKPOINT_VERSION,
            # "model" holds the weights to deploy (EMA when enabled), like official YOLOX.
            "model": eval_model.state_dict(),
            "meta": _plain_meta(unwrap(self.model)),
            "train": {
                "model": unwrap(self.model).state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "precision": self.precision.state_dict(),
                "precision_name": self.precision.name,
                "state": dataclasses.asdict(self.state),
                "meter": self.meter.state_dict(),
                "rng": rng_state(),
                "iters_per_epoch": self.iters_per_epoch,
                "batch_size": self.cfg.batch_size,
            },
        }

    def save_last(self) -> None:
        if self.write:
            # Records first: a kill right after the checkpoint lands must not lose the rows up
            # to it (rows past an older checkpoint are cut back on resume).
            self.records.flush()
            atomic_save(self.checkpoint_state(), self.ckpt_dir / "last.pth")

    def save_best(self, ap: float) -> None:
        if self.write:
            eval_model = self.ema.ema if self.ema is not None else unwrap(self.model)
            atomic_save({"version": CHECKPOINT_VERSION, "model": eval_model.state_dict(),
                         "meta": _plain_meta(unwrap(self.model)), "epoch": self.state.epoch,
                         "iteration": self.state.iteration, "ap50_95": ap},
                        self.ckpt_dir / "best.pth")

    def resume(self, run_dir: Path) -> None:
        path = run_dir / "checkpoints" / "last.pth"
        ckpt = load_checkpoint(path)
        train = ckpt.get("train")
        if train is None:
            raise RecipeError(
                f"--resume {run_dir}: {path} holds weights only, not a training state")
        if train["iters_per_epoch"] != self.iters_per_epoch or \
                train["batch_size"] != self.cfg.batch_size:
            raise RecipeError(
                f"--resume {run_dir}: checkpoint was made with batch {train['batch_size']} "
                f"({train['iters_per_epoch']} it/epoch), recipe gives batch {self.cfg.batch_size} "
                f"({self.iters_per_epoch} it/epoch); resume with the same train.batch_size/data")
        if train["precision_name"] != self.precision.name:
            raise RecipeError(f"--resume {run_dir}: checkpoint precision "
                              f"{train['precision_name']} != train.precision {self.precision.name}")
        unwrap(self.model).load_state_dict(train["model"])
        if self.ema is not None and train["ema"] is not None:
            self.ema.load_state_dict(train["ema"])
        self.optimizer.load_state_dict(train["optimizer"])
        self.precision.load_state_dict(train["precision"])
        self.state = TrainState(**train["state"])
        self.meter.load_state_dict(train["meter"])
        set_rng_state(train["rng"])
        if self.main:
            clean_stale_temps(self.ckpt_dir)
            self.records.truncate(self.state.iteration, self.state.epoch)
        log.info("resumed from %s at iteration %d (epoch %d)", path, self.state.iteration,
                 self.state.epoch)

    # -------------------------------------------------------------- the loop
    def _epoch_batches(self, skip: int) -> Any:
        # Resume inside an epoch: the sampler order and per-sample seeds are pure functions of
        # (seed, epoch), so dropping the first `skip` batches reproduces the exact remainder.
        start = getattr(self.loader, "set_start_batch", None)
        if skip and start is not None:  # the loader can skip without loading (cheap)
            start(skip)
            return iter(self.loader)
        it = iter(self.loader)
        for _ in range(skip):  # fallback: load and drop the batches already trained on
            next(it)
        return it

    def _set_no_aug(self, epoch: int) -> bool:
        no_aug = epoch >= self.cfg.epochs - self.cfg.no_aug_epochs
        if no_aug:
            self.loader.close_mosaic()
            unwrap(self.model).start_no_augmentation()
        return no_aug

    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor, multiscale: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch made the network's input at the current iteration: float, resized to
        its multiscale size (targets scaled with it), in the precision's dtype and the
        configured memory format."""
        from accelcore.data.loader import network_input

        images = network_input(images, self.cfg.channels_last)
        if multiscale:
            size = self._multiscale(self.state.iteration, self.recipe.data.augment)
            images, targets = _resize_batch(images, targets, size)
        images = self.precision.convert_input(images)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def train_one_iter(self, images: torch.Tensor, targets: torch.Tensor,
                       multiscale: bool = True) -> dict[str, float]:
        """One optimisation step at the current iteration (lr, multiscale size from it)."""
        images, targets = self.prepare_batch(images, targets, multiscale)
        set_lr(self.optimizer, self.scheduler.lr_at(self.state.iteration))
        with self.precision.forward_context():
            losses = self.train_model(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(losses["total_loss"])
        self.precision.optimizer_step(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.model)
        out = {k: float(v.detach()) for k, v in losses.items() if k in self.loss_keys}
        out["size"] = int(images.shape[-2])
        return out

    def _multiscale(self, iteration: int, aug: Any) -> tuple[int, int]:
        from accelcore.data.multiscale import multiscale_size

        return multiscale_size(iteration, self.input_size, aug.multiscale_range,
                               aug.multiscale_interval, seed=self.cfg.seed)

    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        wall0 = time.perf_counter()
        show = self.main and not cfg.quiet
        start_epoch = st.iteration // self.iters_per_epoch
        final_metrics: dict[str, float] | None = None
        for epoch in range(start_epoch, cfg.epochs):
            if st.iteration >= self.stop_at:
                break
            no_aug = self._set_no_aug(epoch)
            self.loader.set_epoch(epoch)
            first = st.iteration - epoch * self.iters_per_epoch
            if first == 0:
                self.meter = Meter()
            last = min(self.iters_per_epoch, self.stop_at - epoch * self.iters_per_epoch)
            batches = self._epoch_batches(first)
            bar = _bar(show, epoch, cfg.epochs, first, self.iters_per_epoch)
            t_prev = time.perf_counter()
            for i in range(first, last):
                images, targets = next(batches)
                t_data = time.perf_counter()
                lr = self.scheduler.lr_at(st.iteration)
                values = self.train_one_iter(images, targets)
                t_end = time.perf_counter()
                n = images.shape[0] * self.world_size
                step_s = t_end - t_prev
                st.iteration += 1
                st.images_seen += n
                st.train_seconds += step_s
                if not math.isfinite(values["total_loss"]):
                    raise FloatingPointError(
                        f"loss is {values['total_loss']} at iteration {st.iteration}; lower the "
                        f"lr (train.basic_lr_per_img) or use train.precision: 32")
                size = values.pop("size")
                self.meter.update(values, n, step_s)
                ips = n / step_s
                self.records.log_iter({"iter": st.iteration, "epoch": epoch + 1, "lr": lr,
                                       **values, "size": size, "img_per_s": ips,
                                       "data_s": t_data - t_prev, "step_s": step_s})
                if bar is not None:
                    bar.update(1)
                    if (i + 1) % max(1, cfg.print_interval) == 0 or i == first:
                        eta = (self.stop_at - st.iteration) * st.train_seconds / st.iteration
                        parts = " ".join(f"{_short(k)} {values[k]:.2f}"
                                         for k in self.loss_keys if k in values)
                        bar.set_postfix_str(f"{parts} lr {lr:.2e} {ips:.1f} img/s size {size} "
                                            f"ETA {_hms(eta)}", refresh=False)
                interval = cfg.checkpoint_interval
                if interval and st.iteration % interval == 0 and i + 1 < self.iters_per_epoch:
                    self.save_last()
                t_prev = time.perf_counter()
            if bar is not None:
                bar.close()
            epoch_done = last == self.iters_per_epoch
            stopping = st.iteration >= self.stop_at
            if not epoch_done and not stopping:
                break
            ap = None
            interval = 1 if no_aug else max(1, cfg.eval_interval)
            if (epoch + 1) % interval == 0 or stopping:
                all_reduce_norm(self.model, self.world_size)
                if self.ema is not None:  # evaluation and best.pth use the EMA weights
                    all_reduce_norm(self.ema.ema, self.world_size)
                final_metrics = self.evaluate()
                ap = final_metrics.get("ap50_95")
            if epoch_done:
                st.epoch = epoch + 1
            self.finish_epoch(epoch, no_aug, ap, final_metrics)
            if stopping:
                break
        if final_metrics is None:  # resumed an already finished run: evaluate once more
            final_metrics = self.evaluate()
            if final_metrics.get("ap50_95") is not None:
                self._update_best(final_metrics["ap50_95"])
        self.records.close()
        return self.summary(final_metrics, time.perf_counter() - wall0)

    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.main:
            model = self.ema.ema if self.ema is not None else unwrap(self.model)
            metrics = evaluate_model(model, self.val_set, self.recipe, self.precision,
                                     self.cfg.channels_last, progress=not self.cfg.quiet)
        _barrier(self.world_size)
        return metrics

    def _update_best(self, ap: float) -> None:
        self.state.last_ap = ap
        if ap > self.state.best_ap:
            self.state.best_ap, self.state.best_epoch = ap, self.state.epoch
            self.save_best(ap)

    def finish_epoch(self, epoch: int, no_aug: bool, ap: float | None,
                     metrics: dict[str, float] | None) -> None:
        if ap is not None:
            self._update_best(ap)
        means = self.meter.means()
        row = {"epoch": epoch + 1, "iterations": self.state.iteration,
               "lr": self.scheduler.lr_at(max(self.state.iteration - 1, 0)), **means,
               "img_per_s": self.meter.img_per_s(), "train_s": self.meter.seconds,
               "ap50_95": ap, "ap50": (metrics or {}).get("ap50") if ap is not None else None,
               "no_aug": int(no_aug)}
        self.records.log_epoch(row)
        self.save_last()
        _barrier(self.world_size)
        if self.main and self.cfg.quiet:
            return
        if self.main:
            ap_txt = f", AP50:95 {ap:.2f}" if ap is not None else ""
            print(f"epoch {epoch + 1}/{self.cfg.epochs}: loss {means.get('total_loss', 0):.3f}, "
                  f"{self.meter.img_per_s():.1f} img/s{ap_txt}", file=sys.stderr)

    def summary(self, metrics: dict[str, float], wall_s: float) -> dict[str, Any]:
        st = self.state
        best = self.ckpt_dir / "best.pth"
        out = {
            "best_checkpoint": str(best) if best.is_file() else None,
            "last_checkpoint": str(self.ckpt_dir / "last.pth"),
            "best_ap50_95": st.best_ap if st.best_ap >= 0 else None,
            "final_ap50_95": metrics.get("ap50_95"),
            "final_ap50": metrics.get("ap50"),
            "epochs": st.iteration / self.iters_per_epoch,
            "iterations": st.iteration,
            "img_per_s": st.images_seen / st.train_seconds if st.train_seconds > 0 else 0.0,
            "wall_s": wall_s,
            "precision": self.cfg.precision,
            "precision_reason": self.precision_choice.reason,
            "channels_last": self.cfg.channels_last,
            "compile": self.cfg.compile,
            "runtime": describe_runtime(),
            "batch_size": self.cfg.batch_size,
            "world_size": self.world_size,
        }
        if self.main:
            self.records.write_summary(out, self.run_dir / "train_summary.json")
            best_txt = f"{out['best_ap50_95']:.2f}" if out["best_ap50_95"] is not None else "n/a"
            final = out["final_ap50_95"]
            print(f"accelcore: trained {st.iteration} iterations ({out['epochs']:.2f} epochs) "
                  f"at {out['img_per_s']:.1f} img/s in {wall_s:.0f} s; AP50:95 final "
                  f"{final if final is None else f'{final:.2f}'}, best {best_txt}; "
                  f"checkpoints in {self.ckpt_dir}")
        return out


def _input_size(pm: PluginManager, recipe: Any) -> tuple[int, int]:
    if recipe.model.input_size is not None:
        return int(recipe.model.input_size[0]), int(recipe.model.input_size[1])
    # The model's own default size (the model plugin decides it).
    model = build_model(pm, recipe)
    return int(model.input_size[0]), int(model.input_size[1])


def _plain_meta(model: nn.Module) -> dict[str, Any]:
    meta = model.meta
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, (str, int, float, bool, list)) or v is None:
            out[k] = v
    return out


def _resize_batch(images: torch.Tensor, targets: torch.Tensor,
                  size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from accelcore.data.multiscale import resize_batch

    return resize_batch(images, targets, size)


def _bar(show: bool, epoch: int, epochs: int, first: int, total: int) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{epochs}", unit="it",
                leave=True, dynamic_ncols=True, file=sys.stderr)


def _short(loss_key: str) -> str:
    """Progress-bar label of a loss part: "total_loss" -> "loss", "iou_loss" -> "iou"."""
    return "loss" if loss_key == "total_loss" else loss_key.removesuffix("_loss")


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit(job: TrainJob, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train ``job.recipe`` into ``job.run_dir`` (resuming from ``job.resume`` if set).

    Strategies call this once per process; returns the summary dict (same on every rank,
    files written by rank 0 only).
    """
    trainer = Trainer(job, rank, world_size)
    trainer.setup()
    return trainer.run()
