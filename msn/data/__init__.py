"""Data pipeline: multi-view MSN transforms, datasets and the Lightning data module."""

from msn.data.datamodule import MSNDataModule
from msn.data.datasets import DATASETS, build_dataset, has_labels, num_classes
from msn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiViewTransform, eval_transform

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MSNDataModule",
    "MultiViewTransform",
    "build_dataset",
    "eval_transform",
    "has_labels",
    "num_classes",
]
