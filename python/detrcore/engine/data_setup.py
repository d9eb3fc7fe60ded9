"""From a TrainConfig to datasets and loaders: the bundled data or a COCO-format folder, the backbone's
normalisation, DETR's augmentations, padded batches, and distributed sampling."""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import distributed as dist
from .config import TrainConfig

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE0 = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def backbone_normalization(backbone: str):
    """The (mean, std) the backbone's pretrained weights expect."""
    return LITE0 if backbone.startswith("efficientnet") else IMAGENET


def resolve_splits(data: str | None, log=print) -> dict:
    """{"train": (image_dir, json), "val": ...} for a dataset path, or the bundled DeepForest tiles."""
    from detrcore.data import bundled_dataset_dir, find_coco_splits

    root = data if data is not None else bundled_dataset_dir(log=log if dist.is_main() else None)
    splits = find_coco_splits(root)
    if "train" not in splits:
        raise FileNotFoundError(f"{root}: no training split found (looked for train/_annotations.coco.json or "
                                "annotations/instances_train*.json)")
    if "val" not in splits:
        fallback = "test" if "test" in splits else "train"
        warnings.warn(f"{root}: no validation split; evaluating on the {fallback} split", stacklevel=2)
        splits["val"] = splits[fallback]
    return splits


def build_datasets(cfg: TrainConfig, log=print):
    """(train dataset, validation dataset, info) with info: num_classes, class_names, label_to_category_id and
    val_json (the cleaned ground truth the evaluator scores against)."""
    from detrcore.data import CocoDetection, eval_transforms, train_transforms

    splits = resolve_splits(cfg.data, log)
    norm = backbone_normalization(cfg.model.backbone)
    train = CocoDetection(*splits["train"], transforms=train_transforms(norm, cfg.train_sizes, cfg.max_size, cfg.crop))
    val = CocoDetection(*splits["val"], transforms=eval_transforms(norm, cfg.eval_size, cfg.max_size))
    if train.label_to_category_id != val.label_to_category_id:
        raise ValueError(f"the training and validation splits have different categories: "
                         f"{train.categories} vs {val.categories}")
    info = {"num_classes": train.num_classes, "class_names": train.class_names,
            "label_to_category_id": train.label_to_category_id, "val_json": val.coco_gt}
    return train, val, info


def make_loader(dataset, cfg: TrainConfig, train: bool) -> DataLoader:
    from detrcore.data import collate

    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    if dist.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.seed)
    else:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=cfg.num_workers, generator=generator, persistent_workers=False)
