"""Rendering: a layout's pixels (Pillow drawing, a tinted gradient, bank-cut grain noise)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from eval.synthetic._layout import _text_area, _text_mask
from eval.synthetic._spec import COLORS, Layout


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
