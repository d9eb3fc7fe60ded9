"""COCO-format detection data: a folder of images plus a COCO "instances" JSON.

Contract of `CocoDetection[i]` (before any transform):
    image:  float32 Tensor[3, H, W], RGB in [0, 1] (decoded with Pillow, no EXIF rotation: COCO boxes refer to the
            stored pixels)
    target: {"boxes":     float32 Tensor[N, 4], xyxy in absolute pixels, clipped to the image, w > 0 and h > 0,
             "labels":    int64 Tensor[N], contiguous labels 0..C-1 (categories sorted by their id in the file),
             "image_id":  int, the image's id in the JSON (what the evaluator needs),
             "orig_size": int64 Tensor[2], (h, w) of the stored image,
             "size":      int64 Tensor[2], (h, w) of the image as returned (transforms update it)}
Transforms are callables `(image, target) -> (image, target)` (see transforms.py); after `Normalize` the boxes are
normalised cxcywh in [0, 1].

Data problems and `on_error`:
    annotation problems (unknown category id, degenerate box after clipping, malformed bbox (anything but 4 finite
    JSON numbers), iscrowd other than 0/1, an id repeated among the kept annotations, annotation of an unknown
    image) and missing image files are found at construction. "raise": the first one raises (ValueError /
    FileNotFoundError) naming the JSON or image file; "skip": the annotation (or image) is dropped and ONE warning
    summarises the counts per problem, with an example of each.
    A JSON that cannot be read (not UTF-8/16/32, invalid, nested too deeply) or whose categories or image entries
    are malformed raises ValueError naming it, whatever `on_error` says.
    Corrupt image files are found lazily (decoding every image up front is slow): `__getitem__` raises a
    ValueError naming the file, whatever `on_error` says; so does an image whose header gives another size than
    the JSON (checked before decoding); `verify_images=True` checks every header up front.
    `iscrowd=1` annotations are left out of the targets (not a problem; `coco_gt` keeps them for COCOeval); images
    without annotations are kept (valid background samples). Annotation ids that are not integers in
    [1, 2**63) are dropped (the evaluator numbers such annotations); junk `area` values fall back to the box's.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["CocoDetection", "find_coco_splits", "load_image"]

Transform = Callable[[Tensor, dict], "tuple[Tensor, dict]"]


def load_image(path: str | os.PathLike) -> Tensor:
    """Decodes an image file with Pillow into float32 Tensor[3, H, W] in [0, 1] (RGB); FileNotFoundError for a
    missing file, ValueError naming the file for one that Pillow cannot decode."""
    return _load_image(path)[0]


def _load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> tuple[Tensor | None, tuple[int, int]]:
    """(image as in `load_image`, (width, height) from the file's header). With `size` given and a header that says
    otherwise, nothing is decoded and the image is None: a damaged header can claim a gigapixel image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if size is not None and img.size != tuple(size):
                return None, img.size
            arr = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — a damaged file makes Pillow's decoders raise OSError, SyntaxError,
        # DecompressionBombError, TypeError, struct.error, ...: all of them mean "cannot decode"
        raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), (arr.shape[1], arr.shape[0])


class CocoDetection(torch.utils.data.Dataset):
    """An image folder + a COCO instances JSON (see the module docstring for the sample contract).

    Args:
        image_dir: folder the JSON's `file_name`s are relative to.
        json_path: the COCO instances JSON.
        transforms: optional `(image, target) -> (image, target)`; its `normalization` (mean, std), if any, is
            exposed as `self.normalization` (None otherwise).
        on_error: "skip" (drop bad annotations / images with one summarising warning) or "raise".
        verify_images: open every image header at construction (catches corrupt files early; costs one file open
            per image).

    Attributes:
        categories: [{"id", "name"}] sorted by id; label k <-> categories[k].
        label_to_category_id: list, label -> category id in the file.
        category_id_to_label: dict, category id -> label.
        class_names: list, label -> name.   num_classes: C (object classes only, no "no-object" class).
        coco_json_path: the JSON path.      image_ids: image ids in dataset order.
        coco_gt: the cleaned ground truth as a COCO dict (what training sees; hand it to the evaluator when
            `on_error="skip"` dropped something).
        problems: Counter of the problems found (empty when the data is clean).
        num_crowd_skipped: iscrowd=1 annotations left out of the targets.
    """

    def __init__(self, image_dir: str | os.PathLike, json_path: str | os.PathLike,
                 transforms: Transform | None = None, on_error: str = "skip", verify_images: bool = False):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.image_dir = Path(image_dir)
        self.coco_json_path = Path(json_path)
        self.transforms = transforms
        self.on_error = on_error
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (for {self.coco_json_path})")
        data = _read_json(self.coco_json_path)

        cats = data.get("categories")
        if not isinstance(cats, list) or not cats:
            raise ValueError(f"{self.coco_json_path}: no 'categories' list (a COCO instances file needs one)")
        parsed = []
        for c in cats:
            cid = _as_id(c.get("id")) if isinstance(c, dict) else None
            if cid is None:
                raise ValueError(f"{self.coco_json_path}: malformed category entry {_brief(c)} (needs an integer "
                                 f"'id')")
            parsed.append({"id": cid, "name": str(c.get("name", cid))})
        cats = sorted(parsed, key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            dups = sorted(k for k, n in Counter(ids).items() if n > 1)
            raise ValueError(f"{self.coco_json_path}: duplicate category ids {dups}")
        self.categories = cats
        self.label_to_category_id = ids
        self.category_id_to_label = {cid: label for label, cid in enumerate(ids)}
        self.class_names = [c["name"] for c in cats]
        self.num_classes = len(cats)

        self.problems: Counter = Counter()
        self._examples: dict[str, str] = {}
        images = self._index_images(data.get("images"), verify_images)
        anns = data.get("annotations")
        if anns is None:
            anns = []
        if not isinstance(anns, list):
            raise ValueError(f"{self.coco_json_path}: 'annotations' must be a list, got {type(anns).__name__}")
        per_image = self._index_annotations(anns, images)
        self._images = list(images.values())  # dicts: id, file_name, width, height, path
        empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                 "area": np.zeros(0, np.float64), "ann_id": np.zeros(0, np.int64)}
        self._targets = [per_image.get(im["id"], empty) for im in self._images]
        self.image_ids = [im["id"] for im in self._images]
        self.num_crowd_skipped = len(self._crowd_gt)
        self._info = {k: data[k] for k in ("info", "licenses") if k in data}
        if self.problems:
            warnings.warn(self._summary(), stacklevel=2)

    # ---- construction helpers ----
    def _problem(self, kind: str, message: str, exc: type = ValueError) -> None:
        """Records one data problem: raises it (on_error="raise") or counts it for the summary warning."""
        if self.on_error == "raise":
            raise exc(f"{message} (pass on_error='skip' to drop such entries with a warning)")
        self.problems[kind] += 1
        self._examples.setdefault(kind, message)

    def _summary(self) -> str:
        lines = [f"{self.coco_json_path}: skipped {sum(self.problems.values())} problem entr"
                 f"{'y' if sum(self.problems.values()) == 1 else 'ies'} (on_error='skip'):"]
        for kind, n in sorted(self.problems.items()):
            lines.append(f"  {n} x {kind}, e.g. {self._examples[kind]}")
        return "\n".join(lines)

    def _index_images(self, entries, verify: bool) -> dict[int, dict]:
        if not isinstance(entries, list):
            raise ValueError(f"{self.coco_json_path}: no 'images' list")
        images: dict[int, dict] = {}
        self._skipped_images: set[int] = set()
        for entry in entries:
            try:
                image_id, file_name = _as_id(entry["id"]), entry["file_name"]
                if image_id is None or not isinstance(file_name, str) or not file_name:
                    raise ValueError("needs an integer 'id' and a 'file_name' string")
                width, height = _as_size(entry.get("width")), _as_size(entry.get("height"))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{self.coco_json_path}: malformed image entry {_brief(entry)} ({e})") from e
            if image_id in images:
                raise ValueError(f"{self.coco_json_path}: duplicate image id {image_id}")
            path = self.image_dir / file_name
            try:
                found, why = path.is_file(), ""
            except OSError as e:  # a file_name the file system refuses (ENAMETOOLONG, ...)
                found, why = False, f"{e.strerror}; "
            if not found:
                self._problem("missing image file", f"image file not found: {_cut(str(path), 160)} ({why}image id "
                              f"{image_id} in {self.coco_json_path})", FileNotFoundError)
                self._skipped_images.add(image_id)
                continue
            if verify or not width or not height:
                size = _image_size(path)
                if size is None:
                    self._problem("unreadable image file", f"cannot read image file {path} (image id {image_id} "
                                  f"in {self.coco_json_path})")
                    self._skipped_images.add(image_id)
                    continue
                if width and height and (width, height) != size:
                    self._problem("image size differs from the JSON",
                                  f"{path} is {size[0]}x{size[1]} but {self.coco_json_path} says "
                                  f"{width}x{height}")
                    self._skipped_images.add(image_id)
                    continue
                width, height = size
            images[image_id] = {"id": image_id, "file_name": file_name, "width": int(width),
                                "height": int(height), "path": path}
        return images

    def _index_annotations(self, anns, images: dict[int, dict]) -> dict[int, dict[str, np.ndarray]]:
        """image id -> {"boxes" xyxy, "labels", "area", "ann_id"} arrays; applies the checks of the docstring and
        sets aside iscrowd=1 annotations (self._crowd_gt)."""
        out: dict[int, list] = {}
        self._crowd_gt: list[dict] = []
        kept_ids: set[int] = set()
        for k, a in enumerate(anns):
            name = _brief(a["id"]) if isinstance(a, dict) and "id" in a else f"#{k}"
            where = f"annotation {name} in {self.coco_json_path}"
            if not isinstance(a, dict):
                self._problem("malformed annotation", f"{where} is not an object")
                continue
            image = images.get(_as_id(a.get("image_id")))
            if image is None and _as_id(a.get("image_id")) in self._skipped_images:
                continue  # its image was skipped (and counted) already
            if image is None:
                self._problem("annotation of an unknown or skipped image",
                              f"{where} refers to image id {_brief(a.get('image_id'))}, not among the usable images")
                continue
            label = self.category_id_to_label.get(_as_id(a.get("category_id")))
            if label is None:
                self._problem("unknown category id", f"{where} (image {image['path']}) has category_id "
                              f"{_brief(a.get('category_id'))}, not among {_brief(self.label_to_category_id)}")
                continue
            bbox = a.get("bbox")
            xywh = [_as_float(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else []
            if len(xywh) != 4 or not all(v is not None and math.isfinite(v) for v in xywh):
                self._problem("malformed bbox", f"{where} (image {image['path']}) has bbox {_brief(bbox)} (needs "
                              f"[x, y, w, h], 4 finite numbers)")
                continue
            x, y, w, h = xywh
            W, H = image["width"], image["height"]
            # clipped to the image and rounded to float32 as stored, so "w > 0 and h > 0" holds for what is stored
            x0, y0, x1, y1 = (float(np.float32(min(max(v, 0.0), hi))) for v, hi in ((x, W), (y, H), (x + w, W),
                                                                                    (y + h, H)))
            if x1 <= x0 or y1 <= y0:
                self._problem("degenerate box", f"{where} (image {image['path']}, {W}x{H}) has bbox xywh "
                              f"{_brief(bbox)}: zero width or height after clipping")
                continue
            crowd = a.get("iscrowd", 0)
            if crowd is None or isinstance(crowd, bool):
                crowd = int(bool(crowd))
            if not isinstance(crowd, (int, float)) or crowd not in (0, 1):
                self._problem("malformed annotation", f"{where} (image {image['path']}) has iscrowd "
                              f"{_brief(crowd)} (needs 0 or 1)")
                continue
            ann_id = _as_id(a.get("id"))
            if ann_id is not None and not 0 < ann_id < 2**63:
                ann_id = None  # the evaluator numbers it (pycocotools takes an id of 0 for "no match": wrong scores)
            if ann_id is not None and ann_id in kept_ids:
                self._problem("duplicate annotation id", f"{where} (image {image['path']}) has the id of an "
                              f"earlier annotation (the evaluator would score one box twice and the other never)")
                continue
            if ann_id is not None:
                kept_ids.add(ann_id)
            area = _as_float(a.get("area"))
            if area is None or not 0 < area < math.inf:
                area = (x1 - x0) * (y1 - y0)  # absent or unusable: the clipped box's
            if crowd:  # not a training target, but the evaluator needs it (matches are ignored)
                self._crowd_gt.append({"id": ann_id, "image_id": image["id"],
                                       "category_id": self.label_to_category_id[label],
                                       "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 1})
                continue
            rows = out.setdefault(image["id"], [])
            rows.append((x0, y0, x1, y1, label, area, -1 if ann_id is None else ann_id))
        # one set of numpy arrays per image (few Python objects: cheap to share with forked DataLoader workers)
        return {image_id: {"boxes": np.asarray([r[:4] for r in rows], dtype=np.float32).reshape(-1, 4),  # [N, 4]
                           "labels": np.asarray([r[4] for r in rows], dtype=np.int64),  # [N]
                           "area": np.asarray([r[5] for r in rows], dtype=np.float64),  # [N]
                           "ann_id": np.asarray([r[6] for r in rows], dtype=np.int64)}  # [N], -1: none in the file
                for image_id, rows in out.items()}

    # ---- public API ----
    @property
    def normalization(self):
        """(mean, std) of the Normalize inside `transforms`, or None."""
        return getattr(self.transforms, "normalization", None)

    @property
    def coco_gt(self) -> dict:
        """The usable images and annotations as a COCO dict (boxes clipped; skipped entries left out; iscrowd=1
        annotations included, as COCOeval uses them). Built on each call."""
        images = [{k: v for k, v in im.items() if k != "path"} for im in self._images]
        anns = []
        for im, t in zip(self._images, self._targets):
            for (x0, y0, x1, y1), label, area, ann_id in zip(t["boxes"].tolist(), t["labels"].tolist(),
                                                             t["area"].tolist(), t["ann_id"].tolist()):
                a = {"image_id": im["id"], "category_id": self.label_to_category_id[label],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0}
                anns.append({"id": ann_id, **a} if ann_id > 0 else a)
        anns += [{k: v for k, v in a.items() if v is not None} for a in self._crowd_gt]
        return {**self._info, "images": images, "annotations": anns,
                "categories": [dict(c) for c in self.categories]}

    def image_info(self, index: int) -> dict:
        """{"id", "file_name", "width", "height", "path"} of sample `index`."""
        return dict(self._images[index])

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int):
        info = self._images[index]
        image, (w, h) = _load_image(info["path"], size=(info["width"], info["height"]))  # [3, H, W]
        if image is None:
            raise ValueError(f"{info['path']} is {w}x{h} but {self.coco_json_path} says "
                             f"{info['width']}x{info['height']}: its boxes would be wrong")
        t = self._targets[index]
        target = {"boxes": torch.from_numpy(t["boxes"].copy()),  # [N, 4] xyxy pixels, float32
                  "labels": torch.from_numpy(t["labels"].copy()),  # [N] int64
                  "image_id": info["id"],
                  "orig_size": torch.tensor([h, w], dtype=torch.int64),
                  "size": torch.tensor([h, w], dtype=torch.int64)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"CocoDetection({len(self)} images, {sum(len(t['labels']) for t in self._targets)} boxes, "
                f"{self.num_classes} classes, {self.coco_json_path})")


def _as_id(value) -> int | None:
    """A COCO id: an int (or an integral float, as some exporters write); None for anything else (strings, bools,
    lists, non-integral numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value) -> float | None:
    """A JSON number as a float; None for anything else (strings, bools, lists, integers beyond the float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _brief(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages quoting junk of any size or depth."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested deeper than the recursion limit; an integer of > 4300 digits
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def _as_size(value) -> int | None:
    """An image width/height from the JSON: a positive integral number below 2**31, 0/None when absent (read from
    the file); raises ValueError for anything else."""
    if value is None or (not isinstance(value, bool) and value == 0):
        return None
    size = _as_id(value)
    if size is None or not 0 < size < 2**31:
        raise ValueError(f"not a positive integer below 2**31: {_brief(value)}")
    return size


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())  # UTF-8 with or without a BOM, UTF-16 or UTF-32 (detected, RFC 8259)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ValueError(f"{path} cannot be read as JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{path} cannot be read as JSON: lists/objects nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO JSON object, got {type(data).__name__}")
    return data


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when Pillow cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 — any failure means "unreadable"
        return None


# ---------------------------------------------------------------------------------------------------------------
ROBOFLOW_JSON = "_annotations.coco.json"
_SPLIT_ALIASES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}


def find_coco_splits(path: str | os.PathLike, image_dir: str | os.PathLike | None = None
                     ) -> dict[str, tuple[Path, Path]]:
    """Finds the COCO-format splits under `path`: {"train"|"val"|"test": (image_dir, json_path)}.

    Layouts, tried in this order:
      (c) `path` is a JSON file: {"train": (image_dir or the JSON's folder, path)} — one split; use it for both
          training and validation if that is what you want.
      (a) Roboflow: `path/{train,valid,test}/_annotations.coco.json` next to the images ("valid" -> "val").
          A folder holding `_annotations.coco.json` itself is one split, "train".
      (b) COCO: `path/annotations/instances_{train,val,test}*.json` with image folders `train*/`, `val*/`, ...
          (e.g. instances_train2017.json + train2017/) in `path/` or `path/images/`.
    FileNotFoundError listing what was looked for when nothing matches.
    """
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() != ".json":
            raise ValueError(f"{root} is not a JSON file (pass a COCO JSON or a dataset folder)")
        img = Path(image_dir) if image_dir is not None else root.parent
        if not img.is_dir():
            raise FileNotFoundError(f"image folder not found: {img} (for {root})")
        return {"train": (img, root)}
    if not root.is_dir():
        raise FileNotFoundError(f"dataset path not found: {root}")
    if image_dir is not None:
        raise ValueError("image_dir is only used when path is a JSON file")

    splits: dict[str, tuple[Path, Path]] = {}
    for name in ("train", "valid", "val", "validation", "test"):  # (a) Roboflow
        j = root / name / ROBOFLOW_JSON
        if j.is_file():
            splits.setdefault(_SPLIT_ALIASES[name], (j.parent, j))
    if splits:
        return splits
    if (root / ROBOFLOW_JSON).is_file():
        return {"train": (root, root / ROBOFLOW_JSON)}

    ann = root / "annotations"  # (b) COCO
    if ann.is_dir():
        for split in ("train", "val", "test"):
            for j in sorted(ann.glob(f"instances_{split}*.json")):
                suffix = j.stem[len("instances_"):]  # e.g. "train2017"
                candidates = [root / suffix, root / "images" / suffix, root / split, root / "images" / split]
                candidates += sorted(p for p in root.glob(f"{split}*") if p.is_dir())
                found = next((c for c in candidates if c.is_dir()), None)
                if found is not None:
                    splits.setdefault(split, (found, j))
                    break
    if splits:
        return splits
    raise FileNotFoundError(
        f"no COCO-format dataset found in {root}; looked for:\n"
        f"  Roboflow layout: {root}/{{train,valid,test}}/{ROBOFLOW_JSON} (images next to the JSON), or "
        f"{root}/{ROBOFLOW_JSON}\n"
        f"  COCO layout: {root}/annotations/instances_{{train,val,test}}*.json with image folders "
        f"{root}/{{train,val,test}}*/ (or under {root}/images/)\n"
        f"  or pass the JSON file itself (its images next to it, or give image_dir)")
