"""Layout sampling: where each shape, word and piece of clutter goes, drawn from a generator
seeded with (seed, index, split); no pixels beyond the glyph masks that size the words."""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from eval.synthetic._spec import COLORS, LETTERS, SHAPES, WORDS, Layout, Shape, SynthConfig


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
