"""Datasets for the dense tasks: COCO detection / instance segmentation files (`coco:PATH`) and semantic
segmentation folders (`seg:PATH`), their collates and loaders, and the Fashion-MNIST scenes that write both.

The modules import torchvision and pycocotools only when used, so `import cvt` stays light."""

from __future__ import annotations

from .coco import CocoDetection, collate_detection, detection_transforms
from .loaders import build_loaders
from .segfolder import SegFolder, collate_segmentation, segmentation_transforms

__all__ = [
    "CocoDetection", "SegFolder", "build_loaders", "collate_detection", "collate_segmentation",
    "detection_transforms", "segmentation_transforms",
]
