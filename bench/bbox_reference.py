"""Plain-loop reference of the official box and tiling rules (numpy float64).

Written from the rule in PAPER.md ("Choosing the box", "High-resolution variant") and
checked against the behaviour of `bbox_from_att_image_adaptive`,
`high_res_split_threshold` and `high_res` in saccharomycetes/mllms_know utils.py. It
keeps the official evaluation order on purpose (one numpy sum per window, x outer and y
inner, neighbours left/right/up/down, `np.argmax` over ratios) so that float64 rounding
and ties come out as the official code's do. It is slow by design: tests compare
`vicrop_jax.bbox` against it and `bench.bbox` times it.

No sanitising: a map holding NaN or inf behaves here as it does in the official code.
"""

from __future__ import annotations

import math

import numpy as np

RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def reference_bbox(
    att_map: np.ndarray, image_size: tuple[int, int], base_size: int
) -> tuple[int, int, int, int]:
    """Official adaptive window box, one window sum at a time.

    Args:
      att_map: float[H, W] importance map, row = image y, column = image x.
      image_size: (width, height) of the original image.
      base_size: model input resolution (336 LLaVA-1.5, 224 InstructBLIP).

    Returns:
      (x1, y1, x2, y2) as Python ints.
    """
    grid = np.asarray(att_map, dtype=np.float64)
    rows, cols = grid.shape
    width, height = image_size
    cell_w, cell_h = width / cols, height / rows

    found = []  # (sharpness, ratio index, x, y, span_x, span_y) per ratio kept
    for index, ratio in enumerate(RATIOS):
        side = base_size * ratio
        span_x = min(int(side / cell_w), cols)
        span_y = min(int(side / cell_h), rows)
        if span_x >= cols and span_y >= rows:
            if index == 0:
                return 0, 0, width, height
            continue

        n_x, n_y = cols - span_x + 1, rows - span_y + 1
        sums = np.zeros((n_y, n_x))
        best, best_x, best_y = -np.inf, 0, 0
        for x in range(n_x):
            for y in range(n_y):
                total = grid[y : y + span_y, x : x + span_x].sum()
                sums[y, x] = total
                if total > best:
                    best, best_x, best_y = total, x, y

        around = []
        if best_x > 0:
            around.append(sums[best_y, best_x - 1])
        if best_x < n_x - 1:
            around.append(sums[best_y, best_x + 1])
        if best_y > 0:
            around.append(sums[best_y - 1, best_x])
        if best_y < n_y - 1:
            around.append(sums[best_y + 1, best_x])
        # A zero-area window (huge image) gives 0/0 = NaN here, and np.argmax below
        # picks the first NaN, as the official code does.
        with np.errstate(divide="ignore", invalid="ignore"):
            sharpness = (best - np.mean(around)) / (span_x * span_y)
        found.append((sharpness, index, best_x, best_y, span_x, span_y))

    pick = int(np.argmax([entry[0] for entry in found]))
    _, index, best_x, best_y, span_x, span_y = found[pick]
    side = base_size * RATIOS[index]
    half = side // 2

    centre_x = int(best_x * cell_w + cell_w * span_x / 2)
    centre_y = int(best_y * cell_h + cell_h * span_y / 2)
    centre_x = min(max(centre_x, half), width - half)
    centre_y = min(max(centre_y, half), height - half)
    box = (
        max(0, centre_x - half),
        max(0, centre_y - half),
        min(width, centre_x + half),
        min(height, centre_y + half),
    )
    return tuple(int(v) for v in box)


def reference_tiles(
    image_size: tuple[int, int], threshold: int = 1024
) -> list[tuple[int, int, int, int]]:
    """Official high-resolution tile boxes, row-major, at least one column."""
    width, height = image_size
    rows = int(np.ceil(height / threshold))
    cols = max(1, int(rows * width / height))
    tile_w = int(np.ceil(width / cols))
    tile_h = int(np.ceil(height / rows))
    tiles = []
    for j in range(rows):
        for i in range(cols):
            tiles.append((i * tile_w, j * tile_h, (i + 1) * tile_w, (j + 1) * tile_h))
    return tiles


def reference_merge(maps: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Official reassembly: consecutive runs of `cols` maps form one row of blocks."""
    return np.block([list(maps[start : start + cols]) for start in range(0, rows * cols, cols)])


def reference_grid(image_size: tuple[int, int], threshold: int = 1024) -> tuple[int, int]:
    """(rows, cols) of the official tile grid, at least one column."""
    width, height = image_size
    rows = math.ceil(height / threshold)
    return rows, max(1, int(rows * width / height))
