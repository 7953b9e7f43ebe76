"""Crop boxes of the [image, crop] prompts and the patch cells the attention losses read.

Boxes are [x1, y1, x2, y2] in image pixels (x2, y2 exclusive); `grid` is the model's patch
grid side (the processor squashes every image, and every crop, to a square).
"""

from __future__ import annotations

import math

import numpy as np

from eval import synthetic as syn
from eval.engine import coverage

Box = tuple[int, int, int, int]

# A crop "holds" a letter when this share of the letter's box lies inside it (the rule of
# eval.analysis's crop_contents).
HOLDS_LETTER = 0.8


def fit_box(cx: float, cy: float, side: int, size: tuple[int, int]) -> Box:
    """A square of `side` px centred at (cx, cy), shifted into the image (an axis shorter
    than the side is spanned fully, as the box search's boxes are)."""

    def axis(c, n):
        if side >= n:
            return 0, n
        lo = min(max(int(round(c - side / 2)), 0), n - side)
        return lo, lo + side

    (x1, x2), (y1, y2) = axis(cx, size[0]), axis(cy, size[1])
    return (x1, y1, x2, y2)


def subject_crop(bbox, size, base: int, rng) -> Box:
    """A crop like ViCrop's around the subject: side max(base * [1, 2], subject * [1, 1.5]),
    offset at random with the subject kept inside."""
    x1, y1, x2, y2 = bbox
    side_px = max(x2 - x1, y2 - y1)
    side = int(round(max(base * rng.uniform(1.0, 2.0), side_px * rng.uniform(1.0, 1.5))))
    slack = max(0.0, (side - side_px) / 2)
    cx = (x1 + x2) / 2 + rng.uniform(-slack, slack)
    cy = (y1 + y2) / 2 + rng.uniform(-slack, slack)
    return fit_box(cx, cy, side, size)


def random_crop(size, base: int, rng) -> Box:
    """A base-to-2x-base square anywhere in the image (it may hold all, part or none of the
    subject): what a box search that looked in the wrong place, or eval's random_crop, gives."""
    side = int(round(base * rng.uniform(1.0, 2.0)))
    return fit_box(rng.uniform(0, size[0]), rng.uniform(0, size[1]), side, size)


def miss_crop(bbox, size, base: int, rng, tries: int = 20) -> Box | None:
    """A base-to-2x-base crop that does not overlap the subject, or None if none was found."""
    x1, y1, x2, y2 = bbox
    for _ in range(tries):
        box = random_crop(size, base, rng)
        if box[2] <= x1 or x2 <= box[0] or box[3] <= y1 or y2 <= box[1]:
            return box
    return None


def partial_crop(bbox, text_bbox, size, base: int, rng, tries: int = 20) -> Box | None:
    """A base x base crop (the side the official box search always returns) centred inside
    the shape's box `bbox` that holds less than HOLDS_LETTER of its glyph's box `text_bbox`
    (part of the shape, part of the letter or none of it: what a map spread over a large
    subject gives), or None if none was found."""
    x1, y1, x2, y2 = bbox
    for _ in range(tries):
        box = fit_box(rng.uniform(x1, x2), rng.uniform(y1, y2), base, size)
        if coverage(box, text_bbox) < HOLDS_LETTER:
            return box
    return None


def gt_crop(bbox, size, base: int) -> Box:
    """The subject's box grown to at least base x base around its centre (eval's gt_crop)."""
    x1, y1, x2, y2 = bbox
    return fit_box((x1 + x2) / 2, (y1 + y2) / 2, max(base, x2 - x1, y2 - y1), size)


def contains_centre(box, bbox) -> bool:
    """Whether `box` holds the centre of `bbox`."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def distractor(rec, rng) -> dict | None:
    """Another object of the item, one sharing the subject's colour or shape when there is
    one (the crop a wrong map peak gives: it looks like the subject to a half-attentive
    reader), or None when the subject is alone."""
    subject = rec["objects"][rec["subject_index"]]
    others = [o for i, o in enumerate(rec["objects"]) if i != rec["subject_index"]]
    if not others:
        return None
    alike = [o for o in others if o["color"] == subject["color"] or o["shape"] == subject["shape"]]
    pool = alike or others
    return pool[int(rng.integers(len(pool)))]


def contrast_objects(rec, k: int, rng) -> list[dict]:
    """k objects of the item to ask about besides its subject: the other shapes readable
    without a crop (side >= LARGE_MIN of the image's shorter side; else >= SMALL_MAX), drawn
    with replacement; the subject itself when no other is readable."""
    short = min(rec["image_size"])
    others = [o for i, o in enumerate(rec["objects"]) if i != rec["subject_index"]]
    for least in (syn.LARGE_MIN, syn.SMALL_MAX):
        pool = [o for o in others if (o["bbox"][2] - o["bbox"][0]) >= least * short]
        if pool:
            break
    else:
        pool = [rec["objects"][rec["subject_index"]]]
    return [pool[int(j)] for j in rng.integers(len(pool), size=k)]


def crop_object(rec, crop, rng) -> dict:
    """The shape a pair-contrast row asks about on [image, crop]: another shape whose glyph
    centre the crop holds (the letter a wrong crop tempts the model to read), else one of
    `contrast_objects` (readable in the image)."""
    shown = [o for i, o in enumerate(rec["objects"])
             if i != rec["subject_index"] and contains_centre(crop, o["text_bbox"])]  # fmt: skip
    if shown:
        return shown[int(rng.integers(len(shown)))]
    return contrast_objects(rec, 1, rng)[0]


# ---------------------------------------------------------------------------------------
# Patch cells.


def cell_span(bbox, size, grid: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) [start, stop) of the grid cells a box overlaps; the image is squashed to a
    square, so cell (r, c) covers x in [c W / g, (c + 1) W / g), likewise y."""
    (x1, y1, x2, y2), (w, h) = bbox, size
    span = lambda a, b, n: (math.floor(a * grid / n), max(math.ceil(b * grid / n), 1))
    return span(y1, y2, h), span(x1, x2, w)


def subject_cells(bbox, size, grid: int) -> np.ndarray:
    """float32[grid, grid], 1 on the patch cells the subject's box overlaps."""
    (r1, r2), (c1, c2) = cell_span(bbox, size, grid)
    out = np.zeros((grid, grid), np.float32)
    out[r1:r2, c1:c2] = 1.0
    return out


def pair_cells(subject, size, crop, grid: int) -> np.ndarray:
    """float32[2 * grid * grid]: the [image, crop] prompt's subject cells, the image's
    (`subject_cells`) then the crop's (the subject's box clipped to the crop, on the crop's
    grid), the crop's only when it holds HOLDS_LETTER of the glyph's box (else zeros: the
    crop shows another object, or a piece of the subject without its whole letter).
    `subject` is the subject's object record (bbox, text_bbox), `crop` the crop's box in the
    image."""
    image_cells = subject_cells(subject["bbox"], size, grid).reshape(-1)
    crop_cells = np.zeros(grid * grid, np.float32)
    if coverage(crop, subject["text_bbox"]) >= HOLDS_LETTER:
        x1, y1, x2, y2 = crop
        bx1, by1, bx2, by2 = subject["bbox"]
        box = (max(bx1, x1) - x1, max(by1, y1) - y1, min(bx2, x2) - x1, min(by2, y2) - y1)
        crop_cells = subject_cells(box, (x2 - x1, y2 - y1), grid).reshape(-1)
    return np.concatenate([image_cells, crop_cells])


# The patch heads' classes (1 + index; 0 is the background): every glyph the generator
# prints (words and letters) and every colour + shape.
GLYPH_CLASSES = tuple(w.upper() for w in syn.WORDS) + syn.LETTERS
COMBO_CLASSES = tuple((c, k) for c in syn.COLORS for k in syn.SHAPES)


def patch_labels(objects, box, grid: int, every_cell: bool = False) -> np.ndarray:
    """int32[2, grid * grid] labels of an image's (or a crop's) patch cells, for the
    patch-label loss: row 0, 1 + the index (in GLYPH_CLASSES) of the glyph whose box centre
    lies in the cell; row 1, 1 + the index (in COMBO_CLASSES) of the shape whose box centre
    lies in the cell; 0 elsewhere. With `every_cell`, also every cell whose own centre lies
    inside the glyph's (row 0) or the shape's (row 1) box, so that each patch of a large
    subject carries its labels, not only the one at its centre. `box` is the crop's box in
    the image (the whole image for the image itself); cells follow the processor's squash of
    the box to a square."""
    x1, y1, x2, y2 = box
    sx, sy = (x2 - x1) / grid, (y2 - y1) / grid
    centres_x = x1 + (np.arange(grid) + 0.5) * sx  # image x of each column's centre
    centres_y = y1 + (np.arange(grid) + 0.5) * sy
    out = np.zeros((2, grid, grid), np.int32)
    for o in objects:
        for row, key, label in (
            (0, "text_bbox", 1 + GLYPH_CLASSES.index(o["text"].upper())),
            (1, "bbox", 1 + COMBO_CLASSES.index((o["color"], o["shape"]))),
        ):
            bx1, by1, bx2, by2 = o[key]
            if every_cell:
                cols = (bx1 <= centres_x) & (centres_x < bx2)
                rows = (by1 <= centres_y) & (centres_y < by2)
                out[row][np.ix_(rows, cols)] = label
            cx, cy = (bx1 + bx2) / 2, (by1 + by2) / 2
            if x1 <= cx < x2 and y1 <= cy < y2:
                c = int((cx - x1) * grid / (x2 - x1))
                r = int((cy - y1) * grid / (y2 - y1))
                out[row, r, c] = label
    return out.reshape(2, -1)
