"""Datasets, YOLOX augmentations, loaders and the synthetic shapes generator."""

from accelcore.data.augment import (
    TrainTransform,
    augment_hsv,
    mixup,
    random_affine,
    random_flip,
)
from accelcore.data.coco import COCODataset, load_coco_json
from accelcore.data.loader import (
    EpochBatchSampler,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
)
from accelcore.data.mosaic import AUGMENT_KEYS, MosaicDetection
from accelcore.data.multiscale import multiscale_size, resize_batch
from accelcore.data.preprocess import letterbox, preprocess_batch
from accelcore.data.synthetic import ensure_synthetic, synthesize

__all__ = [
    "AUGMENT_KEYS",
    "COCODataset",
    "EpochBatchSampler",
    "MosaicDetection",
    "TrainLoader",
    "TrainTransform",
    "augment_hsv",
    "build_eval_loader",
    "build_train_loader",
    "ensure_synthetic",
    "letterbox",
    "load_coco_json",
    "mixup",
    "multiscale_size",
    "preprocess_batch",
    "random_affine",
    "random_flip",
    "resize_batch",
    "synthesize",
]
