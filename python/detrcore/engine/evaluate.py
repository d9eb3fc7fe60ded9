"""COCO box evaluation of post-processed detections, with a per-class table, a text table and atomic JSON output.

Contract:
    - Predictions come from `PostProcess`: per image `scores` [K], `labels` [K] (contiguous class indices) and
      `boxes` [K, 4] xyxy in pixels. `label_to_category_id` maps a label back to the annotation file's category id.
    - The images evaluated are the ones passed to `update` (with or without detections). If `update` was never
      called, every image of the ground truth is evaluated (so "no detections at all" gives AP 0, not an error).
    - A metric pycocotools reports as -1 (nothing to measure: no ground truth in that area range or category) is
      returned as None. A metric with ground truth but no matching detection is 0.0.
pycocotools is imported lazily: importing this module needs only numpy and torch.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from detrcore._io import atomic_path as _atomic_path

# Names of COCOeval.stats, in order (area ranges: small < 32^2 <= medium < 96^2 <= large pixels).
STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)


def _import_pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "detrcore.engine.evaluate needs pycocotools for COCO evaluation: `pip install pycocotools`"
        ) from e
    return COCO, COCOeval


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallows pycocotools' progress prints unless `verbose`."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.int64)
        return x.numpy().astype(dtype, copy=False)
    return np.asarray(x, dtype=dtype)


def _is_ann_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _none_if_missing(v: float) -> float | None:
    return None if v < 0 else float(v)


class CocoEvaluator:
    """Accumulates detections over a data set and scores them with pycocotools' COCOeval (iouType "bbox").

    Args:
        coco_gt_json: a COCO annotation file (path) or its already-loaded dict (deep-copied, never modified).
            Annotations missing `area`, `iscrowd` or `id` get w*h, 0 and a fresh id.
        label_to_category_id: contiguous label -> category id of the file, as a dict or as a list indexed by label.
            Detections whose category id is not among the file's categories cannot be scored and are dropped.
        verbose: let pycocotools print its progress and its summary table.

    Usage: `update(...)` per batch, `gather()` under DDP (every rank, collective), then `summarize()`.
    """

    def __init__(self, coco_gt_json: str | os.PathLike | dict,
                 label_to_category_id: Mapping[int, int] | Sequence[int], verbose: bool = False):
        COCO, _ = _import_pycocotools()
        if isinstance(coco_gt_json, (str, os.PathLike)):
            with open(coco_gt_json) as f:
                dataset = json.load(f)
        elif isinstance(coco_gt_json, dict):
            dataset = copy.deepcopy(coco_gt_json)
        else:
            raise TypeError(f"coco_gt_json must be a path or a dict, got {type(coco_gt_json).__name__}")
        if not dataset.get("images"):
            raise ValueError("coco_gt_json has no images")
        if "categories" not in dataset:
            raise ValueError("coco_gt_json has no categories")
        dataset.setdefault("annotations", [])
        # pycocotools matches by annotation id and takes 0 for "unmatched": an id of 0, a repeated id or a missing
        # one would score a perfect prediction wrongly (AP50 0.25 in a test). Ids are only used for matching, so
        # such annotations are renumbered past the largest valid id.
        valid = [a["id"] for a in dataset["annotations"] if _is_ann_id(a.get("id"))]
        next_id, seen = 1 + max(valid, default=0), set()
        for a in dataset["annotations"]:
            a.setdefault("iscrowd", 0)
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
            if not _is_ann_id(a.get("id")) or a["id"] in seen:
                a["id"], next_id = next_id, next_id + 1
            seen.add(a["id"])
        self.coco_gt = COCO()
        self.coco_gt.dataset = dataset
        with _quiet(verbose):
            self.coco_gt.createIndex()

        if isinstance(label_to_category_id, Mapping):
            mapping = {int(k): int(v) for k, v in label_to_category_id.items()}
        else:
            mapping = {i: int(v) for i, v in enumerate(label_to_category_id)}
        self.label_to_category_id = mapping
        self.verbose = verbose
        self._image_ids = set(self.coco_gt.getImgIds())
        self._category_ids = set(self.coco_gt.getCatIds())
        self.reset()

    def reset(self) -> None:
        """Forgets every detection (to evaluate another epoch with the same ground truth)."""
        # image_id -> [K, 6] float64 rows (x, y, w, h, score, category_id), COCO xywh boxes in pixels.
        self._dets: dict[int, np.ndarray] = {}

    def update(self, predictions: Mapping) -> None:
        """Adds detections: {image_id: {"scores" [K], "labels" [K], "boxes" [K, 4] xyxy pixels}}.

        Tensors may live on any device. An image id seen before replaces its earlier detections (so the padding
        repeats of a DistributedSampler are not counted twice). An image with K = 0 is evaluated with no detections.
        """
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id not in self._image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            boxes = _as_numpy(pred["boxes"], np.float64).reshape(-1, 4)  # [K, 4] xyxy
            scores = _as_numpy(pred["scores"], np.float64).reshape(-1)  # [K]
            labels = _as_numpy(pred["labels"], np.int64).reshape(-1)  # [K]
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"image {image_id}: boxes {len(boxes)}, scores {len(scores)} and labels "
                                 f"{len(labels)} must have the same length")
            unknown = sorted({int(l) for l in labels} - self.label_to_category_id.keys())
            if unknown:
                raise ValueError(f"labels {unknown} have no entry in label_to_category_id")
            cats = np.array([self.label_to_category_id[int(l)] for l in labels], dtype=np.float64)  # [K]
            keep = np.isin(cats, list(self._category_ids))
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # [K, 4]
            self._dets[image_id] = np.concatenate([xywh, scores[:, None], cats[:, None]], axis=1)[keep]  # [K', 6]

    def gather(self) -> None:
        """Under torch.distributed, collects every rank's detections (all_gather_object); a no-op otherwise.

        Collective: call it on every rank. Afterwards every rank, rank 0 included, holds all detections, so
        `summarize()` can run on rank 0 alone. With NCCL, the rank's CUDA device must be set beforehand.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self._dets)
        merged: dict[int, np.ndarray] = {}
        for part in parts:  # same image on two ranks (sampler padding): same detections, keep one
            merged.update(part)
        self._dets = merged

    def _coco_dt(self):
        """The detections as a pycocotools COCO object, built directly (COCO.loadRes crashes on an empty list)."""
        COCO, _ = _import_pycocotools()
        anns = []
        for image_id, rows in self._dets.items():
            for x, y, w, h, score, cat in rows.tolist():
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat),
                             "bbox": [x, y, w, h], "area": w * h, "score": score, "iscrowd": 0})
        coco_dt = COCO()
        coco_dt.dataset = {"images": self.coco_gt.dataset["images"],
                           "categories": self.coco_gt.dataset["categories"], "annotations": anns}
        with _quiet(self.verbose):
            coco_dt.createIndex()
        return coco_dt

    def summarize(self) -> dict:
        """Runs COCOeval and returns the numbers.

        Returns a dict with the 12 COCO stats (`STAT_NAMES`: AP, AP50, ..., AR_large; float or None),
        `per_class`: [{category_id, name, AP, AP50}] in category id order (area "all", maxDets 100; None when the
        category has no ground truth in the evaluated images), `num_images` and `num_detections`.
        """
        _, COCOeval = _import_pycocotools()
        coco_dt = self._coco_dt()
        with _quiet(self.verbose):
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            if self._dets:
                ev.params.imgIds = sorted(self._dets)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary: dict = {name: _none_if_missing(v) for name, v in zip(STAT_NAMES, ev.stats)}

        p = ev.params
        precision = ev.eval["precision"]  # [T iou thresholds, R recall thresholds, K categories, A areas, M maxDets]
        a, m = p.areaRngLbl.index("all"), p.maxDets.index(100)
        t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.coco_gt.dataset["categories"]}
        per_class = []
        for k, cat_id in enumerate(p.catIds):
            pk = precision[:, :, k, a, m]  # [T, R]
            p50 = pk[t50]  # [R]
            per_class.append({
                "category_id": int(cat_id), "name": names[cat_id],
                "AP": float(pk[pk > -1].mean()) if (pk > -1).any() else None,
                "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else None,
            })
        summary["per_class"] = per_class
        summary["num_images"] = len(p.imgIds)
        summary["num_detections"] = int(sum(len(r) for r in self._dets.values()))
        return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(summary: dict) -> str:
    """A readable text table: the overall COCO metrics (in %) and then AP / AP50 per class ("-": no ground truth)."""
    lines = ["COCO bbox metrics (%)"]
    if "num_images" in summary:
        lines[0] += f": {summary['num_images']} images, {summary.get('num_detections', 0)} detections"
    names = [n for n in STAT_NAMES if n in summary]
    w = max(len(n) for n in STAT_NAMES)
    for row in (names[:6], names[6:]):
        if row:
            lines.append("  ".join(f"{n:>{w}}" for n in row))
            lines.append("  ".join(f"{_fmt(summary[n]):>{w}}" for n in row))
    per_class = summary.get("per_class") or []
    if per_class:
        nw = max(8, *(len(str(c["name"])) for c in per_class))
        lines.append("")
        lines.append(f"{'id':>6}  {'category':<{nw}}  {'AP':>6}  {'AP50':>6}")
        for c in per_class:
            lines.append(f"{c['category_id']:>6}  {str(c['name']):<{nw}}  {_fmt(c['AP']):>6}  {_fmt(c['AP50']):>6}")
    return "\n".join(lines)


def save_json(summary: dict, path: str | os.PathLike) -> None:
    """Writes `summary` as JSON atomically (temporary file beside `path`, then os.replace); None becomes null."""
    with _atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
