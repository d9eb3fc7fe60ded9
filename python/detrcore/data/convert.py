"""Converters to COCO format: Pascal VOC XML and YOLO txt -> one COCO instances JSON (written atomically).

Output contract (both converters): images get ids 1..n in sorted file-name order, `file_name` relative to the
image folder, `width`/`height` read from the image with Pillow; annotations get ids 1..m, `bbox` = [x, y, w, h] in
absolute pixels clipped to the image, `area` = w*h, `iscrowd` = 0; categories {"id", "name"} with ids 1..K.
Bad input raises ValueError / FileNotFoundError naming the file (and the line or object).
The JSON is written to a temporary file next to `out_json` and moved into place with os.replace.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

__all__ = ["voc_to_coco", "yolo_to_coco", "atomic_write_json", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def atomic_write_json(obj, path: str | os.PathLike) -> Path:
    """Writes JSON to a temp file in the same folder, fsyncs it, then os.replace()s it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; ValueError naming the file when Pillow cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 — Pillow raises several types for bad files
        raise ValueError(f"cannot read image file {path}: {e}") from e


def _clip_xyxy(x0, y0, x1, y1, w, h):
    return min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)


def _coco(images: list, annotations: list, names: Sequence[str]) -> dict:
    return {"info": {"description": "converted by detrcore.data.convert"}, "images": images,
            "annotations": annotations, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


# ---------------------------------------------------------------------------------------------------------------
def voc_to_coco(xml_dir: str | os.PathLike, image_dir: str | os.PathLike, out_json: str | os.PathLike,
                categories: Sequence[str] | None = None) -> dict:
    """Pascal VOC XML files (`xml_dir/*.xml`) -> a COCO JSON at `out_json`; returns the written dict.

    The image of each XML is `image_dir/<filename>` (its <filename> tag), else `image_dir/<xml stem>.<ext>`.
    Coordinates are taken as pixel edges as written (LabelImg / DeepForest convention; no 1-based shift), then
    clipped to the image. `categories`: class names in label order (ids 1..K); None = the sorted set of names
    found. A name outside a given `categories` list is an error.
    """
    xml_dir, image_dir = Path(xml_dir), Path(image_dir)
    if not xml_dir.is_dir():
        raise FileNotFoundError(f"VOC annotation folder not found: {xml_dir}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    xmls = sorted(xml_dir.glob("*.xml"))
    if not xmls:
        raise FileNotFoundError(f"no *.xml files in {xml_dir}")

    parsed = []  # (xml path, image path, (w, h), [(name, xyxy, object index)])
    for xml in xmls:
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{xml}: malformed XML ({e})") from e
        image_path = _voc_image(xml, root, image_dir)
        w, h = _image_size(image_path)
        xw, xh = _int_or_none(root.findtext("size/width")), _int_or_none(root.findtext("size/height"))
        if xw and xh and (xw, xh) != (w, h):
            raise ValueError(f"{xml}: <size> says {xw}x{xh} but {image_path} is {w}x{h}")
        objects = []
        for k, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise ValueError(f"{xml}: object #{k} has no <name>")
            try:
                x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{xml}: object #{k} ({name}) needs numeric bndbox xmin/ymin/xmax/ymax") from e
            if not all(map(math.isfinite, (x0, y0, x1, y1))):
                raise ValueError(f"{xml}: object #{k} ({name}) has a non-finite coordinate")
            cx0, cy0, cx1, cy1 = _clip_xyxy(x0, y0, x1, y1, w, h)
            if cx1 <= cx0 or cy1 <= cy0:
                raise ValueError(f"{xml}: object #{k} ({name}) box [{x0}, {y0}, {x1}, {y1}] has no area inside the "
                                 f"{w}x{h} image")
            objects.append((name, (cx0, cy0, cx1, cy1), k))
        parsed.append((xml, image_path, (w, h), objects))

    names = list(categories) if categories is not None else sorted({o[0] for p in parsed for o in p[3]})
    if len(set(names)) != len(names):
        raise ValueError(f"categories has duplicates: {names}")
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, (xml, image_path, (w, h), objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": image_path.relative_to(image_dir).as_posix(),
                       "width": w, "height": h})
        for name, (x0, y0, x1, y1), k in objects:
            if name not in cat_id:
                raise ValueError(f"{xml}: object #{k} has class {name!r}, not in categories {names}")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[name],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    coco = _coco(images, annotations, names)
    atomic_write_json(coco, out_json)
    return coco


def _int_or_none(text):
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _voc_image(xml: Path, root, image_dir: Path) -> Path:
    tried = []
    filename = (root.findtext("filename") or "").strip()
    if filename:
        tried.append(image_dir / filename)
    tried += [image_dir / (xml.stem + ext) for ext in IMAGE_EXTENSIONS]
    tried += [image_dir / (xml.stem + ext.upper()) for ext in IMAGE_EXTENSIONS]
    for p in tried:
        if p.is_file():
            return p
    looked = ([filename] if filename else []) + [f"{xml.stem}.{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}}"]
    raise FileNotFoundError(f"{xml}: no image found; looked for {' and '.join(looked)} in {image_dir}")


# ---------------------------------------------------------------------------------------------------------------
def yolo_to_coco(images_dir: str | os.PathLike, out_json: str | os.PathLike,
                 labels_dir: str | os.PathLike | None = None, class_names: Sequence[str] | None = None) -> dict:
    """YOLO txt labels (one `class cx cy w h` line per box, normalised to [0, 1]) -> a COCO JSON; returns the dict.

    Args:
        images_dir: the image folder, or a root holding `images/` and `labels/`.
        labels_dir: None = `labels/` beside `images/` (the `images` path component replaced by `labels`), or the
            image folder itself when its *.txt files sit next to the images.
        class_names: names by YOLO class index; None = `names` of a data.yaml / dataset.yaml, else the lines of
            classes.txt / obj.names, found in the label/image folders or up to two levels above; else "0", "1", ...
    YOLO class k becomes category id k + 1 (so CocoDetection's label is k again). An image without a label file
    has no boxes (YOLO's background images); a label file without an image is reported in one warning.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    img_dir = root / "images" if (root / "images").is_dir() else root
    lab_dir = Path(labels_dir) if labels_dir is not None else _yolo_labels_dir(img_dir)
    if not lab_dir.is_dir():
        raise FileNotFoundError(f"YOLO labels folder not found: {lab_dir}")
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}")

    names = list(class_names) if class_names is not None else _yolo_class_names(img_dir, lab_dir)
    coco_images, annotations, max_class = [], [], -1
    for image_id, path in enumerate(images, start=1):
        w, h = _image_size(path)
        coco_images.append({"id": image_id, "file_name": path.relative_to(img_dir).as_posix(), "width": w,
                            "height": h})
        label_file = lab_dir / (path.stem + ".txt")
        if not label_file.is_file():
            continue
        for lineno, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{label_file}:{lineno}"
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 5:
                raise ValueError(f"{where}: expected 'class cx cy w h' (5 values), got {len(parts)}"
                                 + (" (segmentation polygons are not supported)" if len(parts) > 5 else "")
                                 + f": {line.strip()!r}")
            try:
                cls_f = float(parts[0])
                cx, cy, bw, bh = (float(v) for v in parts[1:])
            except ValueError as e:
                raise ValueError(f"{where}: non-numeric value in {line.strip()!r}") from e
            if cls_f != int(cls_f) or cls_f < 0:
                raise ValueError(f"{where}: class must be a non-negative integer, got {parts[0]!r}")
            cls = int(cls_f)
            if names is not None and cls >= len(names):
                raise ValueError(f"{where}: class {cls} but only {len(names)} class names {names}")
            if not all(map(math.isfinite, (cx, cy, bw, bh))) or bw <= 0 or bh <= 0:
                raise ValueError(f"{where}: box needs finite cx cy and positive w h, got {line.strip()!r}")
            x0, y0, x1, y1 = _clip_xyxy((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h,
                                        w, h)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"{where}: box {line.strip()!r} lies outside the {w}x{h} image {path.name}")
            max_class = max(max_class, cls)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in lab_dir.glob("*.txt") if p.stem not in stems and p.name != "classes.txt")
    if orphans:
        warnings.warn(f"{lab_dir}: {len(orphans)} label file(s) without an image in {img_dir} were ignored, e.g. "
                      f"{orphans[0]}", stacklevel=2)
    if names is None:
        names = [str(k) for k in range(max_class + 1)]
    coco = _coco(coco_images, annotations, names)
    atomic_write_json(coco, out_json)
    return coco


def _yolo_labels_dir(img_dir: Path) -> Path:
    parts = list(img_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            candidate = Path(*parts[:i], "labels", *parts[i + 1:])
            if candidate.is_dir():
                return candidate
            break
    if any(img_dir.glob("*.txt")):
        return img_dir
    raise FileNotFoundError(f"no YOLO labels found for {img_dir}: looked for a 'labels' folder beside 'images' and "
                            f"for *.txt files next to the images; pass labels_dir")


def _yolo_class_names(img_dir: Path, lab_dir: Path) -> list[str] | None:
    dirs: list[Path] = []
    for d in (lab_dir, img_dir, img_dir.parent, lab_dir.parent, img_dir.parent.parent, lab_dir.parent.parent):
        if d not in dirs:
            dirs.append(d)
    for d in dirs:
        for name in ("data.yaml", "dataset.yaml"):
            if (d / name).is_file():
                names = _yaml_names(d / name)
                if names is not None:
                    return names
    for d in dirs:
        for name in ("classes.txt", "obj.names"):
            if (d / name).is_file():
                return [ln.strip() for ln in (d / name).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return None


def _yaml_names(path: Path) -> list[str] | None:
    """The `names` entry of an Ultralytics data.yaml (a list, or a {index: name} mapping)."""
    text = path.read_text(encoding="utf-8")
    try:
        import yaml  # optional; a small parser below covers the usual forms without it

        data = yaml.safe_load(text)
        names = data.get("names") if isinstance(data, dict) else None
    except ImportError:
        names = _parse_names_block(text)
    except Exception as e:  # noqa: BLE001 — yaml.YAMLError and friends
        raise ValueError(f"{path}: cannot parse YAML ({e})") from e
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            idx = sorted(int(k) for k in names)
        except ValueError as e:
            raise ValueError(f"{path}: 'names' keys must be class indices, got {list(names)}") from e
        if idx != list(range(len(idx))):
            raise ValueError(f"{path}: 'names' indices must be 0..{len(idx) - 1}, got {idx}")
        return [str(names[k] if k in names else names[str(k)]) for k in idx]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError(f"{path}: 'names' must be a list or a mapping, got {names!r}")


def _unquote(s: str) -> str:
    s = s.strip()
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def _parse_names_block(text: str):
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("names:"):
            continue
        rest = line[len("names:"):].split(" #")[0].strip()
        if rest.startswith("["):
            return [_unquote(x) for x in rest.strip("[]").split(",") if x.strip()]
        if rest.startswith("{"):
            return {_unquote(k): _unquote(v) for k, v in (x.split(":", 1) for x in rest.strip("{}").split(",")
                                                         if x.strip())}
        items: list = []
        mapping: dict = {}
        for sub in lines[i + 1:]:
            if not sub.strip() or sub.lstrip().startswith("#"):
                continue
            if not sub.startswith((" ", "\t")):
                break
            s = sub.strip()
            if s.startswith("- "):
                items.append(_unquote(s[2:]))
            elif ":" in s:
                k, v = s.split(":", 1)
                mapping[_unquote(k)] = _unquote(v)
        return mapping or items
    return None
