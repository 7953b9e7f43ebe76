"""Synthetic small-detail VQA benchmark: printed words on coloured shapes at many sizes.

Each item is an image with background clutter (a tinted gradient, faint lines, faint shape
outlines, faint letters, pixel noise) and 2-5 coloured shapes (circle, square, triangle in
a fixed palette; every colour+shape pair at most once per image), each carrying one word
printed in upper case. One shape is the subject of the question:

  * "text" questions: "What is written on the red circle?" -> "cat" (the word, lower case);
  * "color" questions: "What color is the shape with the text CAT?" -> "red".

Answers come from a small closed set (`answer_vocabulary()`), so a tiny model can learn the
task; `training_vocabulary()` lists every word a question, answer or prompt can contain.

Subject size. The subject's box is square, side s pixels. `rel_size = s / min(W, H)`:
with the LLaVA-1.5 processor (shortest side resized to 336) the subject spans
`rel_size * 336` pixels of the model input. `rel_size` is sampled log-uniformly over
`rel_range` (default [0.03, 0.5]); the image's shorter side is then drawn from the sizes
where the subject is at least `min_subject_px` pixels, so a small subject is never
illegible in the original image too (which no crop could fix): small subjects therefore
come in the larger images. Buckets (`size_bucket`):

  * small:  rel_size < 0.08         (< 27 px at a 336 px input: the word is a few-pixel
                                     smudge, unreadable without zooming in);
  * medium: 0.08 <= rel_size < 0.2  (27-67 px: borderline);
  * large:  rel_size >= 0.2         (>= 67 px: clearly readable).

Over the default range each bucket holds about a third of the items. For a square subject
in a square image the thresholds are area ratios 0.0064 and 0.04, close to the area split
used for TextVQA in the paper.

Determinism. An item is a pure function of (seed, index, split, options): the layout is
drawn from `np.random.default_rng` seeded with those integers, and the pixels are rendered
from the layout alone (Pillow drawing; the noise has its own seed inside the layout). The
split name is folded into the seed, so "train" and "test" with the same seed differ.

Conventions. Boxes are `[x1, y1, x2, y2]` in image pixels with x2, y2 exclusive (a PIL
crop box); `image_size` is `[width, height]`. Text is drawn with Pillow's built-in font
(`ImageFont.load_default(size=...)`, no font files). Non-square images (aspect up to
`max_aspect`, default 4:3) put some subjects outside the central square, which a
processor that centre-crops (as llava-1.5-7b-hf's does) will cut; pass `max_aspect=1.0`
for square images.

CLI:
  python -m eval.synthetic --out DIR --n 500 --seed 1 --split test
writes DIR/images/*.png and DIR/data.json (one record per item, see `write_benchmark`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

__all__ = [
    "COLORS",
    "DEFAULT_SIZES",
    "GLYPH_KINDS",
    "HIGH_RES_SIZES",
    "LARGE_MIN",
    "LETTERS",
    "SHAPES",
    "SIZE_BUCKETS",
    "SMALL_MAX",
    "WORDS",
    "Layout",
    "Shape",
    "SynthConfig",
    "answer_vocabulary",
    "generate_item",
    "generate_items",
    "layout_record",
    "render",
    "sample_layout",
    "size_bucket",
    "training_vocabulary",
    "write_benchmark",
]

# Fill colours; the printed word is black or white, whichever contrasts (luma 140).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 200, 20),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "purple": (128, 50, 170),
    "pink": (240, 110, 180),
}
SHAPES = ("circle", "square", "triangle")
# Printed words: short, distinct from colour and shape names, and unchanged by the VQA
# answer normalisation (no number words, articles or punctuation).
WORDS = (
    "arc", "axe", "bag", "bat", "bed", "bee", "box", "bus", "cab", "cap", "car", "cat",
    "cow", "cup", "dog", "egg", "elf", "fan", "fig", "fox", "gem", "hat", "hen", "ink",
    "jam", "jar", "jet", "key", "kit", "leg", "lid", "map", "mop", "mug", "net", "nut",
    "oak", "owl", "pan", "pen", "pig", "pin", "pot", "rat", "rug", "saw", "sun", "toy",
    "van", "web", "wig", "yak", "zip", "bird", "boat", "cake", "duck", "fish", "frog",
    "kite", "lamp", "leaf", "lion", "moon", "rose", "ship", "star", "tree", "wolf",
)  # fmt: skip

# Single printed letters (`SynthConfig.glyphs="letter"`, the demo model's task): distinct
# capitals, without A and I (the VQA answer normalisation drops the article "a").
LETTERS = tuple("BDEFHKLMNPRSTUXZ")
GLYPH_KINDS = ("word", "letter")

DEFAULT_SIZES = (224, 288, 336, 448, 512, 640, 768)
HIGH_RES_SIZES = (1152, 1408, 1664, 2048)

SMALL_MAX = 0.08
LARGE_MIN = 0.2
SIZE_BUCKETS = (
    ("small", 0.0, SMALL_MAX),
    ("medium", SMALL_MAX, LARGE_MIN),
    ("large", LARGE_MIN, 1.0),
)

TEXT_QUESTION = "What is written on the {color} {shape}?"
TEXT_SHORT = "{color} {shape}?"
COLOR_QUESTION = "What color is the shape with the text {text}?"
COLOR_SHORT = "text {text}?"
QUESTION_TYPES = ("text", "color")
# Prompt text the LLaVA / InstructBLIP templates and the ViCrop general prompt add around
# a question (image placeholders such as <image> are special tokens, not listed).
PROMPT_TEXTS = (
    "USER:",
    "ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Write a general description of the image.",
    "Question:",
    "Short answer:",
)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Generator options; every item of a benchmark uses one config.

    Attributes:
      sizes: candidate shorter sides (pixels) of ordinary images.
      high_res_sizes: candidate shorter sides of high-resolution images (all > 1024).
      high_res_fraction: probability that an item is high-resolution.
      rel_range: (min, max) of the subject's relative size, sampled log-uniformly.
      min_subject_px: smallest subject side in pixels of the original image.
      max_aspect: largest long/short side ratio (1.0: square images).
      num_objects: (min, max) shapes per image, inclusive.
      color_question_fraction: probability of a "color" question instead of a "text" one.
      glyphs: "word" (a three or four letter word from WORDS on each shape) or "letter"
        (one capital from LETTERS, drawn larger: about 0.6 of the shape's side).
      clutter: draw background lines, outlines and faint letters.
      distinct_colors: every shape of an image a different colour (shapes may repeat), so
        the question's colour alone names the subject; at most len(COLORS) shapes.
      noise_std: (min, max) standard deviation of the additive brightness noise (grain,
        the same on the three channels). Noise dominates the PNG size: about 350 KB for a
        768 px image at the default, about 30 KB with (0, 0).
    """

    sizes: tuple[int, ...] = DEFAULT_SIZES
    high_res_sizes: tuple[int, ...] = HIGH_RES_SIZES
    high_res_fraction: float = 0.0
    rel_range: tuple[float, float] = (0.03, 0.5)
    min_subject_px: int = 20
    max_aspect: float = 4 / 3
    num_objects: tuple[int, int] = (2, 5)
    color_question_fraction: float = 0.0
    glyphs: str = "word"
    clutter: bool = True
    noise_std: tuple[float, float] = (1.0, 5.0)
    distinct_colors: bool = False

    def __post_init__(self):
        lo, hi = self.rel_range
        if not 0 < lo <= hi <= 0.6:
            raise ValueError(f"rel_range must satisfy 0 < min <= max <= 0.6, got {self.rel_range}")
        if not self.sizes or min(self.sizes) < 32:
            raise ValueError(f"sizes must be non-empty and >= 32 px, got {self.sizes}")
        if self.high_res_fraction > 0 and (
            not self.high_res_sizes or min(self.high_res_sizes) <= 1024
        ):
            raise ValueError(f"high_res_sizes must all exceed 1024, got {self.high_res_sizes}")
        if not 0 <= self.high_res_fraction <= 1 or not 0 <= self.color_question_fraction <= 1:
            raise ValueError("high_res_fraction and color_question_fraction must be in [0, 1]")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        n_lo, n_hi = self.num_objects
        if not 1 <= n_lo <= n_hi <= len(COLORS) * len(SHAPES):
            raise ValueError(f"num_objects out of range: {self.num_objects}")
        if self.distinct_colors and n_hi > len(COLORS):
            raise ValueError(f"distinct_colors allows at most {len(COLORS)} shapes, "
                             f"got num_objects {self.num_objects}")  # fmt: skip
        if not 0 <= self.noise_std[0] <= self.noise_std[1]:
            raise ValueError(f"noise_std must satisfy 0 <= min <= max, got {self.noise_std}")
        if self.glyphs not in GLYPH_KINDS:
            raise ValueError(f"glyphs must be one of {GLYPH_KINDS}, got {self.glyphs!r}")
        if self.min_subject_px < 8:
            raise ValueError(f"min_subject_px must be >= 8, got {self.min_subject_px}")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One coloured shape: kind, colour name, printed word, box and the word's box."""

    kind: str
    color: str
    text: str
    box: tuple[int, int, int, int]
    text_box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything needed to render an item, and the question about it."""

    width: int
    height: int
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across the image, along x and y
    clutter: tuple[tuple[Any, ...], ...]
    objects: tuple[Shape, ...]
    subject: int  # index into objects
    question_type: str
    noise_std: float
    noise_seed: int


# ---------------------------------------------------------------------------------------
# Sizes and vocabularies.


def size_bucket(rel_size: float) -> str:
    """'small' (< SMALL_MAX), 'medium' or 'large' (>= LARGE_MIN) for a relative size."""
    if rel_size < SMALL_MAX:
        return "small"
    return "medium" if rel_size < LARGE_MIN else "large"


def answer_vocabulary() -> tuple[str, ...]:
    """The closed set of answers: the printed words and letters and the colour names, lower
    case (both glyph kinds, so one vocabulary serves every config)."""
    return tuple(sorted(set(WORDS) | {c.lower() for c in LETTERS} | set(COLORS)))


def _tokens(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text)


def training_vocabulary() -> tuple[str, ...]:
    """Every word and punctuation mark that questions, answers and prompts can contain.

    Case-sensitive: printed words appear lower case in answers and upper case in "color"
    questions, so both forms are listed. Sorted, no duplicates.
    """
    texts = list(PROMPT_TEXTS) + list(answer_vocabulary())
    for color in COLORS:
        for shape in SHAPES:
            texts += [
                TEXT_QUESTION.format(color=color, shape=shape),
                TEXT_SHORT.format(color=color, shape=shape),
            ]
    for word in WORDS + LETTERS:
        texts += [COLOR_QUESTION.format(text=word.upper()), COLOR_SHORT.format(text=word.upper())]
    return tuple(sorted({tok for text in texts for tok in _tokens(text)}))


# ---------------------------------------------------------------------------------------
# Layout sampling.


def _rng(seed: int, index: int, split: str) -> np.random.Generator:
    key = [int(seed), int(index)]
    if split:
        key.append(zlib.crc32(split.encode()))
    return np.random.default_rng(key)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _text_area(
    kind: str, box: Sequence[int], letter: bool = False
) -> tuple[float, float, float, float]:
    """Centre, width and height of the region inside a shape where its word may go."""
    x1, y1, x2, y2 = box
    s = x2 - x1
    cx = (x1 + x2) / 2
    if letter:  # one glyph: a square area, as large as the shape allows
        if kind == "square":
            return cx, (y1 + y2) / 2, 0.7 * s, 0.7 * s
        if kind == "circle":  # the inscribed square's side is 0.707 s
            return cx, (y1 + y2) / 2, 0.62 * s, 0.62 * s
        # Triangle: a 0.44 s box whose bottom is 0.06 s above the base; its top, 0.5 s
        # below the apex, is 0.5 s wide.
        return cx, y2 - 0.06 * s - 0.22 * s, 0.44 * s, 0.44 * s
    if kind == "square":
        return cx, (y1 + y2) / 2, 0.76 * s, 0.42 * s
    if kind == "circle":  # inside the inscribed square (side s / sqrt 2)
        return cx, (y1 + y2) / 2, 0.66 * s, 0.4 * s
    # Triangle, apex up: width at distance d below the apex is d, so a rectangle of height
    # 0.32 s whose bottom sits 0.1 s above the base fits in 0.58 s; keep a margin.
    h = 0.32 * s
    return cx, y2 - 0.1 * s - h / 2, 0.5 * s, h


@functools.lru_cache(maxsize=8192)
def _text_mask(text: str, max_w: int, max_h: int) -> Image.Image:
    """An 'L' mask of `text` in Pillow's built-in font, as large as fits max_w x max_h."""
    if features.check("freetype2"):
        lo, hi, best = 1, max(2, int(max_h * 1.6) + 2), 0
        while lo <= hi:  # largest size whose ink box fits
            mid = (lo + hi) // 2
            l, t, r, b = ImageFont.load_default(size=mid).getbbox(text)
            if r - l <= max_w and b - t <= max_h:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best >= 4:
            font = ImageFont.load_default(size=best)
            l, t, r, b = font.getbbox(text)
            mask = Image.new("L", (r - l, b - t), 0)
            ImageDraw.Draw(mask).text((-l, -t), text, font=font, fill=255)
            return mask
        font = ImageFont.load_default(size=8)
    else:  # Pillow without FreeType: the fixed-size bitmap font, resized to fit below
        font = ImageFont.load_default()
    l, t, r, b = font.getbbox(text)
    mask = Image.new("L", (r - l, b - t), 0)
    ImageDraw.Draw(mask).text((-l, -t), text, font=font, fill=255)
    scale = min(max_w / mask.width, max_h / mask.height)
    size = (max(1, int(mask.width * scale)), max(1, int(mask.height * scale)))
    return mask.resize(size, Image.Resampling.BILINEAR)


def _place_text(kind: str, box: Sequence[int], text: str) -> tuple[int, int, int, int]:
    cx, cy, w, h = _text_area(kind, box, letter=len(text) == 1)
    mask = _text_mask(text, max(1, int(w)), max(1, int(h)))
    x = int(round(cx - mask.width / 2))
    y = int(round(cy - mask.height / 2))
    return (x, y, x + mask.width, y + mask.height)


def _overlaps(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def _faint(rng: np.random.Generator, background: Sequence[int]) -> tuple[int, int, int]:
    """A low-contrast, low-saturation colour near the background."""
    delta = rng.uniform(18, 50) * rng.choice([-1, 1])
    tint = rng.uniform(-8, 8, size=3)
    return tuple(int(np.clip(c + delta + t, 0, 255)) for c, t in zip(background, tint, strict=True))


def _sample_clutter(rng, width, height, background) -> tuple[tuple[Any, ...], ...]:
    scale = min(width, height)
    ops: list[tuple[Any, ...]] = []
    for _ in range(int(rng.integers(4, 16))):
        pts = rng.uniform(0, 1, size=4) * [width, height, width, height]
        width_px = int(rng.integers(1, max(2, scale // 200) + 1))
        ops.append(("line", tuple(int(p) for p in pts), _faint(rng, background), width_px))
    for _ in range(int(rng.integers(2, 9))):
        s = max(6, int(scale * _log_uniform(rng, 0.03, 0.3)))
        x, y = int(rng.integers(-s // 2, width)), int(rng.integers(-s // 2, height))
        kind = str(rng.choice(["ellipse", "rectangle", "triangle"]))
        ops.append((kind, (x, y, x + s, y + s), _faint(rng, background), 1 + s // 60))
    for _ in range(int(rng.integers(1, 7))):
        n = int(rng.integers(1, 5))
        text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), size=n))
        h = max(6, int(scale * _log_uniform(rng, 0.015, 0.06)))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        ops.append(("text", (x, y, x + 4 * h * n, y + h), _faint(rng, background), text))
    return tuple(ops)


def sample_layout(
    seed: int, index: int, *, split: str = "", config: SynthConfig | None = None
) -> Layout:
    """Draws the layout of item `index` of the stream (seed, split); no pixels."""
    cfg = config or SynthConfig()
    rng = _rng(seed, index, split)

    rel = _log_uniform(rng, *cfg.rel_range)
    high_res = cfg.high_res_fraction > 0 and rng.uniform() < cfg.high_res_fraction
    pool = cfg.high_res_sizes if high_res else cfg.sizes
    # Sizes where the subject keeps min_subject_px pixels; if none, the largest.
    eligible = [s for s in pool if s * rel >= cfg.min_subject_px] or [max(pool)]
    short = int(rng.choice(eligible))
    long = int(round(short * math.exp(rng.uniform(0, math.log(cfg.max_aspect)))))
    width, height = (long, short) if rng.uniform() < 0.5 else (short, long)

    background = tuple(int(c) for c in rng.integers(90, 231) + rng.integers(-12, 13, size=3))
    background = tuple(int(np.clip(c, 0, 255)) for c in background)
    gradient = tuple(float(g) for g in rng.uniform(-25, 25, size=2))
    clutter = _sample_clutter(rng, width, height, background) if cfg.clutter else ()

    n_objects = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    combos = [(c, k) for c in COLORS for k in SHAPES]
    if cfg.distinct_colors:
        colors = rng.permutation(len(COLORS))[:n_objects]
        kinds = rng.integers(0, len(SHAPES), size=n_objects)
        picks = [int(c) * len(SHAPES) + int(k) for c, k in zip(colors, kinds, strict=True)]
    else:
        picks = rng.permutation(len(combos))[:n_objects]
    glyphs = LETTERS if cfg.glyphs == "letter" else WORDS
    words = rng.permutation(len(glyphs))[:n_objects]
    margin = 2
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[Shape] = []
    for i, (combo, word) in enumerate(zip(picks, words, strict=True)):
        color, kind = combos[combo]
        # The subject (i == 0) always fits: it is placed first and is at most 0.6 of the
        # shorter side. Distractors get 30 tries, shrinking every 10, else are left out.
        r = rel if i == 0 else _log_uniform(rng, *cfg.rel_range)
        side = min(max(cfg.min_subject_px, int(round(r * short))), short - 2 * margin)
        placed = None
        for attempt in range(30 if i else 1):
            if attempt and attempt % 10 == 0:
                side = max(min(cfg.min_subject_px, side), int(side * 0.7))
            x = int(rng.integers(margin, width - side - margin + 1))
            y = int(rng.integers(margin, height - side - margin + 1))
            box = (x, y, x + side, y + side)
            gap = max(3, int(0.1 * side))
            if all(not _overlaps(box, b, gap) for b in boxes):
                placed = box
                break
        if placed is None:
            continue
        text = glyphs[word].upper()
        boxes.append(placed)
        objects.append(Shape(kind, color, text, placed, _place_text(kind, placed, text)))

    # The subject was placed first; shuffle so its position in the list tells nothing.
    order = rng.permutation(len(objects))
    objects = [objects[j] for j in order]
    subject = int(np.argmin(order))
    q_type = "color" if rng.uniform() < cfg.color_question_fraction else "text"
    return Layout(
        width=width,
        height=height,
        background=background,
        gradient=gradient,
        clutter=clutter,
        objects=tuple(objects),
        subject=subject,
        question_type=q_type,
        noise_std=float(rng.uniform(*cfg.noise_std)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------------------
# Rendering.


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Sequence[int], **style) -> None:
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL's corners are inclusive
    if kind in ("circle", "ellipse"):
        draw.ellipse((x1, y1, x2, y2), **style)
    elif kind in ("square", "rectangle"):
        draw.rectangle((x1, y1, x2, y2), **style)
    else:
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], **style)


@functools.cache
def _noise_bank() -> np.ndarray:
    """float32[1024, 1024, 1] standard Gaussian noise, the same in every process."""
    return np.random.default_rng(20250224).standard_normal((1024, 1024, 1), np.float32)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    """float32[h, w, 1] Gaussian noise: 512-pixel blocks cut from the bank at seeded offsets.

    Drawing fresh noise for every image took most of the rendering time; slices of a fixed
    bank cost almost nothing and, with an offset per block, show no visible repetition.
    """
    bank = _noise_bank()
    n, block = bank.shape[0], 512
    rng = np.random.default_rng(seed)
    out = np.empty((h, w, 1), np.float32)
    for y in range(0, h, block):
        for x in range(0, w, block):
            bh, bw = min(block, h - y), min(block, w - x)
            oy, ox = rng.integers(0, n - block + 1, size=2)
            out[y : y + bh, x : x + bw] = bank[oy : oy + bh, ox : ox + bw]
    return out


def render(
    layout: Layout, *, drop_objects: Sequence[int] = (), drop_texts: Sequence[int] = ()
) -> Image.Image:
    """Renders a layout to an RGB image.

    Args:
      layout: from `sample_layout`.
      drop_objects: indices of shapes to leave out (with their words).
      drop_texts: indices of shapes drawn without their word.

    Returns:
      PIL RGB image of layout.width x layout.height; identical for identical arguments.
    """
    w, h = layout.width, layout.height
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    shade = layout.gradient[0] * xs + layout.gradient[1] * ys  # [H, W]
    base = np.asarray(layout.background, np.float32) + shade[..., None]  # [H, W, 3]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    for op in layout.clutter:
        kind, box, color = op[0], op[1], op[2]
        if kind == "line":
            draw.line(box, fill=color, width=op[3])
        elif kind == "text":
            mask = _text_mask(op[3], box[2] - box[0], box[3] - box[1])
            img.paste(color, (box[0], box[1], box[0] + mask.width, box[1] + mask.height), mask)
        else:
            _draw_shape(draw, kind, box, outline=color, width=op[3])

    for i, obj in enumerate(layout.objects):
        if i in drop_objects:
            continue
        fill = COLORS[obj.color]
        _draw_shape(draw, obj.kind, obj.box, fill=fill)
        if i in drop_texts:
            continue
        luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        ink = (15, 15, 15) if luma > 140 else (250, 250, 250)
        _, _, tw, th = _text_area(obj.kind, obj.box, letter=len(obj.text) == 1)
        img.paste(ink, obj.text_box, _text_mask(obj.text, max(1, int(tw)), max(1, int(th))))

    if layout.noise_std > 0:
        pixels = np.asarray(img, np.float32) + 0.5  # + 0.5: astype truncates
        pixels += layout.noise_std * _noise(h, w, layout.noise_seed)
        img = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "RGB")
    return img


# ---------------------------------------------------------------------------------------
# Items and benchmarks.


def layout_record(layout: Layout, seed: int, index: int, split: str) -> dict[str, Any]:
    """The record of a layout (see `generate_item`); cheap, for statistics without pixels."""
    subj = layout.objects[layout.subject]
    color, shape, word = subj.color, subj.kind, subj.text.lower()
    if layout.question_type == "text":
        question = TEXT_QUESTION.format(color=color, shape=shape)
        short = TEXT_SHORT.format(color=color, shape=shape)
        answer = word
    else:
        question = COLOR_QUESTION.format(text=subj.text)
        short = COLOR_SHORT.format(text=subj.text)
        answer = color
    side = subj.box[2] - subj.box[0]
    rel = side / min(layout.width, layout.height)
    prefix = f"{split}_" if split else ""
    return {
        "id": f"{prefix}{seed}_{index:07d}",
        "question": question,
        "short_question": short,
        "answer": answer,
        "labels": [answer] * 10,
        "question_type": layout.question_type,
        "bbox": list(subj.box),
        "rel_size": rel,
        "area_ratio": side * side / (layout.width * layout.height),
        "size_bucket": size_bucket(rel),
        "image_size": [layout.width, layout.height],
        "objects": [
            {
                "shape": o.kind,
                "color": o.color,
                "text": o.text.lower(),
                "bbox": list(o.box),
                "text_bbox": list(o.text_box),
            }
            for o in layout.objects
        ],  # fmt: skip
        "subject_index": layout.subject,
        "seed": seed,
        "index": index,
        "split": split,
    }


def generate_item(
    seed: int, index: int, *, split: str = "", config: SynthConfig | None = None, **options
) -> tuple[Image.Image, dict[str, Any]]:
    """Generates item `index` of the stream (seed, split).

    Args:
      seed: stream seed.
      index: item number within the stream.
      split: optional stream name folded into the seed ("train", "test", ...).
      config: generator options; keyword `options` override its fields
        (e.g. `high_res_fraction=0.5`); an unknown option raises TypeError.

    Returns:
      (image, record): the RGB image and its record: id, question, short_question,
      answer, labels (10 copies of the answer), question_type, bbox ([x1, y1, x2, y2],
      x2/y2 exclusive), rel_size, area_ratio, size_bucket, image_size ([W, H]),
      objects (every shape: shape, color, text, bbox, text_bbox), subject_index,
      seed, index, split.
    """
    cfg = dataclasses.replace(config or SynthConfig(), **options)
    layout = sample_layout(seed, index, split=split, config=cfg)
    return render(layout), layout_record(layout, seed, index, split)


def generate_items(
    n: int, seed: int, *, split: str = "", start: int = 0, config: SynthConfig | None = None,
    **options,
) -> Iterator[tuple[Image.Image, dict[str, Any]]]:  # fmt: skip
    """Yields `generate_item(seed, i, ...)` for i in [start, start + n)."""
    cfg = dataclasses.replace(config or SynthConfig(), **options)
    for index in range(start, start + n):
        yield generate_item(seed, index, split=split, config=cfg)


def write_benchmark(
    out_dir: str, n: int, seed: int, split: str = "test", *, config: SynthConfig | None = None,
    **options,
) -> list[dict[str, Any]]:  # fmt: skip
    """Writes n items as out_dir/images/<id>.png and out_dir/data.json.

    data.json is a list of the records of `generate_item`, each with `image_path`
    (relative to out_dir) added. Returns that list.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for image, record in generate_items(n, seed, split=split, config=config, **options):
        rel_path = os.path.join("images", f"{record['id']}.png")
        # Noisy images hardly compress; a low level saves most of the encoding time.
        image.save(os.path.join(out_dir, rel_path), compress_level=1)
        records.append({"id": record["id"], "image_path": rel_path, **record})
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


# ---------------------------------------------------------------------------------------
# CLI. Flags are defined only when run as a script, so importing this module next to other
# absl programs cannot clash on flag names.


def _define_flags():
    from absl import flags

    flags.DEFINE_string("out", None, "Output directory.", required=True)
    flags.DEFINE_integer("n", 500, "Number of items.")
    flags.DEFINE_integer("seed", 1, "Stream seed.")
    flags.DEFINE_string("split", "test", "Split name, folded into the seed.")
    flags.DEFINE_float("high_res_fraction", 0.0, "Fraction of images with sides > 1024 px.")
    flags.DEFINE_float("color_question_fraction", 0.0, "Fraction of 'What color...' questions.")
    flags.DEFINE_float("min_rel", 0.03, "Smallest subject side / image shorter side.")
    flags.DEFINE_float("max_rel", 0.5, "Largest subject side / image shorter side.")
    flags.DEFINE_float("max_aspect", 4 / 3, "Largest image aspect ratio (1: square).")
    flags.DEFINE_float("max_noise", 5.0, "Largest grain noise std (0: none, ~10x smaller PNGs).")


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    records = write_benchmark(
        f.out, f.n, f.seed, f.split,
        high_res_fraction=f.high_res_fraction,
        color_question_fraction=f.color_question_fraction,
        rel_range=(f.min_rel, f.max_rel),
        max_aspect=f.max_aspect,
        noise_std=(min(1.0, f.max_noise), f.max_noise),
    )  # fmt: skip
    counts = {b: sum(r["size_bucket"] == b for r in records) for b, _, _ in SIZE_BUCKETS}
    print(f"wrote {len(records)} items to {f.out}: {counts}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
