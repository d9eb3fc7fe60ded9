"""COCO-format detection data: datasets, torchvision-free transforms, padded batches, converters and the bundled
DeepForest tree-crown dataset. Needs Pillow (and numpy, torch); never imports torchvision.

Pipeline: `CocoDetection(image_dir, json, transforms=train_transforms(backbone.normalization))` yields
(image [3,H,W], target with normalised cxcywh boxes); a DataLoader with `collate_fn=collate` yields
(images [B,3,Hmax,Wmax], mask [B,Hmax,Wmax] True on padding, [targets]).
"""
from .bundled import bundled_dataset_dir, default_cache_dir
from .coco import CocoDetection, find_coco_splits, load_image
from .collate import collate, pad_images
from .convert import voc_to_coco, yolo_to_coco
from .transforms import (Compose, Normalize, RandomHorizontalFlip, RandomResize, RandomSelect, RandomSizeCrop,
                         eval_transforms, train_transforms)

__all__ = ["CocoDetection", "find_coco_splits", "load_image", "Compose", "Normalize", "RandomHorizontalFlip",
           "RandomResize", "RandomSelect", "RandomSizeCrop", "train_transforms", "eval_transforms", "collate",
           "pad_images", "voc_to_coco", "yolo_to_coco", "bundled_dataset_dir", "default_cache_dir"]
