"""Choosing the crop box from an importance map, and the high-resolution tile grid.

Implements ViCrop's adaptive sliding window (PAPER.md "Choosing the box") and the tiling
of its high-resolution variant ("High-resolution variant") so that they give the same
boxes as `bbox_from_att_image_adaptive`, `high_res_split_threshold` and `high_res` in the
official code (saccharomycetes/mllms_know, utils.py).

Axes and conventions:
  B batch, H map rows, W map columns, R = 6 window ratios.
  A map is float[H, W]: row index = image y, column index = image x, so a cell covers
  width / W by height / H pixels. Image sizes are (width, height), as PIL reports them.
  Boxes are int32 (x1, y1, x2, y2) pixel edges, ready for `PIL.Image.crop`.

How the official box is reproduced exactly:
  * Geometry (window span per ratio, box edges for every window position) depends only
    on the map shape, the image size and the base size, and the official code computes
    it in float64 with `int()` truncation, which matters: a 104 px wide image on a
    24-column map has centre 5 * (104 / 24) + (104 / 24) * 2 / 2 = 25.999999999999996,
    which truncates to 25, not 26. XLA contracts `a * b + c` into one fused multiply-add
    (one rounding, so 26), on CPU as on GPU, so the geometry is computed on the host in
    numpy float64 (each operation rounded, as in CPython) and handed to the jitted search
    as small int32 tables. `image_size` is therefore host data (ints or numpy, not a
    tracer); it may differ across a batch and never causes a recompile: one compile per
    map shape.
  * Window sums come from an integral image over an int64 fixed-point copy of the map
    (scaled by a power of two chosen from the largest magnitude, so no sum overflows).
    Each cell is rounded to a step of at most 2**(ceil(log2(H * W)) - 60) times the
    largest magnitude (2**-50 for 24x24), and the sums are then exact, so equal windows compare
    equal (integer-valued and constant maps tie exactly as the official float64 sums
    do). The first maximum in the official scan order (x outer, y inner) wins.
  * Sharpness is evaluated in float64 in the official order (neighbours left, right, up,
    down summed left to right, divided by their count, subtracted from the maximum,
    divided by the window area), so float64 rounding splits exact ties between ratios
    the way the official code does; `jnp.argmax` then picks the first maximum, and the
    first NaN if any, like `np.argmax`.
  * The search runs with `jax.enable_x64` for the call (int64 sums, float64 sharpness);
    maps are tiny, so the cost is negligible.
  Known difference: the official sums each window with numpy, so windows that hold the
  same non-dyadic values in a different arrangement can differ in the last bit there and
  not here. The official maps are float32, which numpy sums in float32, so near-ties
  within float32 rounding may also go either way.

Kept from the official code:
  * If the ratio-1 window already covers the whole map, the box is the whole image;
    larger ratios whose window covers the whole map are skipped.
  * A window of zero cells (image wider or taller than base * ratio * map size, e.g. over
    8064 px on a 24-cell axis at base 336) sums to 0 and has sharpness 0 / 0 = NaN, which
    wins the ratio vote (`np.argmax` returns the first NaN). Every window then ties at 0,
    so such an image gets the ratio-1 box in its top-left corner, whatever the map.
  * The half side is `floor(base * ratio / 2)`, so the box for ratio 1.2 at base 336 is
    402 px, not 403; a box never leaves the image and spans it fully along an axis that
    is shorter than the box.

Non-finite maps: in the official code a NaN window never becomes the maximum
(`att > max_att` is False), so an all-NaN map keeps position (0, 0); an inf window wins
at its first occurrence and inf - inf gives a NaN sharpness, which then wins the ratio
vote. Here the map is sanitised first: NaN -> 0, +inf -> the largest finite value of the
map, -inf -> the smallest (0 where no value is finite), and the official rule runs on
the result, so the box is always finite and inside the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

RATIOS: tuple[float, ...] = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)

# Fixed-point sums keep |sum| < 2**_SUM_BITS; with integral-image differences taken in
# pairs (see `_window_sums`) every intermediate stays below 2**(_SUM_BITS + 1) < 2**63.
_SUM_BITS = 61


class _Plan(NamedTuple):
    """Host-side geometry for one map (leading batch axes allowed)."""

    spans: np.ndarray  # int32[..., R, 2] window size in cells, (x, y)
    active: np.ndarray  # bool[..., R] window smaller than the map on some axis
    whole: np.ndarray  # bool[...] ratio 1 already covers the map: box = whole image
    x_edges: np.ndarray  # int32[..., R, W + 1, 2] (x1, x2) for a window at column p
    y_edges: np.ndarray  # int32[..., R, H + 1, 2] (y1, y2) for a window at row p
    size: np.ndarray  # int32[..., 2] (width, height)


def _axis_plan(
    extent: np.ndarray, cells: int, side: np.ndarray, half: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Spans int64[B, R] and box edges int64[B, R, cells + 1, 2] along one axis.

    Every operation is a separate numpy float64 op, in the official order, so each is
    rounded once as in CPython (no fused multiply-add).
    """
    cell = extent.astype(np.float64) / cells  # [B] pixels per map cell
    span = np.minimum(np.floor(side[None, :] / cell[:, None]), cells)  # [B, R]
    start = np.arange(cells + 1, dtype=np.float64)  # window start, in cells
    centre = start * cell[:, None, None] + cell[:, None, None] * span[:, :, None] / 2
    centre = np.floor(centre).astype(np.int64)  # `int()` of a non-negative float
    lo = half[None, :, None]
    hi = extent[:, None, None] - lo
    # Clamp low first, then high, as the official code does: the high bound wins when
    # the image is shorter than the box, which then spans the whole axis.
    centre = np.minimum(np.maximum(centre, lo), hi)
    edges = np.stack(
        [np.maximum(centre - lo, 0), np.minimum(centre + lo, extent[:, None, None])], axis=-1
    )
    return span.astype(np.int64), edges


def _plan(map_shape: tuple[int, int], image_sizes: np.ndarray, base_size: int) -> _Plan:
    """Geometry for a batch of images int[B, 2] on maps of shape (H, W)."""
    rows, cols = map_shape
    if rows < 1 or cols < 1:
        raise ValueError(f"map shape must be positive, got {map_shape}")
    if base_size <= 0:
        raise ValueError(f"base_size must be positive, got {base_size}")
    if (image_sizes <= 0).any():
        raise ValueError(f"image sizes must be positive, got {image_sizes.tolist()}")
    side = np.float64(base_size) * np.asarray(RATIOS, dtype=np.float64)  # [R]
    half = np.floor(side / 2).astype(np.int64)  # `selected_bbox_size // 2`
    span_x, x_edges = _axis_plan(image_sizes[:, 0], cols, side, half)
    span_y, y_edges = _axis_plan(image_sizes[:, 1], rows, side, half)
    covers = (span_x >= cols) & (span_y >= rows)  # [B, R]
    return _Plan(
        spans=np.stack([span_x, span_y], axis=-1).astype(np.int32),
        active=~covers,
        whole=covers[:, 0],
        x_edges=x_edges.astype(np.int32),
        y_edges=y_edges.astype(np.int32),
        size=image_sizes.astype(np.int32),
    )


def _sanitise(grid: jax.Array) -> jax.Array:
    """NaN -> 0, +inf -> largest finite value, -inf -> smallest (0 if none finite)."""
    finite = jnp.isfinite(grid)
    any_finite = jnp.any(finite)
    top = jnp.where(any_finite, jnp.max(jnp.where(finite, grid, -jnp.inf)), 0.0)
    bottom = jnp.where(any_finite, jnp.min(jnp.where(finite, grid, jnp.inf)), 0.0)
    grid = jnp.where(jnp.isnan(grid), 0.0, grid)
    grid = jnp.where(grid == jnp.inf, top, grid)
    return jnp.where(grid == -jnp.inf, bottom, grid)


def _pow2(k: jax.Array) -> jax.Array:
    """Exactly 2.0**k in float64 for |k| <= 1022, built from the exponent bits."""
    return lax.bitcast_convert_type((k.astype(jnp.int64) + 1023) << 52, jnp.float64)


def _window_sums(table: jax.Array, span: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums int64[H + 1, W + 1] (y, x) of every span (x, y) window, and their validity."""
    rows, cols = table.shape[0] - 1, table.shape[1] - 1
    ys, xs = jnp.arange(rows + 1), jnp.arange(cols + 1)
    y_end = jnp.minimum(ys + span[1], rows)
    x_end = jnp.minimum(xs + span[0], cols)
    # Difference rows first, then columns: each partial result is itself the sum of a
    # rectangle, so it stays within the fixed-point range (four-term sums could not).
    strip = table[y_end] - table[ys]  # [H + 1, W + 1]
    sums = strip[:, x_end] - strip[:, xs]  # [H + 1, W + 1]
    valid = (ys <= rows - span[1])[:, None] & (xs <= cols - span[0])[None, :]
    return sums, valid


def _search(att_map: jax.Array, plan: _Plan) -> jax.Array:
    """Box int32[4] for one map float[H, W]; needs x64 enabled."""
    rows, cols = att_map.shape
    grid = _sanitise(att_map.astype(jnp.float64))

    # Fixed point: |q| < 2**(_SUM_BITS - ceil(log2(H * W))), so no window sum overflows.
    # The scale is split in two factors so that each stays a normal float64.
    _, exponent = jnp.frexp(jnp.max(jnp.abs(grid)))  # max |grid| < 2**exponent
    shift = _SUM_BITS - math.ceil(math.log2(rows * cols)) - exponent
    shift_a = shift // 2
    shift_b = shift - shift_a
    fixed = jnp.round(grid * _pow2(shift_a) * _pow2(shift_b)).astype(jnp.int64)
    table = jnp.pad(jnp.cumsum(jnp.cumsum(fixed, axis=0), axis=1), ((1, 0), (1, 0)))

    def to_float(q: jax.Array) -> jax.Array:
        return q.astype(jnp.float64) * _pow2(-shift_a) * _pow2(-shift_b)

    def one_ratio(span: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        sums, valid = _window_sums(table, span)
        lowest = jnp.iinfo(jnp.int64).min
        # Official scan: x outer, y inner, first strict maximum kept.
        order = jnp.where(valid, sums, lowest).T.reshape(-1)
        best = jnp.argmax(order)
        x, y = best // (rows + 1), best % (rows + 1)
        last_x, last_y = cols - span[0], rows - span[1]
        neighbours = (
            (x - 1, y, x > 0),
            (x + 1, y, x < last_x),
            (x, y - 1, y > 0),
            (x, y + 1, y < last_y),
        )
        total = jnp.float64(0.0)
        count = jnp.int32(0)
        for nx, ny, present in neighbours:
            value = to_float(sums[jnp.clip(ny, 0, rows), jnp.clip(nx, 0, cols)])
            # Adding 0.0 leaves a float64 sum unchanged, so this is numpy's
            # left-to-right sum over the neighbours that exist.
            total = total + jnp.where(present, value, 0.0)
            count = count + present.astype(jnp.int32)
        mean = total / count
        area = (span[0] * span[1]).astype(jnp.float64)
        sharpness = (to_float(sums[y, x]) - mean) / area
        return sharpness, x, y

    sharpness, xs, ys = jax.vmap(one_ratio)(plan.spans)  # [R] each
    pick = jnp.argmax(jnp.where(plan.active, sharpness, -jnp.inf))
    x_edges = plan.x_edges[pick, xs[pick]]
    y_edges = plan.y_edges[pick, ys[pick]]
    box = jnp.stack([x_edges[0], y_edges[0], x_edges[1], y_edges[1]])
    whole = jnp.stack([0, 0, plan.size[0], plan.size[1]]).astype(jnp.int32)
    return jnp.where(plan.whole, whole, box).astype(jnp.int32)


_search_batch = jax.jit(jax.vmap(_search))


def _host_sizes(image_sizes: object, batch: int) -> np.ndarray:
    """Image sizes as int64[B, 2] host values."""
    if isinstance(image_sizes, jax.core.Tracer):
        raise TypeError(
            "image sizes must be concrete host values (ints or numpy): the box geometry "
            "is computed on the host in float64 to match the official rounding"
        )
    sizes = np.asarray(image_sizes)
    if not np.issubdtype(sizes.dtype, np.integer):
        if not np.all(sizes == np.round(sizes)):
            raise ValueError(f"image sizes must be whole pixels, got {sizes.tolist()}")
    sizes = sizes.astype(np.int64)
    if sizes.shape != (batch, 2):
        raise ValueError(f"expected image sizes of shape ({batch}, 2), got {sizes.shape}")
    return sizes


def select_bboxes(att_maps: jax.Array, image_sizes: object, base_size: int) -> jax.Array:
    """Official ViCrop box for each map of a batch.

    Args:
      att_maps: float[B, H, W] importance maps (row = image y, column = image x).
      image_sizes: int[B, 2] (width, height) of each original image, as host values
        (Python ints or numpy; not traced). Sizes may differ within the batch.
      base_size: model input resolution (336 LLaVA-1.5, 224 InstructBLIP).

    Returns:
      int32[B, 4] boxes (x1, y1, x2, y2) in pixels of each original image.
    """
    if not hasattr(att_maps, "ndim"):
        att_maps = np.asarray(att_maps)  # float64 stays float64: the search runs in x64
    if att_maps.ndim != 3:
        raise ValueError(f"expected maps of shape [B, H, W], got {att_maps.shape}")
    batch, rows, cols = att_maps.shape
    plan = _plan((rows, cols), _host_sizes(image_sizes, batch), int(base_size))
    with jax.enable_x64(True):
        return _search_batch(att_maps, plan)


def select_bbox(att_map: jax.Array, image_size: Sequence[int], base_size: int) -> jax.Array:
    """Official ViCrop box for one map.

    Args:
      att_map: float[H, W] importance map (row = image y, column = image x).
      image_size: (width, height) of the original image, as PIL reports it.
      base_size: model input resolution (336 LLaVA-1.5, 224 InstructBLIP).

    Returns:
      int32[4] box (x1, y1, x2, y2) in pixels of the original image.
    """
    if not hasattr(att_map, "ndim"):
        att_map = np.asarray(att_map)
    if att_map.ndim != 2:
        raise ValueError(f"expected a map of shape [H, W], got {att_map.shape}")
    return select_bboxes(att_map[None], [tuple(image_size)], base_size)[0]


def high_res_grid(image_size: Sequence[int], threshold: int = 1024) -> tuple[int, int, int, int]:
    """Tile grid of the high-resolution variant.

    Args:
      image_size: (width, height) of the original image.
      threshold: largest tile height before another row is added (official 1024).

    Returns:
      (rows, cols, tile_width, tile_height). rows = ceil(height / threshold) and cols =
      int(rows * width / height), at least 1 (the official code divides by zero for a
      tall narrow image where this is 0). Small images are split by the same rule: one
      tile unless wider than tall by a factor of 2 or more.
    """
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0 or threshold <= 0:
        raise ValueError(f"sizes must be positive, got {image_size}, threshold {threshold}")
    rows = math.ceil(height / threshold)
    cols = max(1, int(rows * width / height))
    return rows, cols, math.ceil(width / cols), math.ceil(height / rows)


def high_res_tiles(
    image_size: Sequence[int], threshold: int = 1024
) -> list[tuple[int, int, int, int]]:
    """Tile boxes of the high-resolution variant, row-major.

    Args:
      image_size: (width, height) of the original image.
      threshold: largest tile height before another row is added (official 1024).

    Returns:
      rows * cols boxes (x1, y1, x2, y2), left to right then top to bottom. Tiles are all
      the same size, so those on the right and bottom edges may reach past the image;
      `PIL.Image.crop` pads them with black, as in the official code.
    """
    rows, cols, tile_w, tile_h = high_res_grid(image_size, threshold)
    return [
        (i * tile_w, j * tile_h, (i + 1) * tile_w, (j + 1) * tile_h)
        for j in range(rows)
        for i in range(cols)
    ]


def merge_tile_maps(maps: jax.Array | Sequence[jax.Array], rows: int, cols: int) -> jax.Array:
    """Tile per-tile maps back into one map, as the official `high_res` does.

    Args:
      maps: float[rows * cols, h, w] maps (or a sequence of [h, w]) in the row-major
        order of `high_res_tiles`.
      rows: tile rows.
      cols: tile columns.

    Returns:
      float[rows * h, cols * w]: tile (j, i) fills rows j*h:(j+1)*h, columns i*w:(i+1)*w.
      Select the box on it against the full image size.
    """
    maps = jnp.stack(list(maps)) if isinstance(maps, (list, tuple)) else jnp.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != rows * cols:
        raise ValueError(f"expected {rows * cols} maps of shape [h, w], got {maps.shape}")
    _, h, w = maps.shape
    grid = maps.reshape(rows, cols, h, w).transpose(0, 2, 1, 3)  # [rows, h, cols, w]
    return grid.reshape(rows * h, cols * w)
