"""What the loaders share: the task list, errors, `Example`, image reading, JSON readers and
record field helpers (see eval.datasets)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

TASKS = ("textvqa", "vstar", "pope", "docvqa", "aokvqa", "gqa", "vqav2", "synthetic")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file that cannot be read as its published schema; names file and record."""


class ImageError(ValueError):
    """An image that cannot be used (missing, corrupt, too large, outside the image root)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark question.

    id: unique within the dataset (a string). image_path: as the dataset names it, relative
    to image_root (see `image_file`). labels: the ground truth the task's scorer takes.
    short_question: the question used for the map only (V*), else None. gt_bbox: (x1, y1,
    x2, y2) pixels or None. extra: dataset fields kept for analysis (JSON-serialisable).
    """

    id: str
    image_path: str
    question: str
    labels: Any
    image_root: str
    short_question: str | None = None
    gt_bbox: tuple[float, float, float, float] | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def image_file(self) -> str:
        """The image's path; raises ImageError if it would leave image_root.

        The check is lexical (after normalising ".." and absolute paths), so an image root
        that holds symbolic links to shared storage keeps working.
        """
        root = os.path.abspath(self.image_root)
        full = os.path.normpath(os.path.join(root, self.image_path))
        if os.path.commonpath([root, full]) != root:
            raise ImageError(
                f"image path {self.image_path!r} escapes the image root {self.image_root!r}"
            )
        return full


# ---------------------------------------------------------------------------------------
# Images.


def load_image(
    path: str, max_pixels: int | None | str = "pil", exif_transpose: bool = False
) -> Image.Image:
    """`vicrop_jax.processing.read_image`: the official `Image.open(path).convert("RGB")`,
    in the stored pixel frame unless exif_transpose; max_pixels: the most pixels accepted
    ("pil": PIL's limit, None: no limit). Raises ImageError naming the file."""
    from vicrop_jax import processing

    try:
        return processing.read_image(path, exif_transpose=exif_transpose, max_pixels=max_pixels)
    except processing.ImageError as e:
        raise ImageError(str(e)) from None


def load_example_image(
    ex: Example, max_pixels: int | None | str = "pil", exif_transpose: bool = False
) -> tuple[Image.Image, Example]:
    """An example's image (`load_image`) and the example, its GT box moved into the upright
    frame when exif_transpose turned the image."""
    from vicrop_jax.processing import exif_transpose_box

    path = ex.image_file()
    image = load_image(path, max_pixels, exif_transpose)
    orientation = image.info.get("exif_orientation", 1)
    if ex.gt_bbox is not None and orientation != 1:
        w, h = image.size
        stored = (h, w) if orientation >= 5 else (w, h)  # 5-8 swap the sides
        ex = dataclasses.replace(ex, gt_bbox=exif_transpose_box(ex.gt_bbox, stored, orientation))
    return image, ex


# ---------------------------------------------------------------------------------------
# Reading files.


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def _read_jsonl(path: str) -> list[Any]:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return out


class _Record:
    """Field access on one dataset record with errors that name the file and record."""

    def __init__(self, path: str, index: Any, rec: Any, id_key: str | None = None):
        self.path, self.index = path, index
        where = f"record {index}"
        if isinstance(rec, dict) and id_key and id_key in rec:
            where += f" ({id_key} {rec[id_key]!r})"
        self.where = where
        if not isinstance(rec, dict):
            self.fail(f"expected an object, got {type(rec).__name__}")
        self.rec = rec

    def fail(self, msg: str):
        raise DatasetError(f"{self.path}: {self.where}: {msg}")

    def get(self, key: str, types, default=dataclasses.MISSING):
        if key not in self.rec:
            if default is dataclasses.MISSING:
                self.fail(f"missing field {key!r} (fields: {sorted(self.rec)})")
            return default
        value = self.rec[key]
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            self.fail(f"field {key!r} must be {names}, got {type(value).__name__}")
        return value

    def answers(self, key: str, pick: Callable[[Any], Any] = lambda a: a) -> list[str]:
        raw = self.get(key, list)
        out = [pick(a) for a in raw]
        if not out or not all(isinstance(a, str) for a in out):
            self.fail(f"field {key!r} must be a non-empty list of answer strings")
        return out


def _unique(examples: list[Example], path: str) -> list[Example]:
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            raise DatasetError(f"{path}: duplicate id {ex.id!r} (records {seen[ex.id]} and {i})")
        seen[ex.id] = i
    if not examples:
        raise DatasetError(f"{path}: no questions found")
    return examples


def _box(r: _Record, box: Any, key: str, fmt: str = "xywh") -> tuple[float, float, float, float]:
    """A box field as (x1, y1, x2, y2); fmt is how the file writes it ("xywh" or "xyxy")."""
    if not (isinstance(box, list | tuple) and len(box) == 4):
        r.fail(f"field {key!r} must hold [x, y, w, h] / [x1, y1, x2, y2] boxes, got {box!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        r.fail(f"field {key!r} must hold numbers, got {box!r}")
    a, b, c, d = (float(v) for v in box)
    x1, y1, x2, y2 = (a, b, a + c, b + d) if fmt == "xywh" else (a, b, c, d)
    if x2 < x1 or y2 < y1:
        r.fail(f"field {key!r} has a negative size: {box!r} ({fmt})")
    return (x1, y1, x2, y2)


def _union(boxes: Sequence[tuple[float, ...]]) -> tuple[float, float, float, float]:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


# ---------------------------------------------------------------------------------------
# Loaders, one per benchmark.


def _jsonable(d: dict) -> dict:
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {k: v for k, v in d.items() if _is_jsonable(v)}


def _is_jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
