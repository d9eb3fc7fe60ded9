"""The bundled default dataset: aerial RGB tree crowns from the DeepForest package (MIT), as COCO-format tiles.

Contract of `bundled_dataset_dir(cache_dir=None) -> Path`: a folder in the Roboflow layout
    <root>/train/_annotations.coco.json + PNG tiles     (from 2019_YELL_2_528000_4978000_image_crop2)
    <root>/valid/_annotations.coco.json + PNG tiles     (from 2019_YELL_2_541000_4977000_image_crop)
    <root>/SOURCE.txt                                    provenance and licence
one category {"id": 1, "name": "tree"}; `find_coco_splits(root)` and `CocoDetection` read it as is.

Source files (`deepforest/data/<name>.png` + `.xml`, Pascal VOC boxes) are read without importing deepforest
(its dependencies are heavy), from the first of:
    1. an installed `deepforest` package (found with importlib.util.find_spec, not imported),
    2. `<cache>/wheels/deepforest-2.1.0-py3-none-any.whl` (checked against its sha256),
    3. `python -m pip download --no-deps deepforest==2.1.0` into `<cache>/wheels/` (~20 MB; nothing installed).
The conversion runs once: it writes into a temporary folder, adds a `.complete` marker (format version and
tiling parameters) and renames the folder into place, under a file lock (safe when several DDP ranks start
together). A folder without a matching marker (interrupted run, older format) is rebuilt.

Tiling: TILE x TILE px tiles with stride STRIDE (the last row/column is shifted to end at the image border).
A box is kept in a tile, clipped to it, when at least MIN_VISIBLE of its area lies inside — a crown cut in half
is still a recognisable object; a sliver is not. Training tiles without boxes are dropped (nothing to learn;
almost none here); validation tiles are all kept, so the validation set covers the whole image once over.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .convert import atomic_write_json

__all__ = ["bundled_dataset_dir", "default_cache_dir", "find_source", "DeepForestSource", "tile_starts",
           "DEEPFOREST_VERSION", "SPLIT_IMAGES"]

DEEPFOREST_VERSION = "2.1.0"
WHEEL_NAME = f"deepforest-{DEEPFOREST_VERSION}-py3-none-any.whl"
WHEEL_SHA256: str | None = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"  # PyPI's file
SPLIT_IMAGES = {"train": "2019_YELL_2_528000_4978000_image_crop2",  # 2299x2472 px, 574 boxes
                "valid": "2019_YELL_2_541000_4977000_image_crop"}   # 1249x1035 px, 279 boxes
FORMAT_VERSION = 1  # bump when the tiles or JSON change: cached copies are rebuilt
TILE, STRIDE = 400, 300
MIN_VISIBLE = 0.5  # keep a clipped box when >= this fraction of its area is inside the tile
KEEP_EMPTY = {"train": False, "valid": True}
CATEGORY = {"id": 1, "name": "tree", "supercategory": "plant"}
_IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def default_cache_dir() -> Path:
    """$DETRCORE_CACHE/deepforest, else ${XDG_CACHE_HOME:-~/.cache}/detrcore/deepforest."""
    root = os.environ.get("DETRCORE_CACHE")
    if root:
        return Path(root).expanduser() / "deepforest"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "detrcore" / "deepforest"


# ---- where the DeepForest files come from ----
@dataclass
class DeepForestSource:
    """Read access to DeepForest's `data/` files. names: the file names there; read(name) -> bytes;
    description: provenance for SOURCE.txt; license_text: the package's LICENSE when available."""

    description: str
    names: list[str]
    read: Callable[[str], bytes]
    license_text: str | None = None

    @classmethod
    def from_dir(cls, data_dir: str | os.PathLike, description: str | None = None,
                 license_text: str | None = None) -> "DeepForestSource":
        d = Path(data_dir)
        return cls(description or f"folder {d}", sorted(p.name for p in d.iterdir() if p.is_file()),
                   lambda name: (d / name).read_bytes(), license_text)

    @classmethod
    def from_wheel(cls, wheel: str | os.PathLike) -> "DeepForestSource":
        wheel = Path(wheel)
        try:
            with zipfile.ZipFile(wheel) as z:
                members = z.namelist()
                lic = next((m for m in members if m.endswith(".dist-info/licenses/LICENSE")
                            or m.endswith(".dist-info/LICENSE")), None)
                license_text = z.read(lic).decode("utf-8", "replace") if lic else None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel} is not a valid wheel (zip) file; delete it and retry") from e
        names = sorted(m[len("deepforest/data/"):] for m in members
                       if m.startswith("deepforest/data/") and "/" not in m[len("deepforest/data/"):])

        def read(name: str) -> bytes:
            with zipfile.ZipFile(wheel) as z:
                return z.read(f"deepforest/data/{name}")

        return cls(f"wheel {wheel} (sha256 {_sha256(wheel)})", names, read, license_text)

    def pair(self, stem: str) -> tuple[str, str]:
        """(image file name, VOC xml file name) for `stem`; FileNotFoundError naming what is missing."""
        image = next((n for n in self.names if Path(n).stem == stem and Path(n).suffix.lower() in _IMAGE_EXTS), None)
        xml = f"{stem}.xml" if f"{stem}.xml" in self.names else None
        if image is None or xml is None:
            raise FileNotFoundError(f"DeepForest data in {self.description} lacks "
                                    f"{stem}.{{png,tif,jpg}} and/or {stem}.xml (has: {', '.join(self.names)})")
        return image, xml


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_data_dir() -> Path | None:
    """deepforest's data/ folder if the package is installed (located, never imported)."""
    try:
        spec = importlib.util.find_spec("deepforest")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if all((d / f"{stem}.xml").is_file() for stem in SPLIT_IMAGES.values()):
            return d
    return None


def _installed_license() -> str | None:
    from importlib import metadata

    try:
        dist = metadata.distribution("deepforest")
    except metadata.PackageNotFoundError:
        return None
    for name in ("licenses/LICENSE", "LICENSE"):
        text = dist.read_text(name)
        if text:
            return text
    return None


def _checked_wheel(wheel: Path) -> Path:
    if WHEEL_SHA256 is not None and _sha256(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel} does not match PyPI's deepforest {DEEPFOREST_VERSION} wheel (sha256 "
                         f"{WHEEL_SHA256}); delete it and retry")
    return wheel


def find_source(cache_dir: Path) -> DeepForestSource:
    """An installed deepforest, else the cached wheel, else a `pip download` of it (see the module docstring)."""
    data_dir = _installed_data_dir()
    if data_dir is not None:
        from importlib import metadata

        try:
            version = metadata.version("deepforest")
        except metadata.PackageNotFoundError:
            version = "unknown version"
        return DeepForestSource.from_dir(data_dir, f"installed deepforest {version} at {data_dir}",
                                         _installed_license())
    wheels = cache_dir / "wheels"
    wheel = wheels / WHEEL_NAME
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"deepforest=={DEEPFOREST_VERSION}", "-d", str(wheels)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-1500:]
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = repr(e)
        if failure is not None or not wheel.is_file():
            raise RuntimeError(
                f"cannot get the bundled dataset's source (DeepForest {DEEPFOREST_VERSION} sample images): the "
                f"`deepforest` package is not installed, {wheel} does not exist, and `{' '.join(cmd)}` failed:\n"
                f"{failure or 'pip reported success but wrote no ' + WHEEL_NAME}\n"
                f"To fix: make PyPI reachable (or configure pip's index/proxy), or fetch {WHEEL_NAME} on another "
                f"machine (`pip download --no-deps deepforest=={DEEPFOREST_VERSION}`) and copy it to {wheels}/, "
                f"or train on your own COCO-format data instead.")
    return DeepForestSource.from_wheel(_checked_wheel(wheel))


# ---- conversion ----
def tile_starts(length: int, tile: int = TILE, stride: int = STRIDE) -> list[int]:
    """Tile origins along one axis: 0, stride, 2*stride, ... and a last one ending exactly at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _voc_boxes(xml_bytes: bytes, where: str) -> np.ndarray:
    """Float64 [N, 4] xyxy pixel boxes of a VOC file (coordinates as written, DeepForest's convention)."""
    try:
        root = ET.fromstring(xml_bytes)
        boxes = [[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for o in root.iter("object")]
    except (ET.ParseError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read the VOC boxes of {where}: {e}") from e
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _tile_split(image, boxes: np.ndarray, out: Path, stem: str, keep_empty: bool) -> dict:
    """Writes PNG tiles + _annotations.coco.json into `out`; returns {"tiles", "boxes"}."""
    out.mkdir(parents=True)
    W, H = image.size
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    images, anns = [], []
    for y0 in tile_starts(H):
        for x0 in tile_starts(W):
            x1, y1 = min(x0 + TILE, W), min(y0 + TILE, H)
            clipped = np.stack([np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1),
                                np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)], axis=1)  # [N, 4]
            cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
            keep = (cw > 0) & (ch > 0) & (cw * ch >= MIN_VISIBLE * areas)
            if not keep.any() and not keep_empty:
                continue
            image_id = len(images) + 1
            name = f"{stem}_x{x0:04d}_y{y0:04d}.png"
            image.crop((x0, y0, x1, y1)).save(out / name, format="PNG")
            images.append({"id": image_id, "file_name": name, "width": x1 - x0, "height": y1 - y0})
            for bx0, by0, bx1, by1 in clipped[keep]:
                w, h = float(bx1 - bx0), float(by1 - by0)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                             "bbox": [float(bx0 - x0), float(by0 - y0), w, h], "area": w * h, "iscrowd": 0})
    coco = {"info": {"description": f"DeepForest {stem}, {TILE}px tiles (detrcore bundled data)",
                     "version": str(FORMAT_VERSION)},
            "licenses": [{"id": 1, "name": "MIT", "url": "https://github.com/weecology/DeepForest"}],
            "images": images, "annotations": anns, "categories": [CATEGORY]}
    atomic_write_json(coco, out / "_annotations.coco.json")
    return {"tiles": len(images), "boxes": len(anns)}


def _marker() -> dict:
    return {"format": FORMAT_VERSION, "tile": TILE, "stride": STRIDE, "min_visible": MIN_VISIBLE,
            "splits": SPLIT_IMAGES}


def _is_complete(root: Path) -> bool:
    try:
        marker = json.loads((root / ".complete").read_text())
    except (OSError, ValueError):
        return False
    want = _marker()
    return (all(marker.get(k) == v for k, v in want.items())
            and all((root / s / "_annotations.coco.json").is_file() for s in SPLIT_IMAGES))


def _convert(source: DeepForestSource, out: Path) -> dict:
    from PIL import Image

    stats, lines = {}, []
    for split, stem in SPLIT_IMAGES.items():
        image_name, xml_name = source.pair(stem)
        try:
            with Image.open(io.BytesIO(source.read(image_name))) as img:
                image = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 — any decode failure
            raise ValueError(f"cannot decode {image_name} from {source.description}: {e}") from e
        boxes = _voc_boxes(source.read(xml_name), f"{xml_name} from {source.description}")
        W, H = image.size
        boxes = np.stack([boxes[:, 0].clip(0, W), boxes[:, 1].clip(0, H), boxes[:, 2].clip(0, W),
                          boxes[:, 3].clip(0, H)], axis=1)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        stats[split] = {**_tile_split(image, boxes, out / split, stem, KEEP_EMPTY[split]), "source_image": image_name,
                        "source_size": [W, H], "source_boxes": int(len(boxes))}
        lines.append(f"  {split}/: {image_name} ({W}x{H} px, {len(boxes)} boxes) -> {stats[split]['tiles']} tiles, "
                     f"{stats[split]['boxes']} boxes")
    text = [
        f"detrcore bundled dataset (format {FORMAT_VERSION}): tree crowns in aerial RGB images, COCO-format tiles.",
        "",
        f"Source: the sample data of DeepForest {DEEPFOREST_VERSION} (https://github.com/weecology/DeepForest, "
        "https://pypi.org/project/deepforest/), MIT License; images and Pascal VOC boxes from deepforest/data/.",
        f"Read from: {source.description}",
        "The file names follow NEON AOP tile naming (year 2019, site YELL, UTM easting/northing).",
        "",
        "Splits:", *lines,
        "",
        f"Tiling: {TILE}x{TILE} px, stride {STRIDE} (last row/column aligned to the border); a box is kept, clipped, "
        f"when >= {MIN_VISIBLE:.0%} of its area is in the tile; training tiles without boxes dropped, validation "
        "tiles all kept. One category: {\"id\": 1, \"name\": \"tree\"}.",
        "",
        "DeepForest's licence:",
        source.license_text or "MIT License, Copyright (c) 2019, Ben Weinstein (see the DeepForest repository).",
    ]
    (out / "SOURCE.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return stats


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (POSIX flock; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def bundled_dataset_dir(cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None
                        ) -> Path:
    """The bundled dataset's root (train/, valid/, SOURCE.txt), converting it on first use (see module docstring).

    Args:
        cache_dir: where to keep it; None = default_cache_dir() ($DETRCORE_CACHE/deepforest or
            ~/.cache/detrcore/deepforest). The tiles go to `<cache_dir>/coco-v<FORMAT_VERSION>/`, a downloaded
            wheel to `<cache_dir>/wheels/`.
        log: called with a progress line when a conversion runs (e.g. print); silent when None.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"coco-v{FORMAT_VERSION}"
    if _is_complete(root):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if _is_complete(root):  # another process finished while we waited
            return root
        for stale in cache.glob(".tmp-coco-*"):  # leftovers of interrupted runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():
            shutil.rmtree(root)  # incomplete or another format
        t0 = time.perf_counter()
        source = find_source(cache)
        if log:
            log(f"converting the bundled DeepForest data from {source.description} into {root} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-coco-", dir=cache))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared cache folder
        try:
            stats = _convert(source, tmp)
            (tmp / ".complete").write_text(json.dumps({**_marker(), "stats": stats,
                                                        "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_complete(root):  # lost a race without a lock (no fcntl): the other copy is good
                return root
            raise
    return root
