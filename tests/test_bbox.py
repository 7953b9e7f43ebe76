"""vicrop_jax.bbox against the plain-loop reference of the official rule.

The reference (bench/bbox_reference.py) sums one window at a time in numpy float64, in
the official order. Each map shape is checked in one batched call per base size, so
every shape compiles once.
"""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from bench.bbox_reference import (
    RATIOS,
    reference_bbox,
    reference_grid,
    reference_merge,
    reference_tiles,
)
from vicrop_jax.bbox import (
    high_res_grid,
    high_res_tiles,
    merge_tile_maps,
    select_bbox,
    select_bboxes,
)

BASES = (336, 224)


def _random_sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(width, height) pairs: tiny, ordinary, large, huge, tall and wide images."""
    sizes = np.empty((n, 2), dtype=np.int64)
    for i in range(n):
        kind = rng.integers(6)
        if kind == 0:  # smaller than the base: a window often covers the whole map
            sizes[i] = rng.integers(1, 340, size=2)
        elif kind == 1:
            sizes[i] = rng.integers(150, 2500, size=2)
        elif kind == 2:
            sizes[i] = rng.integers(2500, 9000, size=2)
        elif kind == 3:  # past base * map size: zero-cell windows, NaN sharpness
            sizes[i] = rng.integers(8000, 40000, size=2)
        elif kind == 4:  # tall and narrow
            sizes[i] = (rng.integers(20, 800), rng.integers(2000, 15000))
        else:  # wide and short
            sizes[i] = (rng.integers(2000, 15000), rng.integers(20, 800))
    return sizes


def _random_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Finite float64 map of one of several kinds; several give many exact ties."""
    kind = rng.integers(7)
    if kind == 0:
        return rng.random(shape)
    if kind == 1:  # float32 values, as the models produce
        return rng.random(shape).astype(np.float32).astype(np.float64)
    if kind == 2:  # small integers: many tied windows and tied sharpness
        return rng.integers(0, 4, size=shape).astype(np.float64)
    if kind == 3:  # a few equal peaks on zeros: tied maxima at different places
        grid = np.zeros(shape)
        count = rng.integers(1, 4)
        grid[rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)] = 5.0
        return grid
    if kind == 4:  # constant, dyadic or not
        return np.full(shape, rng.choice([0.0, 1.0, 0.1, 1 / 576, 7.5]))
    if kind == 5:  # heavy-tailed positive values, like attention ratios
        return rng.lognormal(0.0, 2.0, size=shape)
    return (rng.random(shape) < 0.1).astype(np.float64)  # sparse binary


def _compare(maps: np.ndarray, sizes: np.ndarray, base: int) -> list[str]:
    """Mismatches between select_bboxes and the reference, one line each."""
    ours = np.asarray(select_bboxes(maps, sizes, base))
    bad = []
    for i, (grid, size) in enumerate(zip(maps, sizes, strict=True)):
        want = reference_bbox(grid, (int(size[0]), int(size[1])), base)
        if tuple(ours[i].tolist()) != want:
            bad.append(f"map {i} size {tuple(size)} base {base}: {ours[i].tolist()} != {want}")
    return bad


@pytest.mark.parametrize(
    ("shape", "count"),
    [
        ((24, 24), 700),
        ((16, 16), 700),
        ((7, 11), 600),
        ((11, 7), 300),
        ((48, 24), 100),
        ((96, 72), 16),
        ((1, 1), 300),
        ((2, 3), 300),
        ((5, 1), 200),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_matches_reference(shape: tuple[int, int], count: int) -> None:
    rng = np.random.default_rng(1000 * shape[0] + shape[1])
    maps = np.stack([_random_map(rng, shape) for _ in range(count)])
    sizes = _random_sizes(rng, count)
    bad = _compare(maps, sizes, BASES[0]) + _compare(maps, sizes, BASES[1])
    assert not bad, f"{len(bad)} of {2 * count} boxes differ:\n" + "\n".join(bad[:20])


def test_float64_truncation_of_centres() -> None:
    """Widths where int(p * cell + cell * span / 2) is below the exact rational centre."""
    rng = np.random.default_rng(7)
    hits = []  # (width, start, span) for the spans the official rule uses at base 336
    for width in range(400, 2000):
        cell = width / 24
        for span in sorted({min(int(336 * r / cell), 24) for r in RATIOS}):
            for start in range(25 - span):
                exact = Fraction(width, 24) * Fraction(2 * start + span, 2)
                if exact.denominator == 1 and int(start * cell + cell * span / 2) < exact:
                    hits.append((width, start, span))
    assert len(hits) > 100  # the rounding the geometry must reproduce is common
    maps = np.zeros((96, 24, 24))
    sizes = np.empty((96, 2), dtype=np.int64)
    for row, pick in enumerate(rng.choice(len(hits), size=96, replace=False)):
        width, start, span = hits[pick]
        maps[row, 10:13, start : start + span] = 1.0  # the best window of that span
        sizes[row] = (width, 3000)
    bad = _compare(maps, sizes, 336)
    assert not bad, "\n".join(bad[:20])


def test_whole_image_when_window_covers_map() -> None:
    maps = np.random.default_rng(3).random((4, 24, 24))
    sizes = np.array([[336, 336], [300, 200], [1, 1], [335, 20]])
    boxes = np.asarray(select_bboxes(maps, sizes, 336))
    assert boxes.tolist() == [[0, 0, w, h] for w, h in sizes.tolist()]


def test_batch_matches_single() -> None:
    rng = np.random.default_rng(11)
    maps = np.stack([_random_map(rng, (16, 16)) for _ in range(12)]).astype(np.float32)
    sizes = _random_sizes(rng, 12)
    batch = np.asarray(select_bboxes(jnp.asarray(maps), sizes, 224))
    for grid, size, box in zip(maps, sizes, batch, strict=True):
        single = select_bbox(jnp.asarray(grid), tuple(size.tolist()), 224)
        assert single.dtype == jnp.int32 and single.shape == (4,)
        assert single.tolist() == box.tolist()
        # float32 input: the same box as the reference on the same values in float64.
        assert tuple(box.tolist()) == reference_bbox(grid, tuple(size.tolist()), 224)


def test_orientation_rows_are_y() -> None:
    """A peak at map row r, column c lands at image y ~ r, x ~ c on a non-square map."""
    grid = np.zeros((7, 11))
    grid[5, 2] = 1.0
    width, height = 2200, 1400  # 200 px per cell on both axes
    x1, y1, x2, y2 = select_bbox(grid, (width, height), 224).tolist()
    assert x1 <= 2 * 200 + 100 <= x2 and y1 <= 5 * 200 + 100 <= y2
    assert (x1, y1, x2, y2) == reference_bbox(grid, (width, height), 224)


def _sanitised(grid: np.ndarray) -> np.ndarray:
    """The documented replacement of non-finite values, written out in numpy."""
    finite = grid[np.isfinite(grid)]
    top, bottom = (finite.max(), finite.min()) if finite.size else (0.0, 0.0)
    out = np.where(np.isnan(grid), 0.0, grid)
    out = np.where(out == np.inf, top, out)
    return np.where(out == -np.inf, bottom, out)


def test_non_finite_maps_give_valid_boxes() -> None:
    rng = np.random.default_rng(5)
    maps = []
    for kind in range(40):
        grid = rng.random((24, 24))
        if kind % 8 == 0:
            grid[:] = np.nan
        elif kind % 8 == 1:
            grid[:] = np.inf
        elif kind % 8 == 2:
            grid[:] = -np.inf
        elif kind % 8 == 3:
            grid[:] = 0.0
        else:
            mask = rng.random((24, 24)) < 0.2
            grid[mask] = rng.choice([np.nan, np.inf, -np.inf], size=mask.sum())
        maps.append(grid)
    maps = np.stack(maps)
    sizes = _random_sizes(rng, len(maps))
    boxes = np.asarray(select_bboxes(maps, sizes, 336))
    for grid, (width, height), box in zip(maps, sizes.tolist(), boxes.tolist(), strict=True):
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (box, width, height)
        assert tuple(box) == reference_bbox(_sanitised(grid), (width, height), 336)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        select_bbox(np.ones((4, 4)), (0, 10), 336)
    with pytest.raises(ValueError):
        select_bboxes(np.ones((2, 4, 4)), [(10, 10)], 336)


@pytest.mark.parametrize(
    "size",
    [
        (1025, 3000),
        (4000, 999),
        (5000, 300),
        (300, 5000),  # official cols = int(5 * 300 / 5000) = 0
        (1024, 1024),
        (1023, 5000),
        (1024, 1025),
        (3001, 2000),
        (640, 480),
        (480, 640),  # small and taller than wide: official cols = 0
        (2048, 1024),
        (7, 3),
        (101, 5),  # last tiles lie wholly outside the image, as in the official split
    ],
)
def test_high_res_tiles(size: tuple[int, int]) -> None:
    assert high_res_tiles(size) == reference_tiles(size)
    rows, cols, tile_w, tile_h = high_res_grid(size)
    assert (rows, cols) == reference_grid(size)
    assert len(high_res_tiles(size)) == rows * cols
    assert tile_w * cols >= size[0] and tile_h * rows >= size[1]


def test_high_res_tiles_threshold() -> None:
    assert high_res_tiles((3000, 1500), threshold=512) == reference_tiles((3000, 1500), 512)
    assert high_res_tiles((600, 400)) == [(0, 0, 600, 400)]


def test_merge_tile_maps_orientation() -> None:
    rows, cols, h, w = 2, 3, 5, 7
    rng = np.random.default_rng(2)
    maps = rng.random((rows * cols, h, w)).astype(np.float32)
    merged = np.asarray(merge_tile_maps(jnp.asarray(maps), rows, cols))
    assert merged.shape == (rows * h, cols * w)
    np.testing.assert_array_equal(merged, reference_merge(list(maps), rows, cols))
    # Tile t = j * cols + i (row-major) fills block row j, block column i.
    for t in range(rows * cols):
        j, i = divmod(t, cols)
        np.testing.assert_array_equal(merged[j * h : (j + 1) * h, i * w : (i + 1) * w], maps[t])
    listed = merge_tile_maps([jnp.asarray(m) for m in maps], rows, cols)
    np.testing.assert_array_equal(np.asarray(listed), merged)
    with pytest.raises(ValueError):
        merge_tile_maps(maps[:5], rows, cols)
